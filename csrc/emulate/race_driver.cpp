// Runs every kernel of csrc/ in the host emulator on small random inputs, for
// ThreadSanitizer: CUDA threads are host threads here, so a shared- or global-memory
// access that no barrier orders against another thread's write shows up as a data race
// (the emulator's counterpart of compute-sanitizer's racecheck).
//
//   g++ -std=c++20 -O1 -g -fsanitize=thread -pthread -DRL_EMULATE -I<cuda>/include
//       csrc/emulate/race_driver.cpp -o race_driver && ./race_driver
//
// tests/test_csrc.py builds and runs it; it exits non-zero if a launch is refused.
#ifndef RL_EMULATE
#define RL_EMULATE 1
#endif

#include <cstdio>
#include <random>
#include <vector>

#include "../group_rows.cu"

namespace {

int group_case(int64_t N, int64_t R, std::mt19937& gen) {
  std::vector<int64_t> rid(N), order(N), srows(N), offs(R + 1);
  for (auto& e : rid) e = R > 0 ? static_cast<int64_t>(gen() % (R + 1)) : 0;  // a few out of range
  std::vector<int32_t> scratch(routedlora::group_scratch_numel(R));
  const cudaError_t err = routedlora::launch_group_by_row(rid.data(), N, R, order.data(), srows.data(), offs.data(),
                                                          scratch.data(), nullptr);
  return err == cudaSuccess ? 0 : 1;
}

}  // namespace

int main() {
  std::mt19937 gen(0);
  int bad = 0;
  bad += group_case(1100, 5, gen);     // two chunks, shared counters
  bad += group_case(200, 4200, gen);   // counters in global scratch
  std::printf("race driver: %d refused launches\n", bad);
  return bad;
}
