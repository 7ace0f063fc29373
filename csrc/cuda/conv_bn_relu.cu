// CUDA registrations of the BN+ReLU ops and the convolution with the inference epilogue: the
// checks and layout shared with the CPU kernels (common/bn_relu_args.h), then the launchers
// of kernels/bn_relu.cuh and kernels/conv3x3.cuh on the current stream. The convolution
// runs our kernel only for the shapes where it was timed faster than cuDNN
// (common/kernel_choice.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <sstream>
#include <string>

#include "common/bn_relu_args.h"
#include "common/kernel_choice.h"
#include "kernels/bn_relu.cuh"
#include "kernels/conv3x3.cuh"

#include <type_traits>

namespace segnet {
namespace {

using at::Tensor;

#define SEGNET_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

kernels::ChannelDims dims_of(const ChannelLayout& L) { return {L.outer, L.C, L.inner}; }

template <typename A>
const A* ptr(const Tensor& t) {
  return t.const_data_ptr<A>();
}

std::tuple<Tensor, Tensor> bn_stats_cuda(const Tensor& x_in) {
  const auto L = check_bn_input("bn_stats", x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(L.format);
  auto opts = x.options().dtype(acc_type_of(x.scalar_type()));
  Tensor mean = at::empty({L.C}, opts), var = at::empty({L.C}, opts);
  const auto d = dims_of(L);
  const auto plan = kernels::plan_reduction(d, L.channels_last(), {});
  Tensor partial = at::empty({std::max<int64_t>(1, plan.partial_doubles(d))}, x.options().dtype(at::kDouble));
  SEGNET_DISPATCH_FLOATING(x.scalar_type(), "bn_stats_cuda", [&] {
    using A = typename kernels::AccOf<scalar_t>::type;
    kernels::launch_bn_stats<scalar_t>(x.const_data_ptr<scalar_t>(), d, L.channels_last(), mean.mutable_data_ptr<A>(),
                                       var.mutable_data_ptr<A>(), partial.mutable_data_ptr<double>(), plan,
                                       c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mean, var};
}

Tensor scale_shift_relu_cuda(const Tensor& x_in, const Tensor& scale_in, const Tensor& shift_in, bool relu,
                             const std::optional<Tensor>& residual_in) {
  const char* op = "scale_shift_relu";
  const auto L = check_bn_input(op, x_in, "x");
  check_channel_vector(op, scale_in, "scale", x_in);
  check_channel_vector(op, shift_in, "shift", x_in);
  const bool add = residual_in.has_value() && residual_in->defined();
  if (add) check_same_shape(op, *residual_in, "residual", x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(L.format), scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const Tensor residual = add ? residual_in->contiguous(L.format) : Tensor();
  Tensor y = at::empty_like(x, L.format);
  SEGNET_DISPATCH_FLOATING(x.scalar_type(), "scale_shift_relu_cuda", [&] {
    using A = typename kernels::AccOf<scalar_t>::type;
    kernels::launch_scale_shift_relu<scalar_t>(x.const_data_ptr<scalar_t>(), dims_of(L), ptr<A>(scale), ptr<A>(shift),
                                               relu, add ? residual.const_data_ptr<scalar_t>() : nullptr,
                                               y.mutable_data_ptr<scalar_t>(), c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::tuple<Tensor, Tensor> bn_relu_backward_reduce_cuda(const Tensor& grad_y_in, const Tensor& x_in,
                                                        const Tensor& scale_in, const Tensor& shift_in,
                                                        const Tensor& mean_in, bool relu) {
  const char* op = "bn_relu_backward_reduce";
  const auto L = check_bn_input(op, x_in, "x");
  check_same_shape(op, grad_y_in, "grad_y", x_in);
  check_channel_vector(op, scale_in, "scale", x_in);
  check_channel_vector(op, shift_in, "shift", x_in);
  check_channel_vector(op, mean_in, "mean", x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(L.format), dy = grad_y_in.contiguous(L.format);
  const Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous(), mean = mean_in.contiguous();
  Tensor sum_g = at::empty({L.C}, scale.options()), sum_gc = at::empty({L.C}, scale.options());
  const auto d = dims_of(L);
  const auto plan = kernels::plan_reduction(d, L.channels_last(), {});
  Tensor partial = at::empty({std::max<int64_t>(1, plan.partial_doubles(d))}, x.options().dtype(at::kDouble));
  SEGNET_DISPATCH_FLOATING(x.scalar_type(), "bn_relu_backward_reduce_cuda", [&] {
    using A = typename kernels::AccOf<scalar_t>::type;
    kernels::launch_bn_relu_backward_reduce<scalar_t>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), d, L.channels_last(), ptr<A>(scale),
        ptr<A>(shift), ptr<A>(mean), relu, sum_g.mutable_data_ptr<A>(), sum_gc.mutable_data_ptr<A>(),
        partial.mutable_data_ptr<double>(), plan, c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sum_g, sum_gc};
}

Tensor bn_relu_backward_apply_cuda(const Tensor& grad_y_in, const Tensor& x_in, const Tensor& scale_in,
                                   const Tensor& shift_in, const Tensor& mean_in, const Tensor& k1_in,
                                   const Tensor& k2_in, const Tensor& k3_in, bool relu) {
  const auto L = check_backward_apply(grad_y_in, x_in, {{&scale_in, "scale"}, {&shift_in, "shift"}, {&mean_in, "mean"},
                                                         {&k1_in, "k1"}, {&k2_in, "k2"}, {&k3_in, "k3"}});
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(L.format), dy = grad_y_in.contiguous(L.format);
  const Tensor v[6] = {scale_in.contiguous(), shift_in.contiguous(), mean_in.contiguous(),
                       k1_in.contiguous(), k2_in.contiguous(), k3_in.contiguous()};
  Tensor dx = at::empty_like(x, L.format);
  SEGNET_DISPATCH_FLOATING(x.scalar_type(), "bn_relu_backward_apply_cuda", [&] {
    using A = typename kernels::AccOf<scalar_t>::type;
    kernels::launch_bn_relu_backward_apply<scalar_t>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dims_of(L), ptr<A>(v[0]), ptr<A>(v[1]),
        ptr<A>(v[2]), ptr<A>(v[3]), ptr<A>(v[4]), ptr<A>(v[5]), relu, dx.mutable_data_ptr<scalar_t>(),
        c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

// The vendor path: ATen's convolution (cuDNN, with PyTorch's settings: TF32, benchmark,
// determinism, exactly as nn.Conv2d runs it), then the epilogue kernel.
Tensor conv2d_then_epilogue(const Tensor& x, const Tensor& weight, const Tensor& scale, const Tensor& shift,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                            int64_t groups, bool relu) {
  const Tensor z = at::conv2d(x, weight, {}, stride, padding, dilation, groups);
  return scale_shift_relu_cuda(z.contiguous(x.suggest_memory_format()), scale, shift, relu, std::nullopt);
}

// Ours: the tensor-core implicit-GEMM 3x3 / stride 1 / padding 1 kernel with the epilogue
// fused, on channels_last tensors (the weights rearranged to [Cout, 3, 3, Cin]).
Tensor conv3x3_scale_shift_relu(const Tensor& x, const Tensor& weight, const Tensor& scale, const Tensor& shift,
                                bool relu) {
  const Tensor w = weight.contiguous(at::MemoryFormat::ChannelsLast);
  Tensor y = at::empty({x.size(0), weight.size(0), x.size(2), x.size(3)},
                       x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const kernels::Conv3x3Dims d{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0)};
  // split K where the grid would not fill the GPU (SegNet's deepest layers)
  const int splits = kernels::conv3x3_splits(d, kernels::device_sms(x.device().index()),
                                             kernels::conv3x3_steps(d, int(x.element_size())));
  const Tensor split_sums = splits > 1 ? at::empty({splits, d.pixels(), d.Cout}, x.options().dtype(at::kFloat)) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_scale_shift_relu_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      kernels::launch_conv3x3_scale_shift_relu<scalar_t>(
          x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), ptr<float>(scale), ptr<float>(shift), relu,
          y.mutable_data_ptr<scalar_t>(), d, c10::cuda::getCurrentCUDAStream(), splits,
          splits > 1 ? split_sums.mutable_data_ptr<float>() : nullptr);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

// Whether our kernel takes this convolution: 3x3, stride 1, padding 1, one group, channels_last
// 16-bit inputs, or float ones where PyTorch lets convolutions use TF32 (otherwise cuDNN's
// full float precision is what nn.Conv2d gives), whole 16-byte vectors of input channels,
// on a GPU with the sm_80 tensor-core instructions.
bool conv3x3_applies(const Tensor& x, const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, int64_t groups) {
  const auto type = x.scalar_type();
  const bool tensor_cores = type == at::kHalf || type == at::kBFloat16 ||
                            (type == at::kFloat && at::globalContext().allowTF32CuDNN());
  const bool shape = weight.size(2) == 3 && weight.size(3) == 3 && groups == 1 && stride == at::IntArrayRef{1, 1} &&
                     padding == at::IntArrayRef{1, 1} && dilation == at::IntArrayRef{1, 1} && x.numel() > 0 &&
                     weight.size(0) > 0;
  const bool vectors = x.size(1) * x.element_size() % 16 == 0 && reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0;
  return tensor_cores && shape && vectors && x.suggest_memory_format() == at::MemoryFormat::ChannelsLast &&
         kernels::device_has_tensor_core_kernels(x.device().index());
}

// What the per-shape choice (common/kernel_choice.h) is keyed on: everything that changes
// either side's speed.
std::string conv_choice_key(const char* op, const Tensor& x, const Tensor& weight, bool relu) {
  std::ostringstream key;
  key << op << " x" << x.sizes() << " weight" << weight.sizes() << " "
      << c10::toString(x.scalar_type())
      << (x.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? " channels_last" : " contiguous")
      << (x.scalar_type() == at::kFloat && at::globalContext().allowTF32CuDNN() ? " tf32" : "")
      << (at::globalContext().benchmarkCuDNN() ? " benchmark" : "")
      << (at::globalContext().deterministicCuDNN() || at::globalContext().deterministicAlgorithms() ? " deterministic"
                                                                                                    : "")
      << (relu ? " relu" : "")
      << " cuda:" << int(x.device().index());
  return key.str();
}

// run(Impl::Ours) or run(Impl::Vendor), whichever is faster for this shape (timed once per key:
// common/kernel_choice.h); the vendor path where ours does not apply, or while the stream is being
// captured into a CUDA graph (timing needs a synchronisation, which capture forbids).
template <typename Run>
auto run_faster(bool ours_applies, const char* op, const Tensor& x, const Tensor& weight, bool relu, const Run& run) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (!ours_applies || kernels::stream_is_capturing(stream)) return run(Impl::Vendor);
  const Impl impl = KernelChoices::instance().choose(conv_choice_key(op, x, weight, relu), [&](Impl candidate) {
    return kernels::device_time_ms([&] { run(candidate); }, stream);
  });
  return run(impl);
}

Tensor conv2d_scale_shift_relu_cuda(const Tensor& x_in, const Tensor& weight_in, const Tensor& scale_in,
                                    const Tensor& shift_in, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups, bool relu) {
  check_conv_epilogue("conv2d_scale_shift_relu", x_in, weight_in, scale_in, shift_in, groups);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(x_in.suggest_memory_format()), weight = weight_in.contiguous();
  const Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous();
  return run_faster(conv3x3_applies(x, weight, stride, padding, dilation, groups), "conv2d_scale_shift_relu", x,
                    weight, relu, [&](Impl impl) {
    return impl == Impl::Ours ? conv3x3_scale_shift_relu(x, weight, scale, shift, relu)
                              : conv2d_then_epilogue(x, weight, scale, shift, stride, padding, dilation, groups, relu);
  });
}

// Ours in the training forward: z from the tensor-core kernel (scale 1, shift the bias), its
// statistics from the tiles' moments (kernels/conv3x3.cuh).
std::tuple<Tensor, Tensor, Tensor> conv3x3_bn_stats(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  const Tensor w = weight.contiguous(at::MemoryFormat::ChannelsLast);
  const auto f32 = x.options().dtype(at::kFloat);
  const Tensor ones = at::ones({weight.size(0)}, f32);
  const Tensor shift = bias.defined() ? bias.to(at::kFloat).contiguous() : at::zeros({weight.size(0)}, f32);
  Tensor z = at::empty({x.size(0), weight.size(0), x.size(2), x.size(3)},
                       x.options().memory_format(at::MemoryFormat::ChannelsLast));
  Tensor mean = at::empty({weight.size(0)}, f32), var = at::empty({weight.size(0)}, f32);
  const kernels::Conv3x3Dims d{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0)};
  Tensor moments = at::empty({2 * kernels::conv3x3_moments(d)}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_bn_stats_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      kernels::launch_conv3x3_bn_stats<scalar_t>(
          x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), ptr<float>(ones), ptr<float>(shift),
          z.mutable_data_ptr<scalar_t>(), d, reinterpret_cast<kernels::TileMoments*>(moments.mutable_data_ptr<double>()),
          mean.mutable_data_ptr<float>(), var.mutable_data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {z, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> conv2d_bn_stats_cuda(const Tensor& x_in, const Tensor& weight_in,
                                                        const std::optional<Tensor>& bias_in, at::IntArrayRef stride,
                                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                                        int64_t groups) {
  check_conv("conv2d_bn_stats", x_in, weight_in, bias_in ? &*bias_in : nullptr, groups);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(x_in.suggest_memory_format()), weight = weight_in.contiguous();
  const Tensor bias = bias_in && bias_in->defined() ? bias_in->contiguous() : Tensor();
  return run_faster(conv3x3_applies(x, weight, stride, padding, dilation, groups), "conv2d_bn_stats", x, weight,
                    false, [&](Impl impl) -> std::tuple<Tensor, Tensor, Tensor> {
    if (impl == Impl::Ours) return conv3x3_bn_stats(x, weight, bias);
    const Tensor z = at::conv2d(x, weight, bias, stride, padding, dilation, groups);
    auto [mean, var] = bn_stats_cuda(z);
    return {z, mean, var};
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(segnet_ext, CUDA, m) {
  m.impl("conv2d_scale_shift_relu", &conv2d_scale_shift_relu_cuda);
  m.impl("conv2d_bn_stats", &conv2d_bn_stats_cuda);
  m.impl("bn_stats", &bn_stats_cuda);
  m.impl("scale_shift_relu", &scale_shift_relu_cuda);
  m.impl("bn_relu_backward_reduce", &bn_relu_backward_reduce_cuda);
  m.impl("bn_relu_backward_apply", &bn_relu_backward_apply_cuda);
}

}  // namespace segnet
