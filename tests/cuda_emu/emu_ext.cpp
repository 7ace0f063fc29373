// Test-only extension: the CUDA kernels of csrc/kernels/, built for the CPU with the
// emulation header and launched with small, odd launch geometries; and the CUDA ops of
// csrc/cuda/*.cu themselves (checks, layouts, launches), run against the CUDA runtime
// shim (shim/) on CPU tensors, unregistered.
#include <torch/extension.h>

#include "common/bn_relu_args.h"
#include "common/pool2x2_args.h"
// clang-format off
#include "cuda_emu.h"
#include "kernels/bn_relu.cuh"
#include "kernels/conv3x3.cuh"
#include "kernels/pool2x2.cuh"
#include "selftest_kernels.cuh"
#include "selftest_wmma.cuh"

// The launchers as the library builds them, minus their registration with the dispatcher
// (the real library registers the CUDA ops).
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, key, m) [[maybe_unused]] static void C10_CONCATENATE(unregistered_, C10_UID)(torch::Library & m)
#include "cuda/conv_bn_relu.cu"
#include "cuda/pool2x2.cu"
// clang-format on

namespace {

using at::Tensor;
using segnet::kernels::LaunchConfig;
using segnet::kernels::PoolDims;

void set_schedule(const std::string& name) {
  using cuda_emu::Schedule;
  if (name == "free") cuda_emu::schedule() = Schedule::Free;
  else if (name == "warps_forward") cuda_emu::schedule() = Schedule::WarpsForward;
  else if (name == "warps_reverse") cuda_emu::schedule() = Schedule::WarpsReverse;
  else TORCH_CHECK_VALUE(false, "schedule must be free, warps_forward or warps_reverse, got ", name);
}

void set_block_order(const std::string& name) {
  using cuda_emu::BlockOrder;
  if (name == "forward") cuda_emu::block_order() = BlockOrder::Forward;
  else if (name == "reverse") cuda_emu::block_order() = BlockOrder::Reverse;
  else if (name == "shuffled") cuda_emu::block_order() = BlockOrder::Shuffled;
  else TORCH_CHECK_VALUE(false, "block order must be forward, reverse or shuffled, got ", name);
}

// The shim's recording since the last call, emptied.
std::vector<std::string> take_recording() {
  std::lock_guard<std::mutex> lock(cuda_emu::recording_mutex());
  return std::exchange(cuda_emu::recording(), {});
}

void queue_times(std::vector<double> ms) { cuda_emu::fake_timer().queue(std::move(ms)); }
int timings() { return cuda_emu::fake_timer().calls(); }
std::vector<std::string> kernel_choices() { return segnet::KernelChoices::instance().describe_all(); }
void clear_kernel_choices() { segnet::KernelChoices::instance().clear(); }

// Whether the kernels run their 64-bit index path (set by the tests; the library uses it
// only from 2^31 elements).
bool& index64() {
  static bool on = false;
  return on;
}
void set_index64(bool on) { index64() = on; }
LaunchConfig config(int threads, int64_t max_blocks) { return LaunchConfig{threads, max_blocks, index64()}; }

// n / d and n % d by the 32-bit Divider (kernels/launch.cuh), for its own test.
std::tuple<Tensor, Tensor> divide(const Tensor& n_in, int64_t d) {
  const Tensor n = n_in.to(at::kLong).contiguous();
  Tensor q = at::empty_like(n), r = at::empty_like(n);
  const segnet::kernels::Divider<uint32_t> divider(d);
  for (int64_t i = 0; i < n.numel(); ++i) {
    const auto v = uint32_t(n.const_data_ptr<int64_t>()[i]);
    q.mutable_data_ptr<int64_t>()[i] = divider.div(v);
    r.mutable_data_ptr<int64_t>()[i] = divider.mod(v);
  }
  return {q, r};
}

PoolDims dims_of(const segnet::PoolGeometry& g) { return {g.N, g.C, g.H, g.W, g.Ho, g.Wo}; }

// Outputs start poisoned, so an element a kernel fails to write shows up in the comparison.
Tensor poisoned(at::IntArrayRef size, const at::TensorOptions& options,
                at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  return at::empty(size, options.memory_format(format)).fill_(77);
}

#define EMU_DISPATCH(TYPE, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, "emu", __VA_ARGS__)

std::tuple<Tensor, Tensor> max_pool2x2(const Tensor& x_in, bool ceil_mode, int threads,
                                       int64_t max_blocks) {
  const auto g = segnet::pool_geometry(x_in, ceil_mode);
  const Tensor x = x_in.contiguous(g.format);
  Tensor values = poisoned({g.N, g.C, g.Ho, g.Wo}, x.options(), g.format);
  Tensor packed = poisoned({segnet::packed_bytes(g.windows())}, x.options().dtype(at::kByte));
  EMU_DISPATCH(x.scalar_type(), [&] {
    segnet::kernels::launch_max_pool2x2(x.const_data_ptr<scalar_t>(), values.mutable_data_ptr<scalar_t>(),
                                        packed.mutable_data_ptr<uint8_t>(), dims_of(g),
                                        g.channels_last(), nullptr, config(threads, max_blocks));
  });
  return {values, packed};
}

Tensor max_unpool2x2(const Tensor& values_in, const Tensor& packed_in, std::vector<int64_t> output_size,
                     int threads, int64_t max_blocks) {
  const auto g = segnet::unpool_geometry(values_in, packed_in, output_size);
  const Tensor values = values_in.contiguous(g.format), packed = packed_in.contiguous();
  Tensor y = poisoned({g.N, g.C, g.H, g.W}, values.options(), g.format);
  EMU_DISPATCH(values.scalar_type(), [&] {
    segnet::kernels::launch_max_unpool2x2(values.const_data_ptr<scalar_t>(), packed.const_data_ptr<uint8_t>(),
                                          y.mutable_data_ptr<scalar_t>(), dims_of(g), g.channels_last(),
                                          nullptr, config(threads, max_blocks));
  });
  return y;
}

Tensor max_unpool2x2_backward(const Tensor& grad_output_in, const Tensor& packed_in,
                              std::vector<int64_t> pooled_size, int threads, int64_t max_blocks) {
  const auto g = segnet::gather_geometry(grad_output_in, packed_in, pooled_size);
  const Tensor grad_output = grad_output_in.contiguous(g.format), packed = packed_in.contiguous();
  Tensor grad_values = poisoned({g.N, g.C, g.Ho, g.Wo}, grad_output.options(), g.format);
  EMU_DISPATCH(grad_output.scalar_type(), [&] {
    segnet::kernels::launch_max_unpool2x2_backward(
        grad_output.const_data_ptr<scalar_t>(), packed.const_data_ptr<uint8_t>(),
        grad_values.mutable_data_ptr<scalar_t>(), dims_of(g), g.channels_last(), nullptr,
        config(threads, max_blocks));
  });
  return grad_values;
}

// ---- BN + ReLU ----

segnet::kernels::ChannelDims dims_of(const segnet::ChannelLayout& L) { return {L.outer, L.C, L.inner}; }

template <typename A>
const A* ptr(const Tensor& t) {
  return t.const_data_ptr<A>();
}

// The partial-sum buffer is sized exactly (poisoned), so a kernel that writes past its
// plan shows up under the sanitizer build and as garbage in the results.
Tensor partial_buffer(const segnet::kernels::ReductionPlan& plan, const segnet::kernels::ChannelDims& d) {
  return at::full({std::max<int64_t>(1, plan.partial_doubles(d))}, 1e300, at::kDouble);
}

std::tuple<Tensor, Tensor> bn_stats(const Tensor& x_in, int threads, int64_t max_blocks) {
  const auto L = segnet::check_bn_input("bn_stats", x_in, "x");
  const Tensor x = x_in.contiguous(L.format);
  auto opts = x.options().dtype(segnet::acc_type_of(x.scalar_type()));
  Tensor mean = poisoned({L.C}, opts), var = poisoned({L.C}, opts);
  const LaunchConfig cfg = config(threads, max_blocks);
  const auto d = dims_of(L);
  const auto plan = segnet::kernels::plan_reduction(d, L.channels_last(), cfg);
  Tensor partial = partial_buffer(plan, d);
  EMU_DISPATCH(x.scalar_type(), [&] {
    using A = typename segnet::kernels::AccOf<scalar_t>::type;
    segnet::kernels::launch_bn_stats<scalar_t>(x.const_data_ptr<scalar_t>(), d, L.channels_last(),
                                               mean.mutable_data_ptr<A>(), var.mutable_data_ptr<A>(),
                                               partial.mutable_data_ptr<double>(), plan, nullptr, cfg);
  });
  return {mean, var};
}

Tensor scale_shift_relu(const Tensor& x_in, const Tensor& scale, const Tensor& shift, bool relu,
                        const std::optional<Tensor>& residual_in, int threads, int64_t max_blocks) {
  const auto L = segnet::check_bn_input("scale_shift_relu", x_in, "x");
  if (residual_in) segnet::check_same_shape("scale_shift_relu", *residual_in, "residual", x_in);
  const Tensor x = x_in.contiguous(L.format);
  const Tensor residual = residual_in ? residual_in->contiguous(L.format) : Tensor();
  Tensor y = poisoned(x.sizes(), x.options(), L.format);
  EMU_DISPATCH(x.scalar_type(), [&] {
    using A = typename segnet::kernels::AccOf<scalar_t>::type;
    segnet::kernels::launch_scale_shift_relu<scalar_t>(
        x.const_data_ptr<scalar_t>(), dims_of(L), ptr<A>(scale), ptr<A>(shift), relu,
        residual_in ? residual.const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(), nullptr,
        config(threads, max_blocks));
  });
  return y;
}

std::tuple<Tensor, Tensor> bn_relu_backward_reduce(const Tensor& dy_in, const Tensor& x_in, const Tensor& scale,
                                                   const Tensor& shift, const Tensor& mean, bool relu, int threads,
                                                   int64_t max_blocks) {
  const auto L = segnet::check_bn_input("bn_relu_backward_reduce", x_in, "x");
  const Tensor x = x_in.contiguous(L.format), dy = dy_in.contiguous(L.format);
  Tensor sum_g = poisoned({L.C}, scale.options()), sum_gc = poisoned({L.C}, scale.options());
  const LaunchConfig cfg = config(threads, max_blocks);
  const auto d = dims_of(L);
  const auto plan = segnet::kernels::plan_reduction(d, L.channels_last(), cfg);
  Tensor partial = partial_buffer(plan, d);
  EMU_DISPATCH(x.scalar_type(), [&] {
    using A = typename segnet::kernels::AccOf<scalar_t>::type;
    segnet::kernels::launch_bn_relu_backward_reduce<scalar_t>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), d, L.channels_last(), ptr<A>(scale),
        ptr<A>(shift), ptr<A>(mean), relu, sum_g.mutable_data_ptr<A>(), sum_gc.mutable_data_ptr<A>(),
        partial.mutable_data_ptr<double>(), plan, nullptr, cfg);
  });
  return {sum_g, sum_gc};
}

Tensor bn_relu_backward_apply(const Tensor& dy_in, const Tensor& x_in, const Tensor& scale, const Tensor& shift,
                              const Tensor& mean, const Tensor& k1, const Tensor& k2, const Tensor& k3, bool relu,
                              int threads, int64_t max_blocks) {
  const auto L = segnet::check_bn_input("bn_relu_backward_apply", x_in, "x");
  const Tensor x = x_in.contiguous(L.format), dy = dy_in.contiguous(L.format);
  Tensor dx = poisoned(x.sizes(), x.options(), L.format);
  EMU_DISPATCH(x.scalar_type(), [&] {
    using A = typename segnet::kernels::AccOf<scalar_t>::type;
    segnet::kernels::launch_bn_relu_backward_apply<scalar_t>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dims_of(L), ptr<A>(scale), ptr<A>(shift),
        ptr<A>(mean), ptr<A>(k1), ptr<A>(k2), ptr<A>(k3), relu, dx.mutable_data_ptr<scalar_t>(), nullptr,
        config(threads, max_blocks));
  });
  return dx;
}

// x [N, Cin, H, W] (either layout), weight [Cout, Cin, 3, 3] -> y in x's layout
Tensor conv3x3_scale_shift_relu(const Tensor& x_in, const Tensor& weight_in, const Tensor& scale, const Tensor& shift,
                                bool relu, int64_t splits) {
  segnet::check_conv_epilogue("conv3x3_scale_shift_relu", x_in, weight_in, scale, shift, 1);
  const Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const Tensor weight = weight_in.contiguous(at::MemoryFormat::ChannelsLast);
  Tensor y = poisoned({x.size(0), weight.size(0), x.size(2), x.size(3)}, x.options(), at::MemoryFormat::ChannelsLast);
  const segnet::kernels::Conv3x3Dims d{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "emu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      TORCH_CHECK_VALUE(segnet::kernels::conv3x3_supports<scalar_t>(d.Cin), "Cin ", d.Cin, " is not whole vectors");
      Tensor split_sums = poisoned({splits, d.pixels(), d.Cout}, x.options().dtype(at::kFloat));
      segnet::kernels::launch_conv3x3_scale_shift_relu<scalar_t>(
          x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), ptr<float>(scale), ptr<float>(shift), relu,
          y.mutable_data_ptr<scalar_t>(), d, nullptr, int(splits), split_sums.mutable_data_ptr<float>());
    } else {
      TORCH_CHECK_VALUE(false, "the tensor-core convolution takes no float64");
    }
  });
  return y;
}

// The training forward of the tensor-core kernel: (z, mean, var) through the tiles' moments.
std::tuple<Tensor, Tensor, Tensor> conv3x3_bn_stats(const Tensor& x_in, const Tensor& weight_in,
                                                    const std::optional<Tensor>& bias) {
  const Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK_VALUE(x.scalar_type() != at::kDouble, "the tensor-core convolution takes no float64");
  return segnet::conv3x3_bn_stats(x, weight_in, bias ? *bias : Tensor());
}

// Shared-memory wavefronts of the WMMA loads and stores since the last call, and the
// conflict-free minimum.
std::tuple<int64_t, int64_t> bank_traffic() {
  std::lock_guard<std::mutex> lock(cuda_emu::bank_mutex());
  const auto t = std::exchange(cuda_emu::bank_traffic(), {});
  return {int64_t(t.wavefronts), int64_t(t.ideal)};
}

// ---- the emulator's own tests ----

Tensor block_sum(const Tensor& x, bool sync, int threads, int blocks) {
  Tensor out = at::zeros({1}, x.options());
  auto kernel = sync ? selftest::block_sum<true> : selftest::block_sum<false>;
  SEGNET_LAUNCH(kernel, blocks, threads, nullptr, x.const_data_ptr<float>(), x.numel(),
                out.mutable_data_ptr<float>());
  return out;
}

// Global memory traffic (cuda_emu::Traffic) of the launches between count_traffic(true)
// and count_traffic(false); turning it on clears the counts.
void count_traffic(bool on) {
  cuda_emu::counting() = on;
  if (on) cuda_emu::traffic() = {};
}
std::map<std::string, int64_t> traffic() {
  const cuda_emu::Traffic& t = cuda_emu::traffic();
  return {{"load_requests", t.load_requests}, {"load_sectors", t.load_sectors},
          {"store_requests", t.store_requests}, {"store_sectors", t.store_sectors}};
}

Tensor strided_copy(const Tensor& x, int64_t n, int stride, bool odd_lanes_skip, int threads, int blocks) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat && (n - 1) * stride < x.numel());
  Tensor y = at::empty({n}, x.options());
  auto kernel = selftest::strided_copy;
  SEGNET_LAUNCH(kernel, blocks, threads, nullptr, x.const_data_ptr<float>(), n, stride, odd_lanes_skip,
                y.mutable_data_ptr<float>());
  return y;
}

// a @ b through selftest::wmma_product on `threads` threads, the operands at leading
// dimensions padded by `pad` elements; b stored column major when b_col_major.
Tensor wmma_product(const Tensor& a, const Tensor& b, bool b_col_major, int64_t pad, int threads) {
  const int64_t K = a.size(1);
  const Tensor ap = at::zeros({16, K + pad}, a.options());
  ap.narrow(1, 0, K).copy_(a);
  const Tensor bp = b_col_major ? at::zeros({16, K + pad}, b.options()) : at::zeros({K, 16 + pad}, b.options());
  (b_col_major ? bp.narrow(1, 0, K) : bp.narrow(1, 0, 16)).copy_(b_col_major ? b.t() : b);
  Tensor c = at::full({16, 20}, std::nan(""), a.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "emu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      auto kernel = selftest::wmma_product<scalar_t>;
      SEGNET_LAUNCH(kernel, 1, threads, nullptr, ap.const_data_ptr<scalar_t>(), int(ap.size(1)), bp.const_data_ptr<scalar_t>(),
                    int(bp.size(1)), b_col_major, int(K), c.mutable_data_ptr<float>());
    }
  });
  return c.narrow(1, 0, 16);
}

Tensor cp_async_exchange(const Tensor& x, bool wait, bool sync) {
  Tensor out = at::zeros_like(x);
  auto kernel = selftest::cp_async_exchange;
  SEGNET_LAUNCH(kernel, 1, x.numel() / 4, nullptr, x.const_data_ptr<float>(), wait, sync, out.mutable_data_ptr<float>());
  return out;
}

Tensor read_shared_first(int threads, int blocks) {
  Tensor out = at::zeros({int64_t(threads) * blocks}, at::kFloat);
  auto kernel = selftest::read_shared_first;
  SEGNET_LAUNCH(kernel, blocks, threads, nullptr, out.mutable_data_ptr<float>());
  return out;
}

Tensor shuffles(int threads, int blocks, int width) {
  Tensor out = at::full({int64_t(threads) * blocks * 5}, -1, at::kInt);
  auto kernel = selftest::shuffles;
  SEGNET_LAUNCH(kernel, blocks, threads, nullptr, out.mutable_data_ptr<int>(), width);
  return out.view({-1, 5});
}

Tensor atomics(int threads, int blocks) {
  const int nwarps = (threads * blocks + 31) / 32;
  Tensor counters = at::zeros({nwarps + 2}, at::kLong);
  auto kernel = selftest::atomics;
  SEGNET_LAUNCH(kernel, blocks, threads, nullptr, counters.mutable_data_ptr<int64_t>(), nwarps);
  return counters;
}

void shuffle_past_partial_warp(int threads) {
  Tensor out = at::zeros({threads}, at::kFloat);
  auto kernel = selftest::shuffle_past_partial_warp;
  SEGNET_LAUNCH(kernel, 1, threads, nullptr, out.mutable_data_ptr<float>());
}

Tensor warp_sync_with_mask(int threads, uint32_t mask, int returning) {
  Tensor out = at::full({threads}, -1.f, at::kFloat);
  auto kernel = selftest::warp_sync_with_mask;
  SEGNET_LAUNCH(kernel, 1, threads, nullptr, out.mutable_data_ptr<float>(), mask, returning);
  return out;
}

Tensor copy_off_by_one(const Tensor& x, int threads, int blocks) {
  Tensor y = at::empty_like(x);
  auto kernel = selftest::copy_off_by_one;
  SEGNET_LAUNCH(kernel, blocks, threads, nullptr, x.const_data_ptr<float>(), x.numel(),
                y.mutable_data_ptr<float>());
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_schedule", &set_schedule);
  m.def("set_block_order", &set_block_order);
  m.def("set_index64", &set_index64);
  m.def("divide", &divide);
  m.def("take_recording", &take_recording);
  m.def("queue_times", &queue_times);
  m.def("timings", &timings);
  m.def("kernel_choices", &kernel_choices);
  m.def("clear_kernel_choices", &clear_kernel_choices);
  // csrc/cuda/*.cu, as registered for the CUDA dispatch key
  m.def("cuda_max_pool2x2", &segnet::max_pool2x2_cuda);
  m.def("cuda_max_unpool2x2", &segnet::max_unpool2x2_cuda);
  m.def("cuda_max_unpool2x2_backward", &segnet::max_unpool2x2_backward_cuda);
  m.def("cuda_bn_stats", &segnet::bn_stats_cuda);
  m.def("cuda_scale_shift_relu", &segnet::scale_shift_relu_cuda);
  m.def("cuda_bn_relu_backward_reduce", &segnet::bn_relu_backward_reduce_cuda);
  m.def("cuda_bn_relu_backward_apply", &segnet::bn_relu_backward_apply_cuda);
  m.def("cuda_conv2d_scale_shift_relu", &segnet::conv2d_scale_shift_relu_cuda);
  m.def("cuda_conv2d_bn_stats", &segnet::conv2d_bn_stats_cuda);
  m.def("max_pool2x2", &max_pool2x2);
  m.def("max_unpool2x2", &max_unpool2x2);
  m.def("max_unpool2x2_backward", &max_unpool2x2_backward);
  m.def("bn_stats", &bn_stats);
  m.def("scale_shift_relu", &scale_shift_relu);
  m.def("bn_relu_backward_reduce", &bn_relu_backward_reduce);
  m.def("bn_relu_backward_apply", &bn_relu_backward_apply);
  m.def("conv3x3_scale_shift_relu", &conv3x3_scale_shift_relu, py::arg("x"), py::arg("weight"), py::arg("scale"),
        py::arg("shift"), py::arg("relu"), py::arg("splits") = 1);
  m.def("conv3x3_splits", [](int64_t N, int64_t Cin, int64_t H, int64_t W, int64_t Cout, int sms, int element_size) {
    const segnet::kernels::Conv3x3Dims d{N, Cin, H, W, Cout};
    return segnet::kernels::conv3x3_splits(d, sms, segnet::kernels::conv3x3_steps(d, element_size));
  });
  m.def("conv3x3_bn_stats", &conv3x3_bn_stats);
  m.def("block_sum", &block_sum);
  m.def("shuffles", &shuffles);
  m.def("atomics", &atomics);
  m.def("shuffle_past_partial_warp", &shuffle_past_partial_warp);
  m.def("warp_sync_with_mask", &warp_sync_with_mask);
  m.def("copy_off_by_one", &copy_off_by_one);
  m.def("count_traffic", &count_traffic);
  m.def("traffic", &traffic);
  m.def("strided_copy", &strided_copy);
  m.def("read_shared_first", &read_shared_first);
  m.def("wmma_product", &wmma_product);
  m.def("cp_async_exchange", &cp_async_exchange);
  m.def("bank_traffic", &bank_traffic);
}
