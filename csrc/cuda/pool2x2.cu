// CUDA registrations of the pooling ops: checks and allocation (shared with the CPU
// kernels), then the launchers of kernels/pool2x2.cuh on the current stream.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/pool2x2_args.h"
#include "kernels/pool2x2.cuh"

namespace segnet {
namespace {

using at::Tensor;

kernels::PoolDims dims_of(const PoolGeometry& g) { return {g.N, g.C, g.H, g.W, g.Ho, g.Wo}; }

#define SEGNET_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

std::tuple<Tensor, Tensor> max_pool2x2_cuda(const Tensor& x_in, bool ceil_mode) {
  const PoolGeometry g = pool_geometry(x_in, ceil_mode);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(g.format);
  Tensor values = at::empty({g.N, g.C, g.Ho, g.Wo}, x.options().memory_format(g.format));
  Tensor packed = at::empty({packed_bytes(g.windows())}, x.options().dtype(at::kByte));
  SEGNET_DISPATCH_FLOATING(x.scalar_type(), "max_pool2x2_cuda", [&] {
    kernels::launch_max_pool2x2(x.const_data_ptr<scalar_t>(), values.mutable_data_ptr<scalar_t>(),
                                packed.mutable_data_ptr<uint8_t>(), dims_of(g), g.channels_last(),
                                c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {values, packed};
}

Tensor max_unpool2x2_cuda(const Tensor& values_in, const Tensor& packed_in,
                          at::IntArrayRef output_size) {
  const PoolGeometry g = unpool_geometry(values_in, packed_in, output_size);
  const c10::cuda::CUDAGuard guard(values_in.device());
  const Tensor values = values_in.contiguous(g.format), packed = packed_in.contiguous();
  Tensor y = at::empty({g.N, g.C, g.H, g.W}, values.options().memory_format(g.format));
  SEGNET_DISPATCH_FLOATING(values.scalar_type(), "max_unpool2x2_cuda", [&] {
    kernels::launch_max_unpool2x2(values.const_data_ptr<scalar_t>(),
                                  packed.const_data_ptr<uint8_t>(), y.mutable_data_ptr<scalar_t>(),
                                  dims_of(g), g.channels_last(), c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

Tensor max_unpool2x2_backward_cuda(const Tensor& grad_output_in, const Tensor& packed_in,
                                   at::IntArrayRef pooled_size) {
  const PoolGeometry g = gather_geometry(grad_output_in, packed_in, pooled_size);
  const c10::cuda::CUDAGuard guard(grad_output_in.device());
  const Tensor grad_output = grad_output_in.contiguous(g.format), packed = packed_in.contiguous();
  Tensor grad_values =
      at::empty({g.N, g.C, g.Ho, g.Wo}, grad_output.options().memory_format(g.format));
  SEGNET_DISPATCH_FLOATING(grad_output.scalar_type(), "max_unpool2x2_backward_cuda", [&] {
    kernels::launch_max_unpool2x2_backward(
        grad_output.const_data_ptr<scalar_t>(), packed.const_data_ptr<uint8_t>(),
        grad_values.mutable_data_ptr<scalar_t>(), dims_of(g), g.channels_last(),
        c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_values;
}

}  // namespace

TORCH_LIBRARY_IMPL(segnet_ext, CUDA, m) {
  m.impl("max_pool2x2", &max_pool2x2_cuda);
  m.impl("max_unpool2x2", &max_unpool2x2_cuda);
  m.impl("max_unpool2x2_backward", &max_unpool2x2_backward_cuda);
}

}  // namespace segnet
