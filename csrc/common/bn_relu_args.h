// Argument checks and layout of the BN+ReLU ops: one place for every backend.
#pragma once

#include <ATen/ATen.h>

namespace segnet {

// A 4-D activation seen as [outer, C, inner]: NCHW is [N, C, H*W]; channels_last is
// [N*H*W, C, 1]. Kernels read and write tensors dense in `format`.
struct ChannelLayout {
  int64_t outer, C, inner;
  at::MemoryFormat format;
  bool channels_last() const { return format == at::MemoryFormat::ChannelsLast; }
  int64_t count() const { return outer * inner; }  // values per channel
};

inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline ChannelLayout check_bn_input(const char* op, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": ", name, " must be a 4-D tensor [N, C, H, W], got ", x.dim(),
                    "-D with shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
                   ": ", name, " must be float32, float64, float16 or bfloat16, got ", dt);
  // NCHW when both layouts fit (e.g. 1x1 maps): the two orders are then the same.
  const auto format = x.is_contiguous() ? at::MemoryFormat::Contiguous : x.suggest_memory_format();
  const bool cl = format == at::MemoryFormat::ChannelsLast;
  return {cl ? x.size(0) * x.size(2) * x.size(3) : x.size(0), x.size(1), cl ? 1 : x.size(2) * x.size(3),
          format};
}

// A per-channel vector: [C], the accumulation type of x (float32; float64 for float64 x).
inline void check_channel_vector(const char* op, const at::Tensor& v, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == x.size(1), op, ": ", name, " must have shape [C] = [",
                    x.size(1), "] for x of shape ", x.sizes(), ", got ", v.sizes());
  TORCH_CHECK_TYPE(v.scalar_type() == acc_type_of(x.scalar_type()), op, ": ", name, " must be ",
                   acc_type_of(x.scalar_type()), " for ", x.scalar_type(), " x, got ", v.scalar_type());
  TORCH_CHECK_VALUE(v.device() == x.device(), op, ": ", name, " is on ", v.device(), " but x is on ",
                    x.device());
}

inline void check_same_shape(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(a.sizes() == x.sizes(), op, ": ", a_name, " must have the shape of x ", x.sizes(),
                    ", got ", a.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == x.scalar_type(), op, ": ", a_name, " must have the dtype of x (",
                   x.scalar_type(), "), got ", a.scalar_type());
  TORCH_CHECK_VALUE(a.device() == x.device(), op, ": ", a_name, " is on ", a.device(), " but x is on ",
                    x.device());
}

// bn_relu_backward_apply: grad_y like x, six per-channel vectors.
inline ChannelLayout check_backward_apply(const at::Tensor& grad_y, const at::Tensor& x,
                                          std::initializer_list<std::pair<const at::Tensor*, const char*>> vectors) {
  const char* op = "bn_relu_backward_apply";
  const auto L = check_bn_input(op, x, "x");
  check_same_shape(op, grad_y, "grad_y", x);
  for (const auto& [v, name] : vectors) check_channel_vector(op, *v, name, x);
  return L;
}

// conv2d_scale_shift_relu: x [N, Cin, H, W], weight [Cout, Cin / groups, kh, kw] of x's dtype,
// scale and shift [Cout] of the accumulation type.
// A convolution's x and weight (and bias, where given): shapes, dtypes and devices.
inline void check_conv(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias,
                       int64_t groups) {
  check_bn_input(op, x, "x");
  TORCH_CHECK_VALUE(weight.dim() == 4, op, ": weight must be 4-D [Cout, Cin / groups, kh, kw], got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(groups >= 1 && x.size(1) == weight.size(1) * groups, op, ": x has ", x.size(1),
                    " channels but weight of shape ", weight.sizes(), " with groups = ", groups, " expects ",
                    weight.size(1) * groups);
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, ": weight must have the dtype of x (",
                   x.scalar_type(), "), got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), op, ": weight is on ", weight.device(), " but x is on ", x.device());
  if (bias != nullptr && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape [Cout] = [",
                      weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), op, ": bias must have the dtype of x (", x.scalar_type(),
                     "), got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == x.device(), op, ": bias is on ", bias->device(), " but x is on ", x.device());
  }
}

// The convolution with the inference epilogue's arguments: check_conv, then scale and shift.
inline void check_conv_epilogue(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                const at::Tensor& shift, int64_t groups) {
  check_conv(op, x, weight, nullptr, groups);
  for (auto [v, name] : {std::pair{&scale, "scale"}, std::pair{&shift, "shift"}}) {
    TORCH_CHECK_VALUE(v->dim() == 1 && v->size(0) == weight.size(0), op, ": ", name, " must have shape [Cout] = [",
                      weight.size(0), "], got ", v->sizes());
    TORCH_CHECK_TYPE(v->scalar_type() == acc_type_of(x.scalar_type()), op, ": ", name, " must be ",
                     acc_type_of(x.scalar_type()), " for ", x.scalar_type(), " x, got ", v->scalar_type());
    TORCH_CHECK_VALUE(v->device() == x.device(), op, ": ", name, " is on ", v->device(), " but x is on ", x.device());
  }
}

}  // namespace segnet
