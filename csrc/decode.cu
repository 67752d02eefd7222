// Decode-regime routed LoRA: shrink and expand, one launch each, routing mixture fused.
//
// Why not the Triton tiles here: with 1-64 tokens the Triton kernels group tokens by
// routing row first (a sort and a search) and tile N in blocks of 16 or more, so most of a
// tile is padding and the metadata costs more launches than the math. These kernels give
// each token its own blocks and read its routing row directly (BGMV-style, as in punica,
// but with the skills mixed by the routing weights inside the kernel).
//
// Both kernels give a block a group of up to 8 consecutive tokens, taken in turn: tokens
// of one batch mostly share skills (under Poly every row mixes all m), so after the first
// token the block's reads of A and B come from L1, and L2 traffic drops by the group size.
//
// Shrink, grid (N / group, h, splits): block (g, q, s) dots each of its tokens' slice of
// head q, rows [s*chunk, (s+1)*chunk) of d/h, with every selected skill's A. Thread t owns rank column
// t % r and every P-th row (P = threads / r), so a warp reads whole contiguous runs of
// A (its layout is (h, m, dh, r), rank fastest). Partial sums go to float32 scratch,
// one slot per split: the expand adds them in a fixed order, so the result does not
// depend on scheduling (no atomics).
//
// Expand, grid (N / group, h, oh / 32): for each of its tokens, block (g, q, c) sums the
// partials into the token's rank-space activation (a warp per value, a fixed-order shuffle
// sum), scales it by the routing weights into K*r coefficients in shared memory, and
// computes 32 output columns: lane = column, each of the 8 warps a slice of the K*r terms
// of coefficient * B[q, skill, rank, column] (a warp reads 32 contiguous columns of one B
// row), the slices added in a fixed order, plus the base output, rounded once. Splitting
// the terms over warps keeps many loads in flight when there are few tokens (one token:
// 128 blocks of 8 warps for o = 4096, each thread K*r/8 loads).
#include "common.cuh"
#include "routedlora_kernels.h"

namespace routedlora {
namespace {

constexpr int kShrinkThreads = 256;
constexpr int kExpandThreads = 256;
constexpr int kExpandWarps = kExpandThreads / 32;  // each a slice of the K*r terms of 32 columns
constexpr int64_t kMaxChunk = 1024;      // rows of d/h staged in shared memory per block
constexpr int64_t kMaxCoef = 4096;       // K * r coefficients held in shared memory (2 x 16 KiB)
constexpr int64_t kMaxSlots = 256;       // K
// tokens one block handles in turn: tokens of a batch mostly share skills (all of them
// under Poly), so the second token's reads of A and B hit L1 instead of L2
constexpr int64_t kTokensPerBlock = 8;
static_assert(kDecodeMaxRank <= kShrinkThreads, "a shrink block holds one row of every rank column");

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

template <typename T, bool PARAMS>
__global__ void __launch_bounds__(kShrinkThreads)
decode_shrink_kernel(const T* __restrict__ x, const T* __restrict__ A, const int64_t* __restrict__ idx,
                     const float* __restrict__ w, const int64_t* __restrict__ route_ids, float* __restrict__ part,
                     int64_t N, int64_t h, int64_t m, int64_t dh, int64_t r, int64_t R, int64_t K, int64_t chunk,
                     int64_t group) {
  __shared__ float xs[kMaxChunk];
  __shared__ float red[kShrinkThreads];
  const int64_t q = blockIdx.y, s = blockIdx.z;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * group;
  const int64_t n1 = n0 + group < N ? n0 + group : N;
  const int t = threadIdx.x;
  const int64_t c0 = s * chunk;
  const int64_t len = dh - c0 < chunk ? (dh - c0 > 0 ? dh - c0 : 0) : chunk;
  const int P = kShrinkThreads / static_cast<int>(r);
  const int p = t / static_cast<int>(r);
  const int col = t % static_cast<int>(r);
  const bool active = p < P;
  const int64_t J = PARAMS ? 1 : K;

  // the block's tokens in turn: their skills' rows of A for this chunk stay in L1
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t row = RL_LD(route_ids + n);
    const bool row_ok = row >= 0 && row < R;
    const T* xrow = x + n * h * dh + q * dh + c0;
    for (int64_t c = t; c < len; c += kShrinkThreads) xs[c] = to_float(RL_LD(xrow + c));
    __syncthreads();
    float acc = 0.f;
    for (int64_t j = 0; j < K; ++j) {
      const int64_t slot = (row * h + q) * K + j;
      const int64_t k = row_ok ? RL_LD(idx + slot) : -1;
      const bool ok = k >= 0 && k < m;
      float dot = 0.f;
      if (active && ok) {
        const T* a = A + ((q * m + k) * dh + c0) * r + col;
        for (int64_t c = p; c < len; c += P) dot += xs[c] * to_float(RL_LD(a + c * r));
      }
      if (!ok) dot = quiet_nan();  // a bad index poisons the token, never a wild read
      if (PARAMS) {
        acc += (ok ? RL_LD(w + slot) : 1.f) * dot;
      } else {
        red[t] = dot;
        __syncthreads();
        if (t < r) {
          float sum = 0.f;
          for (int pp = 0; pp < P; ++pp) sum += red[pp * r + t];
          RL_ST(part + ((s * h + q) * N + n) * J * r + j * r + t, sum);
        }
        __syncthreads();
      }
    }
    if (PARAMS) {
      if (!row_ok) acc = quiet_nan();  // K == 0 reads no index: check the row itself
      red[t] = acc;
      __syncthreads();
      if (t < r) {
        float sum = 0.f;
        for (int pp = 0; pp < P; ++pp) sum += red[pp * r + t];
        RL_ST(part + ((s * h + q) * N + n) * r + t, sum);
      }
    }
    __syncthreads();  // xs and red are refilled for the next token
  }
}

template <typename T, bool PARAMS, bool HAS_BASE>
__global__ void __launch_bounds__(kExpandThreads)
decode_expand_kernel(const float* __restrict__ part, const T* __restrict__ B, const int64_t* __restrict__ idx,
                     const float* __restrict__ w, const int64_t* __restrict__ route_ids, const T* __restrict__ base,
                     T* __restrict__ y, float* __restrict__ saved, int64_t N, int64_t h, int64_t m, int64_t r,
                     int64_t oh, int64_t R, int64_t K, int64_t splits, float scale, int64_t group) {
  __shared__ float act[kMaxCoef];   // rank-space activation: r (params) or K * r (outputs)
  __shared__ float coef[kMaxCoef];  // scale * w * activation, per slot and rank column
  __shared__ int64_t skill[kMaxSlots];
  __shared__ float red[kExpandWarps][32];
  const int64_t q = blockIdx.y;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * group;
  const int64_t n1 = n0 + group < N ? n0 + group : N;
  const int t = threadIdx.x;
  const int lane = t & 31;
  const int warp = t >> 5;
  const int64_t J = PARAMS ? 1 : K;
  const int64_t sources = PARAMS ? splits * h : splits;  // partials that add up to one activation value
  const int64_t c = static_cast<int64_t>(blockIdx.z) * 32 + lane;

  for (int64_t n = n0; n < n1; ++n) {
    const int64_t row = RL_LD(route_ids + n);
    const bool row_ok = row >= 0 && row < R;
    // one warp per activation value, its lanes over the partials, a fixed-order shuffle sum.
    // params: u adds every head's partials (the heads split d, so x Â adds over them)
    for (int64_t e = warp; e < J * r; e += kExpandWarps) {
      float sum = 0.f;
      for (int64_t src = lane; src < sources; src += 32) {
        sum += PARAMS ? RL_LD(part + (src * N + n) * r + e) : RL_LD(part + (src * N + n) * J * r + e);
      }
      for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      if (lane == 0) {
        act[e] = sum;
        if (q == 0 && blockIdx.z == 0) RL_ST(saved + n * J * r + e, sum);
      }
    }
    for (int64_t j = t; j < K; j += kExpandThreads) {
      const int64_t k = row_ok ? RL_LD(idx + (row * h + q) * K + j) : -1;
      skill[j] = (k >= 0 && k < m) ? k : -1;
    }
    __syncthreads();
    // 32-bit: K * r <= kMaxCoef, and 64-bit division would be a call per term
    const int terms = static_cast<int>(K * r), rank = static_cast<int>(r);
    for (int e = t; e < terms; e += kExpandThreads) {
      const int j = e / rank;
      const float a = PARAMS ? act[e % rank] : act[e];
      coef[e] = skill[j] >= 0 ? scale * RL_LD(w + (row * h + q) * K + j) * a : quiet_nan();
    }
    __syncthreads();

    // lane = output column, warp = a slice of the K*r (slot, rank) terms: every warp keeps
    // its own loads of B in flight, and the slices are added in a fixed order
    float acc = 0.f;
    if (c < oh) {
      for (int e = warp; e < terms; e += kExpandWarps) {
        const int64_t k = skill[e / rank];
        acc += k >= 0 ? coef[e] * to_float(RL_LD(B + ((q * m + k) * r + e % rank) * oh + c)) : quiet_nan();
      }
    }
    red[warp][lane] = acc;
    __syncthreads();
    if (warp == 0 && c < oh) {
      float sum = row_ok ? 0.f : quiet_nan();
      for (int s = 0; s < kExpandWarps; ++s) sum += red[s][lane];
      const int64_t o = n * h * oh + q * oh + c;
      if (HAS_BASE) sum += to_float(RL_LD(base + o));
      RL_ST(y + o, from_float<T>(sum));
    }
    __syncthreads();  // act, coef, skill and red are refilled for the next token
  }
}

template <typename T, bool PARAMS>
cudaError_t launch_typed(const void* x, const void* A, const void* B, const int64_t* idx, const float* w,
                         const int64_t* route_ids, const void* base, void* y, float* saved, float* part, int64_t N,
                         int64_t h, int64_t m, int64_t dh, int64_t r, int64_t oh, int64_t R, int64_t K,
                         int64_t splits, float scale, cudaStream_t stream) {
  const int64_t chunk = cdiv(dh, splits);
  const int64_t group = decode_tokens_per_block(N);
  const int64_t groups = cdiv(N, group);
  auto shrink = decode_shrink_kernel<T, PARAMS>;
  RL_LAUNCH(shrink, dim3(groups, h, splits), dim3(kShrinkThreads), stream, static_cast<const T*>(x),
            static_cast<const T*>(A), idx, w, route_ids, part, N, h, m, dh, r, R, K, chunk, group);
  cudaError_t err = RL_LAST_ERROR();
  if (err != cudaSuccess) return err;
  const dim3 grid(groups, h, cdiv(oh, 32));
  if (base != nullptr) {
    auto expand = decode_expand_kernel<T, PARAMS, true>;
    RL_LAUNCH(expand, grid, dim3(kExpandThreads), stream, part, static_cast<const T*>(B), idx, w, route_ids,
              static_cast<const T*>(base), static_cast<T*>(y), saved, N, h, m, r, oh, R, K, splits, scale, group);
  } else {
    auto expand = decode_expand_kernel<T, PARAMS, false>;
    RL_LAUNCH(expand, grid, dim3(kExpandThreads), stream, part, static_cast<const T*>(B), idx, w, route_ids,
              static_cast<const T*>(nullptr), static_cast<T*>(y), saved, N, h, m, r, oh, R, K, splits, scale,
              group);
  }
  return RL_LAST_ERROR();
}

template <bool PARAMS>
cudaError_t launch_mode(DType dtype, const void* x, const void* A, const void* B, const int64_t* idx,
                        const float* w, const int64_t* route_ids, const void* base, void* y, float* saved,
                        float* part, int64_t N, int64_t h, int64_t m, int64_t dh, int64_t r, int64_t oh, int64_t R,
                        int64_t K, int64_t splits, float scale, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_typed<float, PARAMS>(x, A, B, idx, w, route_ids, base, y, saved, part, N, h, m, dh, r, oh, R,
                                         K, splits, scale, stream);
    case DType::kFloat16:
      return launch_typed<__half, PARAMS>(x, A, B, idx, w, route_ids, base, y, saved, part, N, h, m, dh, r, oh,
                                          R, K, splits, scale, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16, PARAMS>(x, A, B, idx, w, route_ids, base, y, saved, part, N, h, m, dh, r,
                                                 oh, R, K, splits, scale, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int64_t decode_part_numel(int64_t N, int64_t h, int64_t K, int64_t r, int64_t splits, bool params) {
  return splits * h * N * (params ? 1 : K) * r;
}

int64_t decode_tokens_per_block(int64_t N) { return N < kTokensPerBlock ? (N > 0 ? N : 1) : kTokensPerBlock; }

int64_t decode_splits(int64_t N, int64_t h, int64_t dh, int sm_count) {
  // enough blocks to cover every SM twice, but no split shorter than 32 rows, and
  // never a chunk longer than the shared-memory stage
  const int64_t fewest = cdiv(dh, kMaxChunk);
  const int64_t most = fewest > cdiv(dh, 32) ? fewest : cdiv(dh, 32);
  const int64_t blocks = cdiv(N, decode_tokens_per_block(N)) * h > 0 ? cdiv(N, decode_tokens_per_block(N)) * h : 1;
  int64_t splits = cdiv(2 * static_cast<int64_t>(sm_count > 0 ? sm_count : 1), blocks);
  if (splits < fewest) splits = fewest;
  if (splits > most) splits = most;
  return splits > 0 ? splits : 1;
}

cudaError_t launch_decode_forward(DType dtype, const void* x, const void* A, const void* B, const int64_t* idx,
                                  const float* w, const int64_t* route_ids, const void* base, void* y, float* saved,
                                  float* part, int64_t N, int64_t h, int64_t m, int64_t dh, int64_t r, int64_t oh,
                                  int64_t R, int64_t K, int64_t splits, bool params, float scale,
                                  cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  // the expand writes y and saved: a launch that could not write them is refused
  if (r < 1 || oh < 1 || r > kDecodeMaxRank || K < 0 || K > kMaxSlots || K * r > kMaxCoef || splits < 1 ||
      cdiv(dh, splits) > kMaxChunk || N > 0x7fffffff || h > 65535 || splits > 65535 ||
      cdiv(oh, 32) > 65535 || (!params && h != 1))
    return cudaErrorInvalidValue;
  if (params)
    return launch_mode<true>(dtype, x, A, B, idx, w, route_ids, base, y, saved, part, N, h, m, dh, r, oh, R, K,
                             splits, scale, stream);
  return launch_mode<false>(dtype, x, A, B, idx, w, route_ids, base, y, saved, part, N, h, m, dh, r, oh, R, K,
                            splits, scale, stream);
}

}  // namespace routedlora
