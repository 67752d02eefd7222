// The kernels compiled for the host emulator, behind a C ABI for ctypes (tests only).
//
//   g++ -std=c++20 -O2 -shared -fPIC -pthread -DRL_EMULATE -I<cuda>/include
//       csrc/emulate/emu_exports.cpp -o librl_emu.so
//
// tests/csrc_emulator.py builds and loads it; nothing in the package imports it.
#ifndef RL_EMULATE
#define RL_EMULATE 1
#endif

#include "../group_rows.cu"

extern "C" {

// Global-memory accesses of the launches between rl_emu_count(1) and rl_emu_count(0):
// rl_emu_count_size() triples (address, bytes, is_store), copied out by rl_emu_count_copy.
void rl_emu_count(int on) {
  std::lock_guard<std::mutex> guard(rl_emu::access_lock);
  rl_emu::accesses.clear();
  rl_emu::counting.store(on != 0);
}

int64_t rl_emu_count_size() { return static_cast<int64_t>(rl_emu::accesses.size()); }

void rl_emu_count_copy(uint64_t* out) {
  std::lock_guard<std::mutex> guard(rl_emu::access_lock);
  for (size_t i = 0; i < rl_emu::accesses.size(); ++i) {
    out[3 * i] = rl_emu::accesses[i].address;
    out[3 * i + 1] = rl_emu::accesses[i].bytes;
    out[3 * i + 2] = rl_emu::accesses[i].store;
  }
}

int64_t rl_emu_group_scratch_numel(int64_t R) { return routedlora::group_scratch_numel(R); }

int rl_emu_group_by_row(const int64_t* route_ids, int64_t N, int64_t R, int64_t* order, int64_t* srows,
                        int64_t* offs, int32_t* scratch) {
  return static_cast<int>(routedlora::launch_group_by_row(route_ids, N, R, order, srows, offs, scratch, nullptr));
}
}
