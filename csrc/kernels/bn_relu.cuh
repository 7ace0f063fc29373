// CUDA kernels of the BN+ReLU ops (rules in common/bn_relu.h). Raw pointers only: this
// header also compiles on the host against the CUDA emulation header (tests/cuda_emu/).
//
// An activation is seen as [outer, C, inner]: NCHW is [N, C, H*W], channels_last is
// [N*H*W, C, 1]. Per-channel reductions run in two deterministic stages (no atomics):
// partial sums of P slices of every channel into a [P, C, 2] double buffer, then one
// thread per channel adds its P partials in order.
#pragma once

#include "common/bn_relu.h"
#include "kernels/launch.cuh"

namespace segnet {
namespace kernels {

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

struct ChannelDims {
  int64_t outer, C, inner;
  SEGNET_HD int64_t count() const { return outer * inner; }
  SEGNET_HD int64_t numel() const { return outer * C * inner; }
};

// The channel of element e of an [outer, C, inner] tensor, without 64-bit division for
// 32-bit I (see Divider).
template <typename I>
struct ChannelIndex {
  I numel;
  Divider<I> inner, C;
  explicit ChannelIndex(ChannelDims d) : numel(I(d.numel())), inner(d.inner), C(d.C) {}
  SEGNET_HD I operator()(I e) const { return C.mod(inner.div(e)); }
};

// What a reduction adds per element: the shifted moments of x (stats), or the gradient
// sums g and g * (x - mean) (backward).
template <typename T, typename A>
struct StatsTerm {
  const T* x;
  const T* dy;  // unused
  const A *scale, *shift, *mean;  // unused
  bool relu;
  __device__ __forceinline__ A pivot(int64_t c, ChannelDims d) const { return static_cast<A>(x[c * d.inner]); }
  __device__ __forceinline__ void add(int64_t at, int64_t c, A pivot, A& s1, A& s2) const {
    const A v = static_cast<A>(x[at]) - pivot;
    s1 += v;
    s2 += v * v;
  }
};

template <typename T, typename A>
struct GradTerm {
  const T* x;
  const T* dy;
  const A *scale, *shift, *mean;
  bool relu;
  __device__ __forceinline__ A pivot(int64_t, ChannelDims) const { return A(0); }
  __device__ __forceinline__ void add(int64_t at, int64_t c, A, A& s1, A& s2) const {
    const A xv = static_cast<A>(x[at]);
    const A g = relu_grad(xv, static_cast<A>(dy[at]), scale[c], shift[c], relu);
    s1 += g;
    s2 += g * (xv - mean[c]);
  }
};

// Sum of a double over a 1-D block (any size up to 1024, partial warps included), in a
// fixed tree order; every thread gets the result. All threads must call it (barriers).
__device__ __forceinline__ double block_sum(double v, double* scratch /* [blockDim.x] */) {
  const unsigned t = threadIdx.x, n = blockDim.x;
  __syncthreads();  // scratch may still be read by a previous call
  scratch[t] = v;
  __syncthreads();
  unsigned half = 1;
  while (half < n) half *= 2;
  for (half /= 2; half > 0; half /= 2) {
    if (t < half && t + half < n) scratch[t] += scratch[t + half];
    __syncthreads();
  }
  return scratch[0];
}

// Stage 1, NCHW: block (blockIdx.x = channel, grid-stride; blockIdx.y = slice) sums the
// channel's values j = slice*threads + t (+ k * slices*threads), j -> (o, i) = (j / inner,
// j % inner): consecutive threads read consecutive addresses. Reads each value once.
template <typename T, typename A, typename Term>
__global__ void channel_partials_nchw(Term term, ChannelDims d, double* __restrict__ partial) {
  __shared__ double scratch[1024];
  const int64_t stride = int64_t(gridDim.y) * blockDim.x;
  for (int64_t c = blockIdx.x; c < d.C; c += gridDim.x) {
    const A pivot = term.pivot(c, d);
    A s1 = 0, s2 = 0;
    for (int64_t j = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; j < d.count(); j += stride) {
      const int64_t o = j / d.inner, i = j - o * d.inner;
      term.add((o * d.C + c) * d.inner + i, c, pivot, s1, s2);
    }
    const double t1 = block_sum(s1, scratch);
    const double t2 = block_sum(s2, scratch);
    if (threadIdx.x == 0) {
      partial[(int64_t(blockIdx.y) * d.C + c) * 2] = t1;
      partial[(int64_t(blockIdx.y) * d.C + c) * 2 + 1] = t2;
    }
  }
}

// Stage 1, channels_last: block (32, ROWS) threads; threadIdx.x picks a channel of a
// 32-channel tile (blockIdx.x), threadIdx.y a row of slice blockIdx.y: a warp reads 32
// consecutive channels of one row (coalesced). Per-channel sums across threadIdx.y go
// through shared memory in a fixed order.
template <typename T, typename A, typename Term>
__global__ void channel_partials_nhwc(Term term, ChannelDims d, double* __restrict__ partial) {
  __shared__ double sums[2][32][33];
  const int64_t c = int64_t(blockIdx.x) * 32 + threadIdx.x;
  A s1 = 0, s2 = 0;
  if (c < d.C) {
    const A pivot = term.pivot(c, d);
    const int64_t stride = int64_t(gridDim.y) * blockDim.y;
    for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < d.outer; r += stride)
      term.add(r * d.C + c, c, pivot, s1, s2);
  }
  sums[0][threadIdx.y][threadIdx.x] = s1;
  sums[1][threadIdx.y][threadIdx.x] = s2;
  __syncthreads();
  if (threadIdx.y == 0 && c < d.C) {
    double t1 = 0, t2 = 0;
    for (unsigned y = 0; y < blockDim.y; ++y) t1 += sums[0][y][threadIdx.x], t2 += sums[1][y][threadIdx.x];
    partial[(int64_t(blockIdx.y) * d.C + c) * 2] = t1;
    partial[(int64_t(blockIdx.y) * d.C + c) * 2 + 1] = t2;
  }
}

// Stage 2 of the statistics: one thread per channel (grid-stride) adds its P partials
// in slice order and writes mean and biased variance.
template <typename T, typename A>
__global__ void stats_finish(const T* __restrict__ x, ChannelDims d, const double* __restrict__ partial, int slices,
                             A* __restrict__ mean, A* __restrict__ var) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < d.C; c += int64_t(gridDim.x) * blockDim.x) {
    double s1 = 0, s2 = 0;
    for (int p = 0; p < slices; ++p) s1 += partial[(p * d.C + c) * 2], s2 += partial[(p * d.C + c) * 2 + 1];
    const Moments m = Moments::from_shifted(double(d.count()), double(static_cast<A>(x[c * d.inner])), s1, s2);
    mean[c] = static_cast<A>(m.mean);
    var[c] = static_cast<A>(m.var());
  }
}

template <typename A>
__global__ void sums_finish(ChannelDims d, const double* __restrict__ partial, int slices, A* __restrict__ sum1,
                            A* __restrict__ sum2) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < d.C; c += int64_t(gridDim.x) * blockDim.x) {
    double s1 = 0, s2 = 0;
    for (int p = 0; p < slices; ++p) s1 += partial[(p * d.C + c) * 2], s2 += partial[(p * d.C + c) * 2 + 1];
    sum1[c] = static_cast<A>(s1);
    sum2[c] = static_cast<A>(s2);
  }
}

// Element-wise passes: thread per element (grid-stride); channel = (e / inner) % C.
// scale_shift_relu reads x (and the residual), writes y; backward_apply reads dy and x, writes dx.
// With a residual (null: none), y = relu(x * scale + shift + residual), ResNet's add.
template <typename T, typename A, typename I>
__global__ void scale_shift_relu_kernel(const T* __restrict__ x, ChannelIndex<I> channel, const A* __restrict__ scale,
                                        const A* __restrict__ shift, bool relu, const T* __restrict__ residual,
                                        T* __restrict__ y) {
  for (I e = I(blockIdx.x) * blockDim.x + threadIdx.x; e < channel.numel; e += I(gridDim.x) * blockDim.x) {
    const I c = channel(e);
    y[e] = static_cast<T>(residual ? affine_add_relu(static_cast<A>(x[e]), scale[c], shift[c],
                                                     static_cast<A>(residual[e]), relu)
                                   : affine_relu(static_cast<A>(x[e]), scale[c], shift[c], relu));
  }
}

template <typename T, typename A, typename I>
__global__ void bn_relu_backward_apply_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                              ChannelIndex<I> channel, const A* __restrict__ scale,
                                              const A* __restrict__ shift, const A* __restrict__ mean,
                                              const A* __restrict__ k1, const A* __restrict__ k2,
                                              const A* __restrict__ k3, bool relu, T* __restrict__ dx) {
  for (I e = I(blockIdx.x) * blockDim.x + threadIdx.x; e < channel.numel; e += I(gridDim.x) * blockDim.x) {
    const I c = channel(e);
    dx[e] = static_cast<T>(bn_relu_input_grad(static_cast<A>(x[e]), static_cast<A>(dy[e]), scale[c], shift[c], mean[c],
                                              k1[c], k2[c], k3[c], relu));
  }
}

// ---- launchers --------------------------------------------------------------------------

// Slices per channel for the partial sums: enough blocks to fill the GPU, each with at
// least a few values per thread. The caller allocates partial_doubles() doubles.
struct ReductionPlan {
  bool channels_last;
  int slices;
  int rows_per_block = 8;  // channels_last: threadIdx.y extent
  int64_t partial_doubles(const ChannelDims& d) const { return int64_t(slices) * d.C * 2; }
};

inline ReductionPlan plan_reduction(const ChannelDims& d, bool channels_last, const LaunchConfig& cfg) {
  ReductionPlan p{channels_last, 1};
  const int64_t per_slice = channels_last ? int64_t(p.rows_per_block) * 16 : int64_t(cfg.threads) * 16;
  const int64_t want = (d.count() + per_slice - 1) / per_slice;
  const int64_t cap = std::max<int64_t>(1, cfg.max_blocks / std::max<int64_t>(1, channels_last ? (d.C + 31) / 32 : d.C));
  p.slices = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, cap, 1024})));
  return p;
}

template <typename T, typename A, typename Term>
void launch_channel_partials(const Term& term, ChannelDims d, const ReductionPlan& plan, double* partial,
                             cudaStream_t stream, const LaunchConfig& cfg) {
  if (plan.channels_last) {
    const dim3 grid(static_cast<unsigned>((d.C + 31) / 32), plan.slices);
    auto kernel = channel_partials_nhwc<T, A, Term>;
    SEGNET_LAUNCH(kernel, grid, dim3(32, plan.rows_per_block), stream, term, d, partial);
  } else {
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(d.C, std::max<int64_t>(1, cfg.max_blocks / plan.slices))),
                    plan.slices);
    auto kernel = channel_partials_nchw<T, A, Term>;
    SEGNET_LAUNCH(kernel, grid, cfg.threads, stream, term, d, partial);
  }
}

template <typename T, typename A = typename AccOf<T>::type>
void launch_bn_stats(const T* x, ChannelDims d, bool channels_last, A* mean, A* var, double* partial,
                     const ReductionPlan& plan, cudaStream_t stream, LaunchConfig cfg = {}) {
  if (d.C == 0) return;
  if (d.count() == 0) {
    // no values: mean and variance 0 (the caller rejects training on fewer than 2 values)
    auto finish = sums_finish<A>;
    SEGNET_LAUNCH(finish, blocks_for(d.C, cfg), cfg.threads, stream, d, partial, 0, mean, var);
    return;
  }
  const StatsTerm<T, A> term{x, nullptr, nullptr, nullptr, nullptr, false};
  launch_channel_partials<T, A>(term, d, plan, partial, stream, cfg);
  auto finish = stats_finish<T, A>;
  SEGNET_LAUNCH(finish, blocks_for(d.C, cfg), cfg.threads, stream, x, d, partial, plan.slices, mean, var);
}

template <typename T, typename A = typename AccOf<T>::type>
void launch_bn_relu_backward_reduce(const T* dy, const T* x, ChannelDims d, bool channels_last, const A* scale,
                                    const A* shift, const A* mean, bool relu, A* sum_g, A* sum_gc, double* partial,
                                    const ReductionPlan& plan, cudaStream_t stream, LaunchConfig cfg = {}) {
  if (d.C == 0) return;
  int slices = 0;
  if (d.count() > 0) {
    const GradTerm<T, A> term{x, dy, scale, shift, mean, relu};
    launch_channel_partials<T, A>(term, d, plan, partial, stream, cfg);
    slices = plan.slices;
  }
  auto finish = sums_finish<A>;
  SEGNET_LAUNCH(finish, blocks_for(d.C, cfg), cfg.threads, stream, d, partial, slices, sum_g, sum_gc);
}

template <typename T, typename A = typename AccOf<T>::type>
void launch_scale_shift_relu(const T* x, ChannelDims d, const A* scale, const A* shift, bool relu, const T* residual,
                             T* y, cudaStream_t stream, LaunchConfig cfg = {}) {
  if (d.numel() == 0) return;
  with_index_type(d.numel(), cfg, [&](auto index) {
    using I = decltype(index);
    auto kernel = scale_shift_relu_kernel<T, A, I>;
    SEGNET_LAUNCH(kernel, blocks_for(d.numel(), cfg), cfg.threads, stream, x, ChannelIndex<I>(d), scale, shift, relu,
                  residual, y);
  });
}

template <typename T, typename A = typename AccOf<T>::type>
void launch_bn_relu_backward_apply(const T* dy, const T* x, ChannelDims d, const A* scale, const A* shift,
                                   const A* mean, const A* k1, const A* k2, const A* k3, bool relu, T* dx,
                                   cudaStream_t stream, LaunchConfig cfg = {}) {
  if (d.numel() == 0) return;
  with_index_type(d.numel(), cfg, [&](auto index) {
    using I = decltype(index);
    auto kernel = bn_relu_backward_apply_kernel<T, A, I>;
    SEGNET_LAUNCH(kernel, blocks_for(d.numel(), cfg), cfg.threads, stream, dy, x, ChannelIndex<I>(d), scale, shift,
                  mean, k1, k2, k3, relu, dx);
  });
}

}  // namespace kernels
}  // namespace segnet
