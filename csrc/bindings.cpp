// torch custom ops over the CUDA launchers: namespace `routedlora_cuda`.
//
//   decode_forward(x, A, B, idx, w, route_ids, base?, scale, params) -> (y, saved)
//   group_by_row(route_ids, R) -> (order, srows, offs)
//
// Each has a CUDA implementation and a Meta one (shapes only), so torch.compile and
// fake tensors trace through them without running a kernel. This file is the only one
// that includes torch: the kernels themselves build with the CUDA toolkit alone.
// Checks here are the ones whose failure would reach a kernel as a bad pointer or a bad
// size; index values are never read on the host (no sync): the kernels poison the
// affected tokens with NaN instead.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <optional>
#include <tuple>

#include "routedlora_kernels.h"

namespace {

using at::Tensor;

// SM count per device, read once (the split heuristic needs it on every decode call)
int sm_count(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device < 0 || device >= static_cast<c10::DeviceIndex>(cache.size())) return 132;
  int sms = cache[device].load(std::memory_order_relaxed);
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

routedlora::DType kernel_dtype(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return routedlora::DType::kFloat32;
    case at::kHalf:
      return routedlora::DType::kFloat16;
    case at::kBFloat16:
      return routedlora::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "x: routedlora_cuda takes float32, float16 or bfloat16, got ", x.scalar_type());
  }
}

void check_decode_args(const Tensor& x, const Tensor& A, const Tensor& B, const Tensor& idx, const Tensor& w,
                       const Tensor& route_ids, const std::optional<Tensor>& base, bool params) {
  TORCH_CHECK(x.dim() == 2, "x: expected (N, d), got ", x.sizes());
  TORCH_CHECK(A.dim() == 4, "A: expected (h, m, d/h, r), got ", A.sizes());
  TORCH_CHECK(B.dim() == 4, "B: expected (h, m, r, o/h), got ", B.sizes());
  TORCH_CHECK(idx.dim() == 3 && w.sizes() == idx.sizes(), "idx, w: expected equal (R, h, K) shapes, got ",
              idx.sizes(), " and ", w.sizes());
  TORCH_CHECK(route_ids.dim() == 1 && route_ids.size(0) == x.size(0), "route_ids: expected (", x.size(0),
              "), got ", route_ids.sizes());
  const int64_t h = A.size(0), m = A.size(1), dh = A.size(2), r = A.size(3);
  TORCH_CHECK(B.size(0) == h && B.size(1) == m && B.size(2) == r, "B: expected (", h, ", ", m, ", ", r,
              ", o/h), got ", B.sizes());
  TORCH_CHECK(x.size(1) == h * dh, "x: expected ", h * dh, " features, got ", x.size(1));
  TORCH_CHECK(idx.size(1) == h, "idx: expected ", h, " heads, got ", idx.sizes());
  TORCH_CHECK(params || h == 1, "A: combine='outputs' takes one head, got h=", h);
  TORCH_CHECK(A.scalar_type() == x.scalar_type() && B.scalar_type() == x.scalar_type(),
              "A, B: expected x's dtype ", x.scalar_type(), ", got ", A.scalar_type(), " and ", B.scalar_type());
  if (base.has_value()) {
    TORCH_CHECK(base->sizes() == at::IntArrayRef({x.size(0), h * B.size(3)}), "base: expected (", x.size(0), ", ",
                h * B.size(3), "), got ", base->sizes());
    TORCH_CHECK(base->scalar_type() == x.scalar_type(), "base: expected x's dtype ", x.scalar_type(), ", got ",
                base->scalar_type());
  }
  TORCH_CHECK(!idx.is_floating_point() && !route_ids.is_floating_point(), "idx, route_ids: expected integers");
}

// y (N, o) in x's dtype; saved float32, (N, r) for params, (N, K, r) for outputs
std::tuple<Tensor, Tensor> decode_outputs(const Tensor& x, const Tensor& A, const Tensor& B, const Tensor& idx,
                                          bool params) {
  const int64_t N = x.size(0), r = A.size(3), K = idx.size(2);
  Tensor y = at::empty({N, A.size(0) * B.size(3)}, x.options());
  Tensor saved = params ? at::empty({N, r}, x.options().dtype(at::kFloat))
                        : at::empty({N, K, r}, x.options().dtype(at::kFloat));
  return {y, saved};
}

std::tuple<Tensor, Tensor> decode_forward_meta(const Tensor& x, const Tensor& A, const Tensor& B, const Tensor& idx,
                                               const Tensor& w, const Tensor& route_ids,
                                               const std::optional<Tensor>& base, double /*scale*/, bool params) {
  check_decode_args(x, A, B, idx, w, route_ids, base, params);
  return decode_outputs(x, A, B, idx, params);
}

std::tuple<Tensor, Tensor> decode_forward_cuda(const Tensor& x, const Tensor& A, const Tensor& B, const Tensor& idx,
                                               const Tensor& w, const Tensor& route_ids,
                                               const std::optional<Tensor>& base, double scale, bool params) {
  check_decode_args(x, A, B, idx, w, route_ids, base, params);
  for (const Tensor* t : {&A, &B, &idx, &w, &route_ids})
    TORCH_CHECK(t->device() == x.device(), "routedlora_cuda::decode_forward: every input must be on ", x.device());
  TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor, got one on ", x.device());
  if (base.has_value()) TORCH_CHECK(base->device() == x.device(), "base: expected ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dtype = kernel_dtype(x);
  const int64_t N = x.size(0), h = A.size(0), m = A.size(1), dh = A.size(2), r = A.size(3), oh = B.size(3);
  const int64_t R = idx.size(0), K = idx.size(2);
  const Tensor xc = x.contiguous(), Ac = A.contiguous(), Bc = B.contiguous();
  const Tensor idx64 = idx.to(at::kLong).contiguous(), w32 = w.to(at::kFloat).contiguous();
  const Tensor rid = route_ids.to(at::kLong).contiguous();
  std::optional<Tensor> basec;
  if (base.has_value()) basec = base->contiguous();
  const int sms = sm_count(x.device().index());
  const int64_t splits = routedlora::decode_splits(N, h, dh, sms);
  Tensor part = at::empty({routedlora::decode_part_numel(N, h, K, r, splits, params)}, x.options().dtype(at::kFloat));
  auto [y, saved] = decode_outputs(x, A, B, idx, params);
  const cudaError_t err = routedlora::launch_decode_forward(
      dtype, xc.data_ptr(), Ac.data_ptr(), Bc.data_ptr(), idx64.data_ptr<int64_t>(), w32.data_ptr<float>(),
      rid.data_ptr<int64_t>(), basec.has_value() ? basec->data_ptr() : nullptr, y.data_ptr(),
      saved.data_ptr<float>(), part.data_ptr<float>(), N, h, m, dh, r, oh, R, K, splits, params,
      static_cast<float>(scale), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "routedlora_cuda::decode_forward (N=", N, ", h=", h, ", r=", r, ", K=", K,
              ", o/h=", oh, "): ", cudaGetErrorString(err));
  return {y, saved};
}

void check_group_args(const Tensor& route_ids, int64_t R) {
  TORCH_CHECK(route_ids.dim() == 1, "route_ids: expected (N,), got ", route_ids.sizes());
  TORCH_CHECK(!route_ids.is_floating_point(), "route_ids: expected integers, got ", route_ids.scalar_type());
  TORCH_CHECK(R >= 0, "R: expected >= 0, got ", R);
}

std::tuple<Tensor, Tensor, Tensor> group_outputs(const Tensor& route_ids, int64_t R) {
  const auto opts = route_ids.options().dtype(at::kLong);
  return {at::empty({route_ids.size(0)}, opts), at::empty({route_ids.size(0)}, opts), at::empty({R + 1}, opts)};
}

std::tuple<Tensor, Tensor, Tensor> group_by_row_meta(const Tensor& route_ids, int64_t R) {
  check_group_args(route_ids, R);
  return group_outputs(route_ids, R);
}

std::tuple<Tensor, Tensor, Tensor> group_by_row_cuda(const Tensor& route_ids, int64_t R) {
  check_group_args(route_ids, R);
  TORCH_CHECK(route_ids.is_cuda(), "route_ids: expected a CUDA tensor, got one on ", route_ids.device());
  const c10::cuda::CUDAGuard guard(route_ids.device());
  auto [order, srows, offs] = group_outputs(route_ids, R);
  const Tensor rid = route_ids.to(at::kLong).contiguous();
  Tensor scratch = at::empty({routedlora::group_scratch_numel(R)}, route_ids.options().dtype(at::kInt));
  const cudaError_t err =
      routedlora::launch_group_by_row(rid.data_ptr<int64_t>(), rid.size(0), R, order.data_ptr<int64_t>(),
                                      srows.data_ptr<int64_t>(), offs.data_ptr<int64_t>(),
                                      scratch.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "routedlora_cuda::group_by_row (N=", rid.size(0), ", R=", R, "): ",
              cudaGetErrorString(err));
  return {order, srows, offs};
}

}  // namespace

TORCH_LIBRARY(routedlora_cuda, m) {
  m.def("decode_forward(Tensor x, Tensor A, Tensor B, Tensor idx, Tensor w, Tensor route_ids, Tensor? base, "
        "float scale, bool params) -> (Tensor, Tensor)");
  m.def("group_by_row(Tensor route_ids, int R) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(routedlora_cuda, CUDA, m) {
  m.impl("decode_forward", &decode_forward_cuda);
  m.impl("group_by_row", &group_by_row_cuda);
}

TORCH_LIBRARY_IMPL(routedlora_cuda, Meta, m) {
  m.impl("decode_forward", &decode_forward_meta);
  m.impl("group_by_row", &group_by_row_meta);
}
