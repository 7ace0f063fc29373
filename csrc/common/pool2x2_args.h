// Argument checks and geometry of the pooling ops: one place for every backend
// (CPU, CUDA and the CUDA emulation build), so each error reads the same everywhere.
#pragma once

#include <ATen/ATen.h>

#include "common/pool2x2.h"

namespace segnet {

struct PoolGeometry {
  int64_t N, C, H, W;  // the full-resolution side: pooling input, unpooling output
  int64_t Ho, Wo;      // the pooled side: values, packed windows
  at::MemoryFormat format;  // of the tensors the kernel reads and writes
  int64_t windows() const { return N * C * Ho * Wo; }
  bool channels_last() const { return format == at::MemoryFormat::ChannelsLast; }
};

inline void check_activation(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, op, ": ", name, " must be a 4-D tensor [N, C, H, W], got ",
                    t.dim(), "-D with shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", dt);
}

// packed: uint8 [ceil(windows / 4)] on the device of `like`
inline void check_packed(const char* op, const at::Tensor& packed, int64_t windows,
                         const at::Tensor& like, const char* like_name) {
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op,
                   ": packed_indices must be uint8 (2 bits per window), got ", packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() == 1 && packed.numel() == packed_bytes(windows), op,
                    ": packed_indices must be 1-D with ceil(", windows, " windows / 4) = ",
                    packed_bytes(windows), " bytes for ", like_name, " of shape ", like.sizes(),
                    ", got shape ", packed.sizes());
  TORCH_CHECK_VALUE(packed.device() == like.device(), op, ": packed_indices is on ",
                    packed.device(), " but ", like_name, " is on ", like.device());
}

// A 2x2/stride-2 pooling maps `full` to `pooled` in floor or ceil mode iff
// full is 2*pooled - 1, 2*pooled or 2*pooled + 1 (torch's MaxUnpool2d accepts the same).
inline void check_extents(const char* op, int64_t full, int64_t pooled, const char* full_name,
                          const char* pooled_name) {
  TORCH_CHECK_VALUE(full >= 1 && pooled >= 1 && full >= 2 * pooled - 1 && full <= 2 * pooled + 1,
                    op, ": ", full_name, " = ", full, " cannot come from 2x2 pooling to ", pooled_name,
                    " = ", pooled, " (expected ", 2 * pooled - 1, ", ", 2 * pooled, " or ",
                    2 * pooled + 1, ")");
}

// x: [N, C, H, W] -> values [N, C, Ho, Wo]
inline PoolGeometry pool_geometry(const at::Tensor& x, bool ceil_mode) {
  const char* op = "max_pool2x2";
  check_activation(op, x, "x");
  PoolGeometry g{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0, x.suggest_memory_format()};
  TORCH_CHECK_VALUE(g.H >= 1 && g.W >= 1, op, ": x must have H >= 1 and W >= 1, got shape ",
                    x.sizes());
  g.Ho = pooled_extent(g.H, ceil_mode);
  g.Wo = pooled_extent(g.W, ceil_mode);
  TORCH_CHECK_VALUE(g.Ho >= 1 && g.Wo >= 1, op, ": x of shape ", x.sizes(),
                    " is smaller than the 2x2 window in floor mode (H and W must be >= 2); "
                    "pass ceil_mode=True to pool the partial windows");
  return g;
}

// values: [N, C, Ho, Wo], packed_indices, output_size (H, W) -> y [N, C, H, W]
inline PoolGeometry unpool_geometry(const at::Tensor& values, const at::Tensor& packed,
                                    at::IntArrayRef output_size) {
  const char* op = "max_unpool2x2";
  check_activation(op, values, "values");
  TORCH_CHECK_VALUE(output_size.size() == 2, op, ": output_size must be (H, W), got ", output_size);
  PoolGeometry g{values.size(0), values.size(1), output_size[0], output_size[1], values.size(2),
                 values.size(3), values.suggest_memory_format()};
  check_extents(op, g.H, g.Ho, "output_size[0]", "values.size(2)");
  check_extents(op, g.W, g.Wo, "output_size[1]", "values.size(3)");
  check_packed(op, packed, g.windows(), values, "values");
  return g;
}

// grad_output: [N, C, H, W], packed_indices, pooled_size (Ho, Wo) -> grad_values [N, C, Ho, Wo]
inline PoolGeometry gather_geometry(const at::Tensor& grad_output, const at::Tensor& packed,
                                    at::IntArrayRef pooled_size) {
  const char* op = "max_unpool2x2_backward";
  check_activation(op, grad_output, "grad_output");
  TORCH_CHECK_VALUE(pooled_size.size() == 2, op, ": pooled_size must be (Ho, Wo), got ", pooled_size);
  PoolGeometry g{grad_output.size(0), grad_output.size(1), grad_output.size(2), grad_output.size(3),
                 pooled_size[0], pooled_size[1], grad_output.suggest_memory_format()};
  check_extents(op, g.H, g.Ho, "grad_output.size(2)", "pooled_size[0]");
  check_extents(op, g.W, g.Wo, "grad_output.size(3)", "pooled_size[1]");
  check_packed(op, packed, g.windows(), grad_output, "grad_output");
  return g;
}

}  // namespace segnet
