// Every op's schema, in one place. Kernels register next to their code
// (cpu/*.cpp, cuda/*.cu); fake kernels and autograd are registered in Python
// (segnet_ext/ops.py).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "common/kernel_choice.h"
#include "cpu/vectorize.h"

// Importing segnet_ext._C runs the static registrations below; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(segnet_ext, m) {
  // x: [N, C, H, W] -> values: [N, C, Ho, Wo], packed_indices: uint8 [ceil(N*C*Ho*Wo / 4)]
  m.def("max_pool2x2(Tensor x, bool ceil_mode=False) -> (Tensor values, Tensor packed_indices)");
  // values: [N, C, Ho, Wo] -> y: [N, C, H, W], zero except at each window's arg-max.
  // Also the backward of max_pool2x2 (with grad_values as values).
  m.def("max_unpool2x2(Tensor values, Tensor packed_indices, SymInt[2] output_size) -> Tensor");
  // grad_output: [N, C, H, W] -> grad_values: [N, C, Ho, Wo], gathered at each arg-max.
  m.def("max_unpool2x2_backward(Tensor grad_output, Tensor packed_indices, SymInt[2] pooled_size)"
        " -> Tensor");

  // Batch norm + ReLU in training (rules: common/bn_relu.h). Per-channel vectors are
  // [C], float32 (float64 for float64 x).
  // x: [N, C, H, W] -> mean, var (biased) over N, H, W.
  m.def("bn_stats(Tensor x) -> (Tensor mean, Tensor var)");
  // y = relu(x * scale[c] + shift[c]) (relu=False: no ReLU), in x's memory format.
  m.def("scale_shift_relu(Tensor x, Tensor scale, Tensor shift, bool relu, Tensor? residual=None) -> Tensor");
  // g = grad_y where x * scale + shift passed the ReLU: sum_g = sum g, sum_gc = sum g * (x - mean).
  m.def("bn_relu_backward_reduce(Tensor grad_y, Tensor x, Tensor scale, Tensor shift, Tensor mean, bool relu)"
        " -> (Tensor sum_g, Tensor sum_gc)");
  // grad_x = k1 * g + k2 * (x - mean) + k3, per channel.
  m.def("bn_relu_backward_apply(Tensor grad_y, Tensor x, Tensor scale, Tensor shift, Tensor mean, Tensor k1,"
        " Tensor k2, Tensor k3, bool relu) -> Tensor");
  // Inference epilogue: y = relu(conv2d(x, weight) * scale[co] + shift[co]), in x's memory
  // format. CUDA: cuDNN + the epilogue kernel, or, for 3x3 / stride 1 / padding 1 shapes
  // where it was timed faster, the tensor-core implicit-GEMM kernel (common/kernel_choice.h); CPU: Winograd F(2x2, 3x3) for 3x3 / stride 1 / padding 1 in
  // float32 and float64 (ATen's convolution + the epilogue otherwise).
  m.def("conv2d_scale_shift_relu(Tensor x, Tensor weight, Tensor scale, Tensor shift, int[2] stride,"
        " int[2] padding, int[2] dilation, int groups, bool relu) -> Tensor");
  // Training forward: z = conv2d(x, weight, bias) in x's memory format, and z's per-channel
  // mean and biased variance (as bn_stats(z)). CUDA: cuDNN + bn_stats, or, where it was timed
  // faster, the tensor-core kernel whose epilogue sums each tile's moments (no second read of
  // z); CPU: ATen's convolution + bn_stats.
  m.def("conv2d_bn_stats(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation,"
        " int groups) -> (Tensor z, Tensor mean, Tensor var)");

  // The x86-64 level the CPU kernels run at: "AVX512", "AVX2" or "DEFAULT", as
  // torch.backends.cpu.get_cpu_capability() names ATen's (cpu/vectorize.h).
  m.def("cpu_capability() -> str", [] { return std::string(segnet::cpu_level_name(segnet::cpu_level())); });
  // The per-shape choices between our CUDA kernels and cuDNN made so far (common/kernel_choice.h).
  m.def("kernel_choices() -> str[]", [] { return segnet::KernelChoices::instance().describe_all(); });
}
