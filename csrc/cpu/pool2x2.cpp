// CPU kernels of max_pool2x2, max_unpool2x2 and max_unpool2x2_backward, both memory formats.
//
// Every kernel reads and writes each element once. Work is split into tasks that own
// contiguous ranges of windows; a packed byte shared by two tasks (when a range does
// not start or end on a multiple of 4 windows) is OR-ed atomically into the output,
// which starts zeroed, so the result never depends on the split.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "common/pool2x2_args.h"

namespace segnet {
namespace {

using at::Tensor;

// Codes of windows [k0, k0 + n), read from codes[i * stride].
void store_codes(uint8_t* packed, int64_t k0, const uint8_t* codes, int64_t n, int64_t stride) {
  const int64_t end = k0 + n;
  int64_t k = k0;
  auto store_partial = [&](int64_t stop) {
    uint8_t bits = 0;
    const int64_t byte = k >> 2;
    for (; k < stop; ++k) bits |= codes[(k - k0) * stride] << ((k & 3) * 2);
    std::atomic_ref<uint8_t>(packed[byte]).fetch_or(bits, std::memory_order_relaxed);
  };
  if (k & 3) store_partial(std::min(end, (k + 3) & ~int64_t(3)));
  for (; k + 4 <= end; k += 4) {
    const uint8_t* c = codes + (k - k0) * stride;
    packed[k >> 2] = c[0] | (c[stride] << 2) | (c[2 * stride] << 4) | (c[3 * stride] << 6);
  }
  if (k < end) store_partial(end);
}

// codes[i * stride] = code of window k0 + i, for i < n.
void load_codes(const uint8_t* packed, int64_t k0, int64_t n, uint8_t* codes, int64_t stride) {
  for (int64_t i = 0; i < n; ++i) codes[i * stride] = read_code(packed, k0 + i);
}

// ---- max_pool2x2 -----------------------------------------------------------------

// Windows ow in [ow0, ow0 + n) of one output row; r0, r1: the two input rows
// (r1 unused without ROW1), W: input width.
template <typename T, bool ROW1>
void pool_row_nchw(const T* r0, const T* r1, int64_t W, int64_t ow0, int64_t n, T* y,
                   uint8_t* codes) {
  const int64_t full_end = std::min(ow0 + n, W / 2);  // windows with both columns
  for (int64_t ow = ow0; ow < full_end; ++ow) {
    codes[ow - ow0] = window_argmax(r0[2 * ow], r0[2 * ow + 1], ROW1 ? r1[2 * ow] : r0[2 * ow],
                                    ROW1 ? r1[2 * ow + 1] : r0[2 * ow], true, ROW1, &y[ow - ow0]);
  }
  if (full_end < ow0 + n) {  // the partial last column of ceil mode
    const int64_t ow = full_end;
    codes[ow - ow0] = window_argmax(r0[2 * ow], r0[2 * ow], ROW1 ? r1[2 * ow] : r0[2 * ow],
                                    r0[2 * ow], false, ROW1, &y[ow - ow0]);
  }
}

template <typename T>
void pool_nchw(const T* x, T* y, uint8_t* packed, const PoolGeometry& g) {
  constexpr int64_t kUnit = 8192;  // windows per task, a multiple of 4
  const int64_t windows = g.windows();
  at::parallel_for(0, (windows + kUnit - 1) / kUnit, 1, [&](int64_t u0, int64_t u1) {
    uint8_t codes[kUnit];
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t k0 = u * kUnit, k1 = std::min(k0 + kUnit, windows);
      for (int64_t k = k0; k < k1;) {
        const int64_t row = k / g.Wo, ow0 = k % g.Wo, n = std::min(g.Wo - ow0, k1 - k);
        const int64_t plane = row / g.Ho, h = 2 * (row % g.Ho);
        const T* r0 = x + (plane * g.H + h) * g.W;
        if (h + 1 < g.H) {
          pool_row_nchw<T, true>(r0, r0 + g.W, g.W, ow0, n, y + k, codes + (k - k0));
        } else {
          pool_row_nchw<T, false>(r0, r0, g.W, ow0, n, y + k, codes + (k - k0));
        }
        k += n;
      }
      store_codes(packed, k0, codes, k1 - k0, 1);
    }
  });
}

// One output pixel, all C channels (contiguous in channels_last).
template <typename T, bool COL1, bool ROW1>
void pool_pixel_nhwc(const T* p00, const T* p01, const T* p10, const T* p11, int64_t C, T* y,
                     uint8_t* codes) {
  for (int64_t c = 0; c < C; ++c) {
    codes[c] = window_argmax(p00[c], COL1 ? p01[c] : p00[c], ROW1 ? p10[c] : p00[c],
                             COL1 && ROW1 ? p11[c] : p00[c], COL1, ROW1, &y[c]);
  }
}

template <typename T>
void pool_nhwc(const T* x, T* y, uint8_t* packed, const PoolGeometry& g) {
  const int64_t C = g.C, rows = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, C * g.Wo));
  const int64_t blocks_per_image = (g.Ho + rows - 1) / rows;
  at::parallel_for(0, g.N * blocks_per_image, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> codes(rows * g.Wo * C);  // [oh - oh0][ow][c]
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / blocks_per_image, oh0 = (b % blocks_per_image) * rows;
      const int64_t oh1 = std::min(oh0 + rows, g.Ho);
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        const bool row1 = 2 * oh + 1 < g.H;
        for (int64_t ow = 0; ow < g.Wo; ++ow) {
          const bool col1 = 2 * ow + 1 < g.W;
          const T* p00 = x + ((n * g.H + 2 * oh) * g.W + 2 * ow) * C;
          const T* p01 = p00 + C;
          const T* p10 = p00 + g.W * C;
          T* yp = y + ((n * g.Ho + oh) * g.Wo + ow) * C;
          uint8_t* cp = codes.data() + ((oh - oh0) * g.Wo + ow) * C;
          if (row1 && col1) pool_pixel_nhwc<T, true, true>(p00, p01, p10, p10 + C, C, yp, cp);
          else if (row1) pool_pixel_nhwc<T, false, true>(p00, p00, p10, p10, C, yp, cp);
          else if (col1) pool_pixel_nhwc<T, true, false>(p00, p01, p00, p00, C, yp, cp);
          else pool_pixel_nhwc<T, false, false>(p00, p00, p00, p00, C, yp, cp);
        }
      }
      for (int64_t c = 0; c < C; ++c) {  // plane c's windows of these rows are contiguous
        store_codes(packed, ((n * C + c) * g.Ho + oh0) * g.Wo, codes.data() + c,
                    (oh1 - oh0) * g.Wo, C);
      }
    }
  });
}

// ---- max_unpool2x2 (also the backward of max_pool2x2) -----------------------------

// Output rows 2*oh and 2*oh + 1 of one plane from one row of values.
template <typename T>
void unpool_rows_nchw(const T* v, const uint8_t* codes, int64_t Wo, int64_t W, int64_t oh,
                      int64_t Ho, int64_t H, T* out) {
  for (int64_t dy = 0; dy < 2 && 2 * oh + dy < H; ++dy) {
    T* o = out + dy * W;
    if (oh >= Ho) {  // the extra last row when H = 2 * Ho + 1
      std::fill(o, o + W, T(0));
      continue;
    }
    const int64_t paired = std::min(W, 2 * Wo);
    for (int64_t w = 0; w < paired; ++w) {
      const int64_t ow = w >> 1;
      o[w] = codes[ow] == 2 * dy + (w & 1) ? v[ow] : T(0);
    }
    if (paired < W) o[paired] = T(0);
  }
}

template <typename T>
void unpool_nchw(const T* v, const uint8_t* packed, T* y, const PoolGeometry& g) {
  const int64_t pairs = (g.H + 1) / 2;  // output row pairs per plane
  at::parallel_for(0, g.N * g.C * pairs, 16, [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> codes(g.Wo);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t plane = t / pairs, oh = t % pairs;
      if (oh < g.Ho) load_codes(packed, (plane * g.Ho + oh) * g.Wo, g.Wo, codes.data(), 1);
      unpool_rows_nchw(v + (plane * g.Ho + std::min(oh, g.Ho - 1)) * g.Wo, codes.data(), g.Wo, g.W,
                       oh, g.Ho, g.H, y + (plane * g.H + 2 * oh) * g.W);
    }
  });
}

template <typename T>
void unpool_nhwc(const T* v, const uint8_t* packed, T* y, const PoolGeometry& g) {
  const int64_t C = g.C, pairs = (g.H + 1) / 2;
  at::parallel_for(0, g.N * pairs, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> codes(g.Wo * C);  // [ow][c]
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / pairs, oh = t % pairs;
      if (oh < g.Ho) {
        for (int64_t c = 0; c < C; ++c)
          load_codes(packed, ((n * C + c) * g.Ho + oh) * g.Wo, g.Wo, codes.data() + c, C);
      }
      for (int64_t dy = 0; dy < 2 && 2 * oh + dy < g.H; ++dy) {
        T* o = y + (n * g.H + 2 * oh + dy) * g.W * C;
        for (int64_t w = 0; w < g.W; ++w, o += C) {
          const int64_t ow = w >> 1;
          if (oh >= g.Ho || ow >= g.Wo) {
            std::fill(o, o + C, T(0));
            continue;
          }
          const T* vp = v + ((n * g.Ho + oh) * g.Wo + ow) * C;
          const uint8_t* cp = codes.data() + ow * C;
          const uint8_t want = 2 * dy + (w & 1);
          for (int64_t c = 0; c < C; ++c) o[c] = cp[c] == want ? vp[c] : T(0);
        }
      }
    }
  });
}

// ---- max_unpool2x2_backward: grad_values = grad_output at each window's arg-max ----

// Picks element `code` of a window, or zero where it falls outside the output.
template <typename T>
T pick(const T* r0, const T* r1, int64_t w, int64_t step, uint8_t code, bool has_col1,
       bool has_row1) {
  const bool dx = code & 1, dy = code >> 1;
  if ((dx && !has_col1) || (dy && !has_row1)) return T(0);
  return (dy ? r1 : r0)[(w + dx) * step];
}

template <typename T>
void gather_nchw(const T* go, const uint8_t* packed, T* gv, const PoolGeometry& g) {
  at::parallel_for(0, g.N * g.C * g.Ho, 16, [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> codes(g.Wo);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t plane = r / g.Ho, oh = r % g.Ho;
      const bool row1 = 2 * oh + 1 < g.H;
      load_codes(packed, r * g.Wo, g.Wo, codes.data(), 1);
      const T* top = go + (plane * g.H + 2 * oh) * g.W;
      const T* bottom = row1 ? top + g.W : top;
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        gv[r * g.Wo + ow] = pick(top, bottom, 2 * ow, 1, codes[ow], 2 * ow + 1 < g.W, row1);
      }
    }
  });
}

template <typename T>
void gather_nhwc(const T* go, const uint8_t* packed, T* gv, const PoolGeometry& g) {
  const int64_t C = g.C;
  at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> codes(g.Wo * C);  // [ow][c]
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / g.Ho, oh = t % g.Ho;
      const bool row1 = 2 * oh + 1 < g.H;
      for (int64_t c = 0; c < C; ++c)
        load_codes(packed, ((n * C + c) * g.Ho + oh) * g.Wo, g.Wo, codes.data() + c, C);
      const T* top = go + (n * g.H + 2 * oh) * g.W * C;
      const T* bottom = row1 ? top + g.W * C : top;
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        const bool col1 = 2 * ow + 1 < g.W;
        T* out = gv + (t * g.Wo + ow) * C;
        for (int64_t c = 0; c < C; ++c)
          out[c] = pick(top + c, bottom + c, 2 * ow, C, codes[ow * C + c], col1, row1);
      }
    }
  });
}

// ---- the registered CPU kernels ----------------------------------------------------

#define SEGNET_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// x: [N, C, H, W] -> values [N, C, Ho, Wo] (x's memory format), packed_indices uint8 [ceil(numel/4)]
std::tuple<Tensor, Tensor> max_pool2x2_cpu(const Tensor& x_in, bool ceil_mode) {
  const PoolGeometry g = pool_geometry(x_in, ceil_mode);
  const Tensor x = x_in.contiguous(g.format);
  Tensor values = at::empty({g.N, g.C, g.Ho, g.Wo}, x.options().memory_format(g.format));
  Tensor packed = at::zeros({packed_bytes(g.windows())}, x.options().dtype(at::kByte));
  if (g.windows() == 0) return {values, packed};
  SEGNET_DISPATCH_FLOATING(x.scalar_type(), "max_pool2x2_cpu", [&] {
    auto run = g.channels_last() ? pool_nhwc<scalar_t> : pool_nchw<scalar_t>;
    run(x.const_data_ptr<scalar_t>(), values.mutable_data_ptr<scalar_t>(),
        packed.mutable_data_ptr<uint8_t>(), g);
  });
  return {values, packed};
}

// values: [N, C, Ho, Wo], packed_indices, output_size (H, W) -> [N, C, H, W] (values' format)
Tensor max_unpool2x2_cpu(const Tensor& values_in, const Tensor& packed_in,
                         at::IntArrayRef output_size) {
  const PoolGeometry g = unpool_geometry(values_in, packed_in, output_size);
  const Tensor values = values_in.contiguous(g.format), packed = packed_in.contiguous();
  Tensor y = at::empty({g.N, g.C, g.H, g.W}, values.options().memory_format(g.format));
  if (y.numel() == 0) return y;
  SEGNET_DISPATCH_FLOATING(values.scalar_type(), "max_unpool2x2_cpu", [&] {
    auto run = g.channels_last() ? unpool_nhwc<scalar_t> : unpool_nchw<scalar_t>;
    run(values.const_data_ptr<scalar_t>(), packed.const_data_ptr<uint8_t>(),
        y.mutable_data_ptr<scalar_t>(), g);
  });
  return y;
}

// grad_output: [N, C, H, W], packed_indices, pooled_size (Ho, Wo) -> [N, C, Ho, Wo]
Tensor max_unpool2x2_backward_cpu(const Tensor& grad_output_in, const Tensor& packed_in,
                                  at::IntArrayRef pooled_size) {
  const PoolGeometry g = gather_geometry(grad_output_in, packed_in, pooled_size);
  const Tensor grad_output = grad_output_in.contiguous(g.format), packed = packed_in.contiguous();
  Tensor grad_values =
      at::empty({g.N, g.C, g.Ho, g.Wo}, grad_output.options().memory_format(g.format));
  if (grad_values.numel() == 0) return grad_values;
  SEGNET_DISPATCH_FLOATING(grad_output.scalar_type(), "max_unpool2x2_backward_cpu", [&] {
    auto run = g.channels_last() ? gather_nhwc<scalar_t> : gather_nchw<scalar_t>;
    run(grad_output.const_data_ptr<scalar_t>(), packed.const_data_ptr<uint8_t>(),
        grad_values.mutable_data_ptr<scalar_t>(), g);
  });
  return grad_values;
}

}  // namespace

TORCH_LIBRARY_IMPL(segnet_ext, CPU, m) {
  m.impl("max_pool2x2", &max_pool2x2_cpu);
  m.impl("max_unpool2x2", &max_unpool2x2_cpu);
  m.impl("max_unpool2x2_backward", &max_unpool2x2_backward_cpu);
}

}  // namespace segnet
