// Host launchers of the routedlora CUDA kernels. Plain pointers and sizes only: the
// binding layer (bindings.cpp) is the one place that sees torch tensors.
//
// Every launcher returns the launch status (cudaGetLastError) and leaves the checks of
// tensor shapes to its caller.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace routedlora {

// Groups tokens by routing row in one launch (a stable counting sort on one block):
// order (N) the token indices sorted by row, ties in token order; srows (N) their rows;
// offs (R + 1) where row r's tokens start. Ids outside [0, R) are placed after every
// valid token, in token order, and offs[R] counts the valid tokens only.
// `scratch` is int32 scratch of group_scratch_numel(R) numbers.
int64_t group_scratch_numel(int64_t R);
cudaError_t launch_group_by_row(const int64_t* route_ids, int64_t N, int64_t R, int64_t* order, int64_t* srows,
                                int64_t* offs, int32_t* scratch, cudaStream_t stream);

}  // namespace routedlora
