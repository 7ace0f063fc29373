// CPU kernels of the BN+ReLU ops (rules in common/bn_relu.h), and the convolution with
// the inference epilogue (Winograd for 3x3 / stride 1 / padding 1, see winograd3x3.cpp;
// otherwise ATen's convolution, then scale_shift_relu).
//
// NCHW: each channel's values are N contiguous planes of H*W; the reductions run in
// parallel over channels, the element-wise passes over planes. channels_last: rows of C
// contiguous values; every pass runs in parallel over blocks of rows, with per-channel
// partials combined in a fixed order (results do not depend on the thread count).
// Reductions accumulate float (double for float64) over runs of at most 256 values per
// accumulator, shifted by a per-channel pivot, and add those up in double (NCHW: a Moments
// per 4096-value chunk of 16 such accumulators; channels_last: double sums per channel):
// stable for any count. Memory traffic: stats reads x once; scale_shift_relu reads x (and the
// residual), writes y;
// backward_reduce reads grad_y and x; backward_apply reads both and writes grad_x.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common/bn_relu.h"
#include "common/bn_relu_args.h"
#include "cpu/outputs.h"
#include "cpu/vectorize.h"
#include "cpu/winograd3x3.h"

namespace segnet {
namespace {

constexpr int kLanes = 16;          // independent accumulators: vectorisable without reassociation
constexpr int64_t kChunk = 4096;    // values per low-precision partial sum
constexpr int64_t kMaxPartials = 256;  // channels_last: row ranges with their own partials

// ---- leaf loops (vectorised per ISA) -----------------------------------------------------

// Sums of (x - pivot) and its square over a contiguous run.
template <typename T, typename A>
SEGNET_LEAF void shifted_sums(const T* __restrict__ x, int64_t n, A pivot, A* s1, A* s2) {
  A a1[kLanes] = {}, a2[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    // one vector of kLanes accumulators; without the pragma GCC vectorises the outer loop
    // instead, transposing 16 blocks with permutes, at a quarter of the memory's speed
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const A d = static_cast<A>(x[i + l]) - pivot;
      a1[l] += d;
      a2[l] += d * d;
    }
  }
  for (; i < n; ++i) {
    const A d = static_cast<A>(x[i]) - pivot;
    a1[0] += d;
    a2[0] += d * d;
  }
  A t1 = 0, t2 = 0;
  for (int l = 0; l < kLanes; ++l) t1 += a1[l], t2 += a2[l];
  *s1 = t1;
  *s2 = t2;
}

// Sums of g and g * (x - mean) over a contiguous run of one channel.
template <typename T, typename A>
SEGNET_LEAF void grad_sums(const T* __restrict__ dy, const T* __restrict__ x, int64_t n, A scale,
                                   A shift, A mean, bool relu, A* sg, A* sgc) {
  A a1[kLanes] = {}, a2[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd  // as in shifted_sums
    for (int l = 0; l < kLanes; ++l) {
      const A xv = static_cast<A>(x[i + l]);
      const A g = relu_grad(xv, static_cast<A>(dy[i + l]), scale, shift, relu);
      a1[l] += g;
      a2[l] += g * (xv - mean);
    }
  }
  for (; i < n; ++i) {
    const A xv = static_cast<A>(x[i]);
    const A g = relu_grad(xv, static_cast<A>(dy[i]), scale, shift, relu);
    a1[0] += g;
    a2[0] += g * (xv - mean);
  }
  A t1 = 0, t2 = 0;
  for (int l = 0; l < kLanes; ++l) t1 += a1[l], t2 += a2[l];
  *sg = t1;
  *sgc = t2;
}

template <typename T, typename A>
SEGNET_LEAF void apply_run(const T* __restrict__ x, int64_t n, A scale, A shift, bool relu,
                                   T* __restrict__ y) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<T>(affine_relu(static_cast<A>(x[i]), scale, shift, relu));
}

template <typename T, typename A>
SEGNET_LEAF void apply_row(const T* __restrict__ x, int64_t C, const A* __restrict__ scale,
                                   const A* __restrict__ shift, bool relu, T* __restrict__ y) {
  for (int64_t c = 0; c < C; ++c) y[c] = static_cast<T>(affine_relu(static_cast<A>(x[c]), scale[c], shift[c], relu));
}

template <typename T, typename A>
SEGNET_LEAF void apply_add_run(const T* __restrict__ x, const T* __restrict__ r, int64_t n, A scale, A shift,
                               bool relu, T* __restrict__ y) {
  for (int64_t i = 0; i < n; ++i)
    y[i] = static_cast<T>(affine_add_relu(static_cast<A>(x[i]), scale, shift, static_cast<A>(r[i]), relu));
}

template <typename T, typename A>
SEGNET_LEAF void apply_add_row(const T* __restrict__ x, const T* __restrict__ r, int64_t C,
                               const A* __restrict__ scale, const A* __restrict__ shift, bool relu,
                               T* __restrict__ y) {
  for (int64_t c = 0; c < C; ++c)
    y[c] = static_cast<T>(affine_add_relu(static_cast<A>(x[c]), scale[c], shift[c], static_cast<A>(r[c]), relu));
}

template <typename T, typename A>
SEGNET_LEAF void grad_apply_run(const T* __restrict__ dy, const T* __restrict__ x, int64_t n, A scale,
                                        A shift, A mean, A k1, A k2, A k3, bool relu, T* __restrict__ dx) {
  for (int64_t i = 0; i < n; ++i)
    dx[i] = static_cast<T>(
        bn_relu_input_grad(static_cast<A>(x[i]), static_cast<A>(dy[i]), scale, shift, mean, k1, k2, k3, relu));
}

template <typename T, typename A>
SEGNET_LEAF void grad_apply_row(const T* __restrict__ dy, const T* __restrict__ x, int64_t C,
                                        const A* __restrict__ scale, const A* __restrict__ shift,
                                        const A* __restrict__ mean, const A* __restrict__ k1,
                                        const A* __restrict__ k2, const A* __restrict__ k3, bool relu,
                                        T* __restrict__ dx) {
  for (int64_t c = 0; c < C; ++c)
    dx[c] = static_cast<T>(bn_relu_input_grad(static_cast<A>(x[c]), static_cast<A>(dy[c]), scale[c], shift[c],
                                              mean[c], k1[c], k2[c], k3[c], relu));
}

// ---- channels_last reductions: per-channel sums over row blocks ----------------------------

// A channel's two sums in double.
struct DoubleSums {
  double s1 = 0, s2 = 0;
};

// Calls body(row0, row1, s1, s2) for blocks of at most kChunk / kLanes rows, with float
// partial sums s1, s2 of C values each (each a sum of as many values as one lane of
// shifted_sums adds up in NCHW), adds every block's sums into per-range DoubleSums, and
// finally calls finish(c, sums) with channel c's sums over all ranges, added in range order
// (results do not depend on the thread count). Plain double sums, not a Moments combine per
// block: those C divisions per block cost more than the memory traffic.
template <typename A, typename Body, typename Finish>
void reduce_rows(int64_t rows, int64_t C, Body body, Finish finish) {
  const int64_t block = kChunk / kLanes;
  const int64_t blocks = (rows + block - 1) / block;
  const int64_t ranges = std::max<int64_t>(1, std::min(blocks, kMaxPartials));
  std::vector<DoubleSums> partial(ranges * C);
  at::parallel_for(0, ranges, 1, [&](int64_t r0, int64_t r1) {
    std::vector<A> s1(C), s2(C);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b0 = blocks * r / ranges, b1 = blocks * (r + 1) / ranges;
      DoubleSums* acc = &partial[r * C];
      for (int64_t b = b0; b < b1; ++b) {
        std::fill(s1.begin(), s1.end(), A(0));
        std::fill(s2.begin(), s2.end(), A(0));
        const int64_t row0 = b * block, row1 = std::min(rows, row0 + block);
        body(row0, row1, s1.data(), s2.data());
        for (int64_t c = 0; c < C; ++c) acc[c].s1 += s1[c], acc[c].s2 += s2[c];
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    DoubleSums total;
    for (int64_t r = 0; r < ranges; ++r) total.s1 += partial[r * C + c].s1, total.s2 += partial[r * C + c].s2;
    finish(c, total);
  }
}

template <typename T, typename A>
SEGNET_LEAF void shifted_sums_rows(const T* __restrict__ x, int64_t row0, int64_t row1, int64_t C,
                                           const A* __restrict__ pivot, A* __restrict__ s1, A* __restrict__ s2) {
  for (int64_t r = row0; r < row1; ++r) {
    const T* xr = x + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const A d = static_cast<A>(xr[c]) - pivot[c];
      s1[c] += d;
      s2[c] += d * d;
    }
  }
}

template <typename T, typename A>
SEGNET_LEAF void grad_sums_rows(const T* __restrict__ dy, const T* __restrict__ x, int64_t row0,
                                        int64_t row1, int64_t C, const A* __restrict__ scale,
                                        const A* __restrict__ shift, const A* __restrict__ mean, bool relu,
                                        A* __restrict__ sg, A* __restrict__ sgc) {
  for (int64_t r = row0; r < row1; ++r) {
    const T* xr = x + r * C;
    const T* dyr = dy + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const A xv = static_cast<A>(xr[c]);
      const A g = relu_grad(xv, static_cast<A>(dyr[c]), scale[c], shift[c], relu);
      sg[c] += g;
      sgc[c] += g * (xv - mean[c]);
    }
  }
}

// ---- the ops -------------------------------------------------------------------------------

at::Tensor dense(const at::Tensor& t, const ChannelLayout& L) { return t.contiguous(L.format); }

template <typename T>
void stats_kernel(const at::Tensor& x, const ChannelLayout& L, at::Tensor& mean, at::Tensor& var) {
  using A = at::opmath_type<T>;
  const T* xp = x.const_data_ptr<T>();
  auto* mp = mean.mutable_data_ptr<A>();
  auto* vp = var.mutable_data_ptr<A>();
  if (L.count() == 0) {
    std::fill(mp, mp + L.C, A(0));
    std::fill(vp, vp + L.C, A(0));
    return;
  }
  if (!L.channels_last()) {
    at::parallel_for(0, L.C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const A pivot = static_cast<A>(xp[c * L.inner]);
        Moments m;
        for (int64_t n = 0; n < L.outer; ++n) {
          const T* plane = xp + (n * L.C + c) * L.inner;
          for (int64_t i = 0; i < L.inner; i += kChunk) {
            const int64_t len = std::min(kChunk, L.inner - i);
            A s1, s2;
            SEGNET_VECTORIZED(shifted_sums<T, A>(plane + i, len, pivot, &s1, &s2));
            m.combine(Moments::from_shifted(len, pivot, s1, s2));
          }
        }
        mp[c] = static_cast<A>(m.mean);
        vp[c] = static_cast<A>(m.var());
      }
    });
    return;
  }
  // Every block of a channel is shifted by the same pivot, so their sums add up in double
  // and make one Moments at the end (the same figures as a Moments per block, combined).
  std::vector<A> pivot(L.C);
  for (int64_t c = 0; c < L.C; ++c) pivot[c] = static_cast<A>(xp[c]);
  reduce_rows<A>(
      L.outer, L.C,
      [&](int64_t r0, int64_t r1, A* s1, A* s2) {
        SEGNET_VECTORIZED(shifted_sums_rows<T, A>(xp, r0, r1, L.C, pivot.data(), s1, s2));
      },
      [&](int64_t c, const DoubleSums& total) {
        const Moments m = Moments::from_shifted(L.outer, pivot[c], total.s1, total.s2);
        mp[c] = static_cast<A>(m.mean);
        vp[c] = static_cast<A>(m.var());
      });
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x_in) {
  const auto L = check_bn_input("bn_stats", x_in, "x");
  const auto x = dense(x_in, L);
  auto opts = x.options().dtype(acc_type_of(x.scalar_type()));
  auto mean = at::empty({L.C}, opts), var = at::empty({L.C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats",
                                  [&] { stats_kernel<scalar_t>(x, L, mean, var); });
  return {mean, var};
}

// Element-wise passes over planes (NCHW) or rows (channels_last), ~32K values per task.
template <typename PlaneFn, typename RowsFn>
void for_each_run(const ChannelLayout& L, PlaneFn plane, RowsFn rows) {
  if (!L.channels_last()) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(L.inner, 1));
    at::parallel_for(0, L.outer * L.C, grain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) plane(p, p % L.C);
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(L.C, 1));
    at::parallel_for(0, L.outer, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) rows(r);
    });
  }
}

at::Tensor scale_shift_relu_cpu(const at::Tensor& x_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
                                bool relu, const std::optional<at::Tensor>& residual_in) {
  const char* op = "scale_shift_relu";
  const auto L = check_bn_input(op, x_in, "x");
  check_channel_vector(op, scale_in, "scale", x_in);
  check_channel_vector(op, shift_in, "shift", x_in);
  const bool add = residual_in.has_value() && residual_in->defined();
  if (add) check_same_shape(op, *residual_in, "residual", x_in);
  const auto x = dense(x_in, L);
  const auto residual = add ? dense(*residual_in, L) : at::Tensor();
  const auto scale = scale_in.contiguous(), shift = shift_in.contiguous();
  auto y = empty_output(x.sizes(), x.options().memory_format(L.format));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scale_shift_relu", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = add ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const A* sp = scale.const_data_ptr<A>();
    const A* tp = shift.const_data_ptr<A>();
    for_each_run(
        L,
        [&](int64_t p, int64_t c) {
          const int64_t off = p * L.inner;
          if (add) {
            SEGNET_VECTORIZED(apply_add_run<scalar_t, A>(xp + off, rp + off, L.inner, sp[c], tp[c], relu, yp + off));
          } else {
            SEGNET_VECTORIZED(apply_run<scalar_t, A>(xp + off, L.inner, sp[c], tp[c], relu, yp + off));
          }
        },
        [&](int64_t r) {
          const int64_t off = r * L.C;
          if (add) {
            SEGNET_VECTORIZED(apply_add_row<scalar_t, A>(xp + off, rp + off, L.C, sp, tp, relu, yp + off));
          } else {
            SEGNET_VECTORIZED(apply_row<scalar_t, A>(xp + off, L.C, sp, tp, relu, yp + off));
          }
        });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_reduce_cpu(const at::Tensor& grad_y_in, const at::Tensor& x_in,
                                                              const at::Tensor& scale_in, const at::Tensor& shift_in,
                                                              const at::Tensor& mean_in, bool relu) {
  const char* op = "bn_relu_backward_reduce";
  const auto L = check_bn_input(op, x_in, "x");
  check_same_shape(op, grad_y_in, "grad_y", x_in);
  check_channel_vector(op, scale_in, "scale", x_in);
  check_channel_vector(op, shift_in, "shift", x_in);
  check_channel_vector(op, mean_in, "mean", x_in);
  const auto x = dense(x_in, L), dy = dense(grad_y_in, L);
  const auto scale = scale_in.contiguous(), shift = shift_in.contiguous(), mean = mean_in.contiguous();
  auto sum_g = at::empty({L.C}, scale.options()), sum_gc = at::empty({L.C}, scale.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_backward_reduce", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dp = dy.const_data_ptr<scalar_t>();
    const A* sp = scale.const_data_ptr<A>();
    const A* tp = shift.const_data_ptr<A>();
    const A* mp = mean.const_data_ptr<A>();
    A* gp = sum_g.mutable_data_ptr<A>();
    A* cp = sum_gc.mutable_data_ptr<A>();
    if (!L.channels_last()) {
      at::parallel_for(0, L.C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          double g = 0, gc = 0;
          for (int64_t n = 0; n < L.outer; ++n) {
            const int64_t off = (n * L.C + c) * L.inner;
            for (int64_t i = 0; i < L.inner; i += kChunk) {
              A s1, s2;
              SEGNET_VECTORIZED(grad_sums<scalar_t, A>(dp + off + i, xp + off + i, std::min(kChunk, L.inner - i),
                                                       sp[c], tp[c], mp[c], relu, &s1, &s2));
              g += s1;
              gc += s2;
            }
          }
          gp[c] = static_cast<A>(g);
          cp[c] = static_cast<A>(gc);
        }
      });
      return;
    }
    reduce_rows<A>(
        L.outer, L.C,
        [&](int64_t r0, int64_t r1, A* s1, A* s2) {
          SEGNET_VECTORIZED(grad_sums_rows<scalar_t, A>(dp, xp, r0, r1, L.C, sp, tp, mp, relu, s1, s2));
        },
        [&](int64_t c, const DoubleSums& total) {
          gp[c] = static_cast<A>(total.s1);
          cp[c] = static_cast<A>(total.s2);
        });
  });
  return {sum_g, sum_gc};
}

at::Tensor bn_relu_backward_apply_cpu(const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& scale_in,
                                      const at::Tensor& shift_in, const at::Tensor& mean_in, const at::Tensor& k1_in,
                                      const at::Tensor& k2_in, const at::Tensor& k3_in, bool relu) {
  const auto L = check_backward_apply(grad_y_in, x_in, {{&scale_in, "scale"}, {&shift_in, "shift"}, {&mean_in, "mean"},
                                                         {&k1_in, "k1"}, {&k2_in, "k2"}, {&k3_in, "k3"}});
  const auto x = dense(x_in, L), dy = dense(grad_y_in, L);
  const auto scale = scale_in.contiguous(), shift = shift_in.contiguous(), mean = mean_in.contiguous();
  const auto k1 = k1_in.contiguous(), k2 = k2_in.contiguous(), k3 = k3_in.contiguous();
  auto dx = empty_output(x.sizes(), x.options().memory_format(L.format));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_backward_apply", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dp = dy.const_data_ptr<scalar_t>();
    scalar_t* gx = dx.mutable_data_ptr<scalar_t>();
    const A *sp = scale.const_data_ptr<A>(), *tp = shift.const_data_ptr<A>(), *mp = mean.const_data_ptr<A>();
    const A *a = k1.const_data_ptr<A>(), *b = k2.const_data_ptr<A>(), *k = k3.const_data_ptr<A>();
    for_each_run(
        L,
        [&](int64_t p, int64_t c) {
          const int64_t off = p * L.inner;
          SEGNET_VECTORIZED(grad_apply_run<scalar_t, A>(dp + off, xp + off, L.inner, sp[c], tp[c], mp[c], a[c], b[c],
                                                        k[c], relu, gx + off));
        },
        [&](int64_t r) {
          SEGNET_VECTORIZED(
              grad_apply_row<scalar_t, A>(dp + r * L.C, xp + r * L.C, L.C, sp, tp, mp, a, b, k, relu, gx + r * L.C));
        });
  });
  return dx;
}

// ---- ATen's convolution ------------------------------------------------------------------

// Outputs along one dimension of a convolution (of a valid geometry).
int64_t extent(int64_t size, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  return (size + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1;
}

// Whether no output position along one dimension has a tap inside the input (of `size`):
// every tap of every output falls in the zero padding.
bool sees_no_input(int64_t size, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  const int64_t out = extent(size, kernel, stride, padding, dilation);
  for (int64_t o = 0; o < out && o * stride - padding < size; ++o)
    for (int64_t j = 0; j < kernel; ++j)
      if (const int64_t at = o * stride - padding + j * dilation; at >= 0 && at < size) return false;
  return true;
}

// at::conv2d, with the geometries that oneDNN gets wrong (torch 2.13 and 2.14) rewritten
// into equivalent ones, as segnet_ext/aten_conv.py does for the layers (where the cases are
// described): where no output sees the input along a dimension (bfloat16 and float16 read
// through a null pointer on CPUs with AVX-512 BF16 or AMX), the padding made explicit; where
// a strided dimension has one output (bfloat16 on AMX returns garbage), stride 1 along it
// and the first output kept.
at::Tensor aten_conv2d(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const auto valid = [](at::IntArrayRef v, int64_t least) {
    return v.size() == 2 && std::all_of(v.begin(), v.end(), [&](int64_t e) { return e >= least; });
  };
  if (!valid(stride, 1) || !valid(padding, 0) || !valid(dilation, 1))
    return at::conv2d(x, weight, bias, stride, padding, dilation, groups);  // its error
  bool blind = false, restrided = false;
  int64_t out[2], strides[2];
  for (int d = 0; d < 2; ++d) {
    const int64_t size = x.size(2 + d), kernel = weight.size(2 + d);
    if (kernel < 1 || size + 2 * padding[d] < dilation[d] * (kernel - 1) + 1)
      return at::conv2d(x, weight, bias, stride, padding, dilation, groups);  // its error
    out[d] = extent(size, kernel, stride[d], padding[d], dilation[d]);
    blind = blind || sees_no_input(size, kernel, stride[d], padding[d], dilation[d]);
    strides[d] = out[d] == 1 ? 1 : stride[d];
    restrided = restrided || strides[d] != stride[d];
  }
  if (!blind && !restrided) return at::conv2d(x, weight, bias, stride, padding, dilation, groups);
  const int64_t zeros[2] = {0, 0};
  const at::Tensor y =
      blind ? at::conv2d(at::constant_pad_nd(x, {padding[1], padding[1], padding[0], padding[0]}), weight, bias,
                         strides, zeros, dilation, groups)
            : at::conv2d(x, weight, bias, strides, padding, dilation, groups);
  if (y.size(2) == out[0] && y.size(3) == out[1]) return y;
  return y.slice(2, 0, out[0]).slice(3, 0, out[1]).contiguous(x.suggest_memory_format());
}

at::Tensor conv2d_scale_shift_relu_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                       const at::Tensor& shift, at::IntArrayRef stride, at::IntArrayRef padding,
                                       at::IntArrayRef dilation, int64_t groups, bool relu) {
  check_conv_epilogue("conv2d_scale_shift_relu", x, weight, scale, shift, groups);
  if (winograd3x3_applies(x, weight, stride, padding, dilation, groups))
    return winograd3x3_scale_shift_relu(x, weight, scale, shift, relu);
  const at::Tensor z = aten_conv2d(x, weight, {}, stride, padding, dilation, groups);
  return scale_shift_relu_cpu(z.contiguous(x.suggest_memory_format()), scale, shift, relu, std::nullopt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_bn_stats_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                                   at::IntArrayRef dilation, int64_t groups) {
  check_conv("conv2d_bn_stats", x, weight, bias ? &*bias : nullptr, groups);
  at::Tensor z = aten_conv2d(x, weight, bias, stride, padding, dilation, groups);
  auto [mean, var] = bn_stats_cpu(z);
  return {z, mean, var};
}

}  // namespace

TORCH_LIBRARY_IMPL(segnet_ext, CPU, m) {
  m.impl("conv2d_scale_shift_relu", &conv2d_scale_shift_relu_cpu);
  m.impl("conv2d_bn_stats", &conv2d_bn_stats_cpu);
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("scale_shift_relu", &scale_shift_relu_cpu);
  m.impl("bn_relu_backward_reduce", &bn_relu_backward_reduce_cpu);
  m.impl("bn_relu_backward_apply", &bn_relu_backward_apply_cpu);
}

}  // namespace segnet
