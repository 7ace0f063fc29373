// Winograd F(2x2, 3x3) convolution with the inference epilogue on the CPU (winograd3x3.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace segnet {

// True where conv2d_scale_shift_relu runs the Winograd path: float32 / float64 on the CPU, a
// 3x3 kernel, stride 1, padding 1, dilation 1, one group. (Where it is faster than oneDNN's
// direct convolution is the caller's choice: see segnet_ext/fused.py.)
bool winograd3x3_applies(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// x: [N, Cin, H, W], weight: [Cout, Cin, 3, 3], scale / shift: [Cout] of x's dtype; the
// result keeps x's memory format. Arguments already checked (check_conv_epilogue).
at::Tensor winograd3x3_scale_shift_relu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                        const at::Tensor& shift, bool relu);

}  // namespace segnet
