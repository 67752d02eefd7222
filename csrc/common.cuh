// Shared by every kernel source: dtype helpers, the launch macro, and RL_LD / RL_ST, the
// global-memory accesses (plain dereferences on a GPU; counted by the host emulator).
//
// The sources depend on the CUDA toolkit only (no torch headers), so each .cu compiles
// on its own with `nvcc -c`. Defining RL_EMULATE compiles the same kernels as plain
// C++ against csrc/emulate/cuda_emu.h, which runs every CUDA thread of a block as a
// host thread: that is how the kernels are tested on machines without a GPU.
#pragma once

#include <cstdint>

#ifdef RL_EMULATE
#include <cuda_runtime_api.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "emulate/cuda_emu.h"
// A kernel launch is a call into the emulator; `stream` is ignored there.
#define RL_LAUNCH(kernel, grid, block, stream, ...) ((void)(stream), ::rl_emu::launch(kernel, grid, block, __VA_ARGS__))
#define RL_LAST_ERROR() cudaSuccess
// global-memory reads and writes, counted by the emulator (the traffic formulas are checked against them)
#define RL_LD(p) (::rl_emu::load(p))
#define RL_ST(p, v) (::rl_emu::store((p), (v)))
#else
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define RL_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#define RL_LAST_ERROR() cudaGetLastError()
#define RL_LD(p) (*(p))
#define RL_ST(p, v) (*(p) = (v))
#endif

namespace routedlora {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__host__ __device__ __forceinline__ int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace routedlora
