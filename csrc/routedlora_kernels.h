// Host launchers of the routedlora CUDA kernels. Plain pointers and sizes only: the
// binding layer (bindings.cpp) is the one place that sees torch tensors.
//
// Every launcher returns the launch status (cudaGetLastError) and leaves all checks
// of shapes and dtypes to its caller.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace routedlora {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Decode-regime routed LoRA, two launches per layer (shrink, then expand), the routing
// mixture fused into both: no adapter is formed, no token grouping is needed.
//
// Shapes (all contiguous): x (N, h*dh), A (h, m, dh, r), B (h, m, r, oh), idx (R, h, K)
// int64, w (R, h, K) float32, route_ids (N) int64, base (N, h*oh) or null, y (N, h*oh).
// `params` mixes parameters per head (Poly, MHR, C-Poly); otherwise one head, outputs
// mixed (MTA). `part` is float32 scratch of decode_part_numel() numbers.
//
// `saved` receives the rank-space activation the backward needs, float32:
// u (N, r) = sum over heads and slots of w * x_q A_q,idx (params) or
// z (N, K, r) = x A_idx per slot (outputs).
//
// An index out of range (route_ids outside [0, R), idx outside [0, m)) is never
// dereferenced: that token's outputs are set to NaN.
int64_t decode_part_numel(int64_t N, int64_t h, int64_t K, int64_t r, int64_t splits, bool params);
// Tokens per block (they share the block's loads of A and B through L1), and splits of
// d/h (enough blocks to fill `sm_count` SMs twice).
int64_t decode_tokens_per_block(int64_t N);
int64_t decode_splits(int64_t N, int64_t h, int64_t dh, int sm_count);
// Largest rank the decode kernels take (one block holds a row of every rank column).
constexpr int kDecodeMaxRank = 256;

cudaError_t launch_decode_forward(DType dtype, const void* x, const void* A, const void* B, const int64_t* idx,
                                  const float* w, const int64_t* route_ids, const void* base, void* y, float* saved,
                                  float* part, int64_t N, int64_t h, int64_t m, int64_t dh, int64_t r, int64_t oh,
                                  int64_t R, int64_t K, int64_t splits, bool params, float scale,
                                  cudaStream_t stream);

// Groups tokens by routing row in one launch (a stable counting sort on one block):
// order (N) the token indices sorted by row, ties in token order; srows (N) their rows;
// offs (R + 1) where row r's tokens start. Ids outside [0, R) are placed after every
// valid token, in token order, and offs[R] counts the valid tokens only.
// `scratch` is int32 scratch of group_scratch_numel(R) numbers.
int64_t group_scratch_numel(int64_t R);
cudaError_t launch_group_by_row(const int64_t* route_ids, int64_t N, int64_t R, int64_t* order, int64_t* srows,
                                int64_t* offs, int32_t* scratch, cudaStream_t stream);

}  // namespace routedlora
