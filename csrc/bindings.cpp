// torch custom op over the CUDA launcher: namespace `routedlora_cuda`.
//
//   group_by_row(route_ids, R) -> (order, srows, offs)
//
// It has a CUDA implementation and a Meta one (shapes only), so torch.compile and fake
// tensors trace through it without running a kernel. This file is the only one that
// includes torch: the kernels themselves build with the CUDA toolkit alone. Checks here
// are the ones whose failure would reach a kernel as a bad pointer or a bad size; index
// values are never read on the host (no sync): the kernel sorts an id outside [0, R)
// after every valid token instead.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "routedlora_kernels.h"

namespace {

using at::Tensor;

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
  m.def("group_by_row(Tensor route_ids, int R) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(routedlora_cuda, CUDA, m) {
  m.impl("group_by_row", &group_by_row_cuda);
}

TORCH_LIBRARY_IMPL(routedlora_cuda, Meta, m) {
  m.impl("group_by_row", &group_by_row_meta);
}
