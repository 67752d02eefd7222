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

#include "../decode.cu"
#include "../group_rows.cu"

namespace {

int decode_case(int64_t N, int64_t h, int64_t m, int64_t dh, int64_t r, int64_t oh, int64_t R, int64_t K,
                int64_t splits, bool params, std::mt19937& gen) {
  std::uniform_real_distribution<float> val(-1.f, 1.f);
  std::vector<float> x(N * h * dh), A(h * m * dh * r), B(h * m * r * oh), w(R * h * K), base(N * h * oh);
  for (auto* v : {&x, &A, &B, &w, &base})
    for (auto& e : *v) e = val(gen);
  std::vector<int64_t> idx(R * h * K), rid(N);
  for (auto& e : idx) e = gen() % m;
  for (auto& e : rid) e = gen() % R;
  std::vector<float> y(N * h * oh), saved(N * (params ? 1 : K) * r);
  std::vector<float> part(routedlora::decode_part_numel(N, h, K, r, splits, params));
  const cudaError_t err = routedlora::launch_decode_forward(
      routedlora::DType::kFloat32, x.data(), A.data(), B.data(), idx.data(), w.data(), rid.data(), base.data(),
      y.data(), saved.data(), part.data(), N, h, m, dh, r, oh, R, K, splits, params, 0.5f, nullptr);
  return err == cudaSuccess ? 0 : 1;
}

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
  bad += decode_case(3, 2, 4, 20, 3, 7, 2, 2, 3, true, gen);
  bad += decode_case(2, 1, 3, 33, 5, 130, 3, 3, 2, false, gen);
  bad += decode_case(11, 1, 3, 9, 2, 5, 4, 2, 2, true, gen);  // two token groups
  bad += group_case(1100, 5, gen);     // two chunks, shared counters
  bad += group_case(200, 4200, gen);   // counters in global scratch
  std::printf("race driver: %d refused launches\n", bad);
  return bad;
}
