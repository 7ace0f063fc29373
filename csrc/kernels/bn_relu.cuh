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

// The element-wise passes visit every element of an [outer, C, inner] tensor with the
// channel fixed per stretch, so that per-channel parameters load once per stretch (and no
// element needs a division):
//   NCHW (inner > 1): block b takes planes (n, c) = b, b + gridDim.x, ...; its threads step
//     through the plane from the 32-byte boundary of `anchor` (the output) at or before the
//     plane's start, the lanes before the start idle (apply's `active` false), so that every
//     warp instruction covers whole sectors whatever the plane's size;
//   channels_last (inner == 1): the first S = C * floor(grid threads / C) threads each keep
//     channel t % C and step by S (the launcher gives the grid at least C threads).
template <typename I>
struct ChannelWalk {
  I numel, inner;
  Divider<I> C;
  explicit ChannelWalk(ChannelDims d) : numel(I(d.numel())), inner(I(d.inner)), C(d.C) {}

  template <typename T, typename Load, typename Apply>
  __device__ __forceinline__ void operator()(const T* anchor, Load load, Apply apply) const {
    if (inner > 1) {
      for (I p = blockIdx.x; p * inner < numel; p += gridDim.x) {
        const auto params = load(C.mod(p));
        const I first = p * inner, lead = I(reinterpret_cast<uintptr_t>(anchor + first) % 32 / sizeof(T));
        for (I i = threadIdx.x; i < inner + lead; i += blockDim.x) {
          const bool active = i >= lead;
          apply(active ? first + i - lead : first, params, active);
        }
      }
    } else {
      const I t = I(blockIdx.x) * blockDim.x + threadIdx.x;
      const I stride = C.div(I(gridDim.x) * blockDim.x) * C.divisor;
      if (t >= stride) return;
      const auto params = load(C.mod(t));
      for (I e = t; e < numel; e += stride) apply(e, params, true);
    }
  }
};

// Blocks and threads for a ChannelWalk, about `per_thread` elements per thread, so that each
// thread's parameters (loaded once per plane or once) weigh little against its elements:
// NCHW, a block per plane (up to the cap) of just enough warps; channels_last, at least C
// threads.
inline std::pair<unsigned, int> walk_geometry(const ChannelDims& d, const LaunchConfig& cfg, int64_t per_thread) {
  if (d.inner > 1) {
    const int64_t threads = std::min<int64_t>(cfg.threads, std::max<int64_t>(32, (d.inner / per_thread + 31) / 32 * 32));
    return {static_cast<unsigned>(std::min<int64_t>(d.outer * d.C, cfg.max_blocks)), static_cast<int>(threads)};
  }
  const int64_t want = std::max<int64_t>(d.C, d.numel() / per_thread);
  return {static_cast<unsigned>(std::max<int64_t>((d.C + cfg.threads - 1) / cfg.threads,
                                                  std::min<int64_t>((want + cfg.threads - 1) / cfg.threads,
                                                                    cfg.max_blocks))),
          cfg.threads};
}

// What a reduction adds per element: the shifted moments of x (stats), or the gradient
// sums g and g * (x - mean) (backward). prepare(c) loads what channel c's terms share once
// (a thread's channel is fixed while it loops over the channel's elements).
template <typename T, typename A>
struct StatsTerm {
  const T* x;
  const T* dy;  // unused
  const A *scale, *shift, *mean;  // unused
  bool relu;
  struct Channel {
    A pivot;
  };
  __device__ __forceinline__ Channel prepare(int64_t c, ChannelDims d) const {
    return {static_cast<A>(SEGNET_LOAD(x + c * d.inner))};
  }
  __device__ __forceinline__ void add(int64_t at, const Channel& ch, A& s1, A& s2, bool active = true) const {
    const A v = static_cast<A>(SEGNET_LOAD_IF(active, x + at, T(0))) - ch.pivot;
    if (active) s1 += v, s2 += v * v;
  }
};

template <typename T, typename A>
struct GradTerm {
  const T* x;
  const T* dy;
  const A *scale, *shift, *mean;
  bool relu;
  struct Channel {
    A scale, shift, mean;
  };
  __device__ __forceinline__ Channel prepare(int64_t c, ChannelDims) const {
    return {SEGNET_LOAD(scale + c), SEGNET_LOAD(shift + c), SEGNET_LOAD(mean + c)};
  }
  __device__ __forceinline__ void add(int64_t at, const Channel& ch, A& s1, A& s2, bool active = true) const {
    const A xv = static_cast<A>(SEGNET_LOAD_IF(active, x + at, T(0)));
    const A g = relu_grad(xv, static_cast<A>(SEGNET_LOAD_IF(active, dy + at, T(0))), ch.scale, ch.shift, relu);
    if (active) s1 += g, s2 += g * (xv - ch.mean);
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
// channel's values j = slice*threads + t - lead (+ k * slices*threads), j -> (o, i) =
// (j / inner, j % inner): consecutive threads read consecutive addresses, and from the 32-byte
// boundary at or before the channel's first value (lead values before it; those lanes idle
// in their first step), so warps read whole sectors. Reads each value once; thread 0 loads
// the channel's terms for the block.
template <typename T, typename A, typename Term>
__global__ void __launch_bounds__(kMaxThreadsPerBlock) channel_partials_nchw(Term term, ChannelDims d, double* __restrict__ partial) {
  __shared__ double scratch[1024];
  __shared__ typename Term::Channel channel;
  const int64_t stride = int64_t(gridDim.y) * blockDim.x, so = stride / d.inner, si = stride % d.inner;
  for (int64_t c = blockIdx.x; c < d.C; c += gridDim.x) {
    __syncthreads();  // channel may still be read for the previous one
    if (threadIdx.x == 0) channel = term.prepare(c, d);
    __syncthreads();
    const auto ch = channel;
    A s1 = 0, s2 = 0;
    const int64_t lead = d.inner >= 32 ? int64_t(reinterpret_cast<uintptr_t>(term.x + c * d.inner) % 32 / sizeof(T)) : 0;
    // j = o * inner + i steps by stride = so * inner + si: divisions only before the loop
    int64_t j = int64_t(blockIdx.y) * blockDim.x + threadIdx.x - lead;
    int64_t o = j < 0 ? 0 : j / d.inner, i = j < 0 ? j : j % d.inner;
    for (; j < d.count(); j += stride) {
      term.add((o * d.C + c) * d.inner + (j < 0 ? 0 : i), ch, s1, s2, j >= 0);
      o += so, i += si;
      if (i >= d.inner) i -= d.inner, ++o;
      else if (i < 0) i += d.inner, --o;  // the step from the lead (inner > lead: one wrap)
    }
    const double t1 = block_sum(s1, scratch);
    const double t2 = block_sum(s2, scratch);
    if (threadIdx.x == 0) {
      SEGNET_STORE(partial + (int64_t(blockIdx.y) * d.C + c) * 2, t1);
      SEGNET_STORE(partial + (int64_t(blockIdx.y) * d.C + c) * 2 + 1, t2);
    }
  }
}

// Stage 1, channels_last: block (32, ROWS) threads; threadIdx.x picks a channel of a
// 32-channel tile (blockIdx.x), threadIdx.y a row of slice blockIdx.y: a warp reads 32
// consecutive channels of one row (coalesced). Per-channel sums across threadIdx.y go
// through shared memory in a fixed order.
template <typename T, typename A, typename Term>
__global__ void __launch_bounds__(kMaxThreadsPerBlock) channel_partials_nhwc(Term term, ChannelDims d, double* __restrict__ partial) {
  __shared__ double sums[2][32][33];
  const int64_t c = int64_t(blockIdx.x) * 32 + threadIdx.x;
  A s1 = 0, s2 = 0;
  if (c < d.C) {
    const auto ch = term.prepare(c, d);
    const int64_t stride = int64_t(gridDim.y) * blockDim.y;
    for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < d.outer; r += stride)
      term.add(r * d.C + c, ch, s1, s2);
  }
  sums[0][threadIdx.y][threadIdx.x] = s1;
  sums[1][threadIdx.y][threadIdx.x] = s2;
  __syncthreads();
  if (threadIdx.y == 0 && c < d.C) {
    double t1 = 0, t2 = 0;
    for (unsigned y = 0; y < blockDim.y; ++y) t1 += sums[0][y][threadIdx.x], t2 += sums[1][y][threadIdx.x];
    SEGNET_STORE(partial + (int64_t(blockIdx.y) * d.C + c) * 2, t1);
    SEGNET_STORE(partial + (int64_t(blockIdx.y) * d.C + c) * 2 + 1, t2);
  }
}

// Stage 2 of the statistics: one thread per channel (grid-stride) adds its P partials
// in slice order and writes mean and biased variance.
template <typename T, typename A>
__global__ void __launch_bounds__(kMaxThreadsPerBlock) stats_finish(const T* __restrict__ x, ChannelDims d, const double* __restrict__ partial, int slices,
                             A* __restrict__ mean, A* __restrict__ var) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < d.C; c += int64_t(gridDim.x) * blockDim.x) {
    double s1 = 0, s2 = 0;
    for (int p = 0; p < slices; ++p)
      s1 += SEGNET_LOAD(partial + (p * d.C + c) * 2), s2 += SEGNET_LOAD(partial + (p * d.C + c) * 2 + 1);
    const Moments m = Moments::from_shifted(double(d.count()), double(static_cast<A>(SEGNET_LOAD(x + c * d.inner))), s1, s2);
    SEGNET_STORE(mean + c, static_cast<A>(m.mean));
    SEGNET_STORE(var + c, static_cast<A>(m.var()));
  }
}

template <typename A>
__global__ void __launch_bounds__(kMaxThreadsPerBlock) sums_finish(ChannelDims d, const double* __restrict__ partial, int slices, A* __restrict__ sum1,
                            A* __restrict__ sum2) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < d.C; c += int64_t(gridDim.x) * blockDim.x) {
    double s1 = 0, s2 = 0;
    for (int p = 0; p < slices; ++p)
      s1 += SEGNET_LOAD(partial + (p * d.C + c) * 2), s2 += SEGNET_LOAD(partial + (p * d.C + c) * 2 + 1);
    SEGNET_STORE(sum1 + c, static_cast<A>(s1));
    SEGNET_STORE(sum2 + c, static_cast<A>(s2));
  }
}

// Element-wise passes (a ChannelWalk). scale_shift_relu reads x (and the residual), writes y;
// backward_apply reads dy and x, writes dx. With a residual (null: none),
// y = relu(x * scale + shift + residual), ResNet's add.
template <typename T, typename A, typename I>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    scale_shift_relu_kernel(const T* __restrict__ x, ChannelWalk<I> walk, const A* __restrict__ scale,
                            const A* __restrict__ shift, bool relu, const T* __restrict__ residual, T* __restrict__ y) {
  struct Params {
    A scale, shift;
  };
  walk(y, [&](I c) { return Params{SEGNET_LOAD(scale + c), SEGNET_LOAD(shift + c)}; },
       [&](I e, const Params& p, bool active) {
         const A xv = static_cast<A>(SEGNET_LOAD_IF(active, x + e, T(0)));
         const A r = residual ? static_cast<A>(SEGNET_LOAD_IF(active, residual + e, T(0))) : A(0);
         SEGNET_STORE_IF(active, y + e,
                         static_cast<T>(residual ? affine_add_relu(xv, p.scale, p.shift, r, relu)
                                                 : affine_relu(xv, p.scale, p.shift, relu)));
       });
}

template <typename T, typename A, typename I>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    bn_relu_backward_apply_kernel(const T* __restrict__ dy, const T* __restrict__ x, ChannelWalk<I> walk,
                                  const A* __restrict__ scale, const A* __restrict__ shift, const A* __restrict__ mean,
                                  const A* __restrict__ k1, const A* __restrict__ k2, const A* __restrict__ k3,
                                  bool relu, T* __restrict__ dx) {
  struct Params {
    A scale, shift, mean, k1, k2, k3;
  };
  walk(dx, [&](I c) {
         return Params{SEGNET_LOAD(scale + c), SEGNET_LOAD(shift + c), SEGNET_LOAD(mean + c),
                       SEGNET_LOAD(k1 + c),    SEGNET_LOAD(k2 + c),    SEGNET_LOAD(k3 + c)};
       },
       [&](I e, const Params& p, bool active) {
         const A xv = static_cast<A>(SEGNET_LOAD_IF(active, x + e, T(0)));
         const A g = static_cast<A>(SEGNET_LOAD_IF(active, dy + e, T(0)));
         SEGNET_STORE_IF(active, dx + e,
                         static_cast<T>(bn_relu_input_grad(xv, g, p.scale, p.shift, p.mean, p.k1, p.k2, p.k3, relu)));
       });
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
  // channels_last: 128 rows per thread, so that the 16-byte partials (written, then read by
  // the finish) weigh little against the rows read
  const int64_t per_slice = channels_last ? int64_t(p.rows_per_block) * 128 : int64_t(cfg.threads) * 16;
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
    const auto geometry = walk_geometry(d, cfg, 32);  // 2 parameters per thread
    SEGNET_LAUNCH(kernel, geometry.first, geometry.second, stream, x, ChannelWalk<I>(d), scale, shift, relu, residual, y);
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
    const auto geometry = walk_geometry(d, cfg, 64);  // 6 parameters per thread
    SEGNET_LAUNCH(kernel, geometry.first, geometry.second, stream, dy, x, ChannelWalk<I>(d), scale, shift, mean, k1, k2, k3, relu, dx);
  });
}

}  // namespace kernels
}  // namespace segnet
