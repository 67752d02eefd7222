// Shared by every kernel source: the launch macro, and RL_LD / RL_ST, the global-memory
// accesses (plain dereferences on a GPU; counted by the host emulator).
//
// The sources depend on the CUDA toolkit only (no torch headers), so each .cu compiles
// on its own with `nvcc -c`. Defining RL_EMULATE compiles the same kernels as plain
// C++ against csrc/emulate/cuda_emu.h, which runs every CUDA thread of a block as a
// host thread: that is how the kernels are tested on machines without a GPU.
#pragma once

#include <cstdint>

#ifdef RL_EMULATE
#include <cuda_runtime_api.h>
#include "emulate/cuda_emu.h"
// A kernel launch is a call into the emulator; `stream` is ignored there.
#define RL_LAUNCH(kernel, grid, block, stream, ...) ((void)(stream), ::rl_emu::launch(kernel, grid, block, __VA_ARGS__))
#define RL_LAST_ERROR() cudaSuccess
// global-memory reads and writes, counted by the emulator (the traffic formulas are checked against them)
#define RL_LD(p) (::rl_emu::load(p))
#define RL_ST(p, v) (::rl_emu::store((p), (v)))
#else
#include <cuda_runtime.h>
#define RL_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#define RL_LAST_ERROR() cudaGetLastError()
#define RL_LD(p) (*(p))
#define RL_ST(p, v) (*(p) = (v))
#endif

namespace routedlora {

__host__ __device__ __forceinline__ int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace routedlora
