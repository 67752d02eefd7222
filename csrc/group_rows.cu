// Routing metadata in one launch: tokens grouped by routing row.
//
// The Triton backend tiles tokens of one routing row together, which needs the token
// order sorted by row (stable, so that every reduction over a row's tokens adds in token
// order and the gradients are bitwise reproducible) and each row's offset. In torch that
// is argsort + gather + searchsorted + arange, several launches each. Here one block
// does a counting sort:
//   1. count tokens per row (warp-aggregated atomics: tokens of one sequence share a row),
//   2. exclusive scan of the counts into offsets (and a running cursor per row),
//   3. scatter, 1024 tokens at a time; inside a chunk the warps take turns, and within a
//      warp equal rows are ranked by lane, so ties keep token order.
// Row counters live in shared memory when R < kSharedRows, in the caller's scratch otherwise.
// One block keeps it to one launch with no inter-block protocol; the price is that it
// scales with N / 1024 chunks of 32 warp turns, which suits decode and medium batches.
#include "common.cuh"
#include "routedlora_kernels.h"

namespace routedlora {
namespace {

constexpr int kGroupThreads = 1024;
constexpr int kWarps = kGroupThreads / 32;
constexpr int64_t kSharedRows = 4096;

// Bucket R collects ids outside [0, R): they sort after every valid token.
__device__ __forceinline__ int64_t bucket_of(int64_t id, int64_t R) { return (id >= 0 && id < R) ? id : R; }

template <bool SHARED>
__global__ void __launch_bounds__(kGroupThreads)
group_by_row_kernel(const int64_t* __restrict__ route_ids, int64_t N, int64_t R, int64_t* __restrict__ order,
                    int64_t* __restrict__ srows, int64_t* __restrict__ offs, int32_t* __restrict__ scratch) {
  __shared__ int32_t shared_cursor[SHARED ? kSharedRows + 1 : 1];
  __shared__ int64_t partial[kGroupThreads];
  int32_t* cursor = SHARED ? shared_cursor : scratch;  // R + 1 counters
  const int t = threadIdx.x;
  const int lane = t & 31;
  const int warp = t >> 5;
  const unsigned below = (1u << lane) - 1u;

  for (int64_t e = t; e <= R; e += kGroupThreads) RL_ST(cursor + e, 0);
  __syncthreads();

  for (int64_t start = 0; start < N; start += kGroupThreads) {
    const int64_t n = start + t;
    const long long key = n < N ? bucket_of(RL_LD(route_ids + n), R) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, key);
    if (key >= 0 && (peers & below) == 0) atomicAdd(&cursor[key], __popc(peers));
  }
  __syncthreads();

  // exclusive scan: each thread owns a contiguous run of counters
  const int64_t per = cdiv(R + 1, kGroupThreads);
  const int64_t lo = t * per < R + 1 ? t * per : R + 1;
  const int64_t hi = lo + per < R + 1 ? lo + per : R + 1;
  int64_t local = 0;
  for (int64_t e = lo; e < hi; ++e) local += RL_LD(cursor + e);
  partial[t] = local;
  __syncthreads();
  for (int off = 1; off < kGroupThreads; off <<= 1) {
    const int64_t add = t >= off ? partial[t - off] : 0;
    __syncthreads();
    partial[t] += add;
    __syncthreads();
  }
  int64_t run = partial[t] - local;
  for (int64_t e = lo; e < hi; ++e) {
    const int32_t count = RL_LD(cursor + e);
    RL_ST(offs + e, run);
    RL_ST(cursor + e, static_cast<int32_t>(run));
    run += count;
  }
  __syncthreads();

  for (int64_t start = 0; start < N; start += kGroupThreads) {
    const int64_t n = start + t;
    const int64_t id = n < N ? RL_LD(route_ids + n) : 0;
    const long long key = n < N ? bucket_of(id, R) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, key);
    const int rank = __popc(peers & below);
    for (int turn = 0; turn < kWarps; ++turn) {
      if (warp == turn) {
        const int32_t first = key >= 0 ? RL_LD(cursor + key) : 0;
        __syncwarp();  // every peer has read the cursor before the leader moves it
        if (key >= 0) {
          if (rank == 0) RL_ST(cursor + key, first + __popc(peers));
          RL_ST(order + first + rank, n);
          RL_ST(srows + first + rank, id);
        }
      }
      __syncthreads();
    }
  }
}

}  // namespace

int64_t group_scratch_numel(int64_t R) { return R + 1; }

cudaError_t launch_group_by_row(const int64_t* route_ids, int64_t N, int64_t R, int64_t* order, int64_t* srows,
                                int64_t* offs, int32_t* scratch, cudaStream_t stream) {
  if (N < 0 || R < 0 || N > 0x7fffffff) return cudaErrorInvalidValue;
  if (R < kSharedRows) {
    auto kernel = group_by_row_kernel<true>;
    RL_LAUNCH(kernel, dim3(1), dim3(kGroupThreads), stream, route_ids, N, R, order, srows, offs, scratch);
  } else {
    auto kernel = group_by_row_kernel<false>;
    RL_LAUNCH(kernel, dim3(1), dim3(kGroupThreads), stream, route_ids, N, R, order, srows, offs, scratch);
  }
  return RL_LAST_ERROR();
}

}  // namespace routedlora
