// A CUDA execution emulator for testing the kernels on a machine without a GPU.
//
// Included by common.cuh when RL_EMULATE is defined, after the toolkit's host runtime
// header (dim3, cudaError_t). A launch runs the grid's blocks one after another; inside
// a block every CUDA thread is a host thread, so __syncthreads is a real barrier and
// __shared__ (mapped to `static`) is one array all of them see. Warp
// intrinsics exchange values through a per-warp slot array between two barriers, so
// they are only defined for full warps with every lane taking part, which is the only
// way the kernels use them. A kernel that skips a barrier on some threads hangs here
// as it would misbehave on a GPU.
//
// What it does not model: timing, memory coalescing, bank conflicts, the memory model
// beyond barriers (a race that a GPU would tolerate by luck can also pass here).
#pragma once

#include <atomic>
#include <barrier>
#include <mutex>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

namespace rl_emu {

struct Warp {
  std::barrier<> bar{32};
  uint64_t slot[32];
};

struct Block {
  explicit Block(int threads) : bar(threads) {
    for (int i = 0; i < threads / 32; ++i) warps.emplace_back(new Warp());
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
};

struct ThreadState {
  dim3 tid, bid;
  int linear = 0;
  Block* block = nullptr;
};

inline thread_local ThreadState state;
inline dim3 grid_dim, block_dim;

// Global-memory traffic, for checking the kernels' traffic formulas: while `counting` is on,
// every RL_LD / RL_ST (and atomic) appends (address, bytes, is_store), and every launch a
// marker (0, 0, 2); the caller attributes addresses to its arguments. Shared memory is not
// global memory and is not counted.
struct Access {
  uint64_t address;
  uint32_t bytes;
  uint32_t store;
};
inline std::atomic<bool> counting{false};
inline std::mutex access_lock;
inline std::vector<Access> accesses;

inline void record(const void* p, uint32_t bytes, bool store) {
  if (!counting.load(std::memory_order_relaxed)) return;
  std::lock_guard<std::mutex> guard(access_lock);
  accesses.push_back({reinterpret_cast<uint64_t>(p), bytes, store ? 1u : 0u});
}

template <typename T>
T load(const T* p) {
  record(p, sizeof(T), false);
  return *p;
}

template <typename T, typename V>
T store(T* p, V v) {
  record(p, sizeof(T), true);
  return *p = static_cast<T>(v);
}

inline Warp& my_warp() { return *state.block->warps[state.linear / 32]; }
inline int my_lane() { return state.linear % 32; }

inline void require_full(unsigned mask) {
  if (mask != 0xffffffffu) throw std::logic_error("rl_emu: warp intrinsics need the full mask");
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "value too wide for a warp slot");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

// Publish this lane's value, wait for the warp, read with `pick`, wait again so the
// slots can be reused by the next intrinsic.
template <typename F>
auto exchange(uint64_t mine, F pick) {
  Warp& w = my_warp();
  w.slot[my_lane()] = mine;
  w.bar.arrive_and_wait();
  auto out = pick(w.slot);
  w.bar.arrive_and_wait();
  return out;
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads <= 0 || threads % 32 != 0) throw std::logic_error("rl_emu: block size must be a multiple of 32");
  grid_dim = grid;
  block_dim = block;
  if (counting.load()) {  // a marker between launches: (0, 0, 2)
    std::lock_guard<std::mutex> guard(access_lock);
    accesses.push_back({0, 0, 2});
  }
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block blk(threads);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int i = 0; i < threads; ++i) {
          pool.emplace_back([&, i] {
            state.linear = i;
            state.block = &blk;
            state.bid = dim3(bx, by, bz);
            state.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
            kernel(static_cast<P>(args)...);
          });
        }
        for (auto& th : pool) th.join();
      }
}

}  // namespace rl_emu

#define threadIdx (::rl_emu::state.tid)
#define blockIdx (::rl_emu::state.bid)
#define blockDim (::rl_emu::block_dim)
#define gridDim (::rl_emu::grid_dim)

inline void __syncthreads() { ::rl_emu::state.block->bar.arrive_and_wait(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::rl_emu::require_full(mask);
  ::rl_emu::my_warp().bar.arrive_and_wait();
}

inline unsigned __match_any_sync(unsigned mask, long long value) {
  ::rl_emu::require_full(mask);
  const uint64_t mine = ::rl_emu::to_bits(value);
  return ::rl_emu::exchange(mine, [mine](const uint64_t* slot) {
    unsigned peers = 0;
    for (int l = 0; l < 32; ++l)
      if (slot[l] == mine) peers |= 1u << l;
    return peers;
  });
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  ::rl_emu::require_full(mask);
  return ::rl_emu::exchange(predicate ? 1u : 0u, [](const uint64_t* slot) {
    unsigned bits = 0;
    for (int l = 0; l < 32; ++l)
      if (slot[l]) bits |= 1u << l;
    return bits;
  });
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }

inline int atomicAdd(int* address, int value) {
  ::rl_emu::record(address, sizeof(int), false);
  ::rl_emu::record(address, sizeof(int), true);
  return std::atomic_ref<int>(*address).fetch_add(value);
}
inline float atomicAdd(float* address, float value) {
  ::rl_emu::record(address, sizeof(float), false);
  ::rl_emu::record(address, sizeof(float), true);
  return std::atomic_ref<float>(*address).fetch_add(value);
}
