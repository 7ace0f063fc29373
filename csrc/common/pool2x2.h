// 2x2 / stride-2 arg-max pooling: the rules every backend shares.
//
// Packed index layout (the public contract of `packed_indices`):
//   window k is the k-th element of `values` in logical NCHW order,
//     k = ((n * C + c) * Ho + oh) * Wo + ow,
//   whatever the memory format of `values`; its 2-bit code sits in byte k / 4 at
//   bits 2 * (k % 4) (first window in the low bits). The code is 2 * dy + dx: the
//   maximum is input element (2 * oh + dy, 2 * ow + dx). Bits past the last window
//   are zero. Because the order is logical, indices stay valid when the tensors
//   between pooling and unpooling change memory format.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SEGNET_HD __host__ __device__ __forceinline__
#else
#define SEGNET_HD inline
#endif

namespace segnet {

// Output extent of a 2-wide, stride-2 window; ceil mode keeps a partial last window.
SEGNET_HD int64_t pooled_extent(int64_t in, bool ceil_mode) {
  return ceil_mode ? (in + 1) / 2 : in / 2;
}

SEGNET_HD int64_t packed_bytes(int64_t windows) { return (windows + 3) / 4; }

// torch's arg-max rule: a later element wins if strictly greater, or if it is NaN
// (so the last NaN of a window wins and ties keep the first maximum).
template <typename T>
SEGNET_HD bool replaces_max(T candidate, T current) {
  return candidate > current || candidate != candidate;
}

// Arg-max of one window in row-major order; has_col1 / has_row1 are false for the
// partial border windows of ceil mode. Returns the code, writes the maximum.
template <typename T>
SEGNET_HD uint8_t window_argmax(T v00, T v01, T v10, T v11, bool has_col1, bool has_row1,
                                T* max_out) {
  T m = v00;
  uint8_t code = 0;
  if (has_col1 && replaces_max(v01, m)) { m = v01; code = 1; }
  if (has_row1) {
    if (replaces_max(v10, m)) { m = v10; code = 2; }
    if (has_col1 && replaces_max(v11, m)) { m = v11; code = 3; }
  }
  *max_out = m;
  return code;
}

// The code of window k in its packed byte.
SEGNET_HD uint8_t code_in(uint8_t byte, int64_t k) { return (byte >> ((k & 3) * 2)) & 3; }

SEGNET_HD uint8_t read_code(const uint8_t* packed, int64_t k) { return code_in(packed[k >> 2], k); }

}  // namespace segnet
