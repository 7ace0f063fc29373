// Every op's schema, in one place. Kernels register next to their code
// (cpu/*.cpp, cuda/*.cu); fake kernels and autograd are registered in Python
// (segnet_ext/ops.py).
#include <Python.h>
#include <torch/library.h>

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
}
