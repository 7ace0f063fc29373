// CUDA kernels of the BN+ReLU ops (rules in common/bn_relu.h). Raw pointers only: this
// header also compiles on the host against the CUDA emulation header (tests/cuda_emu/).
//
// An activation is seen as [outer, C, inner]: NCHW is [N, C, H*W], channels_last is
// [N*H*W, C, 1]. Per-channel reductions run in two deterministic stages (no atomics):
// partial sums of P slices of every channel into a [P, C, 2] double buffer, then one
// thread per channel adds its P partials in order. With one slice (P = 1: small maps) the
// first stage writes the outputs itself.
#pragma once

#include <initializer_list>

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
//     plane's start, the lanes before the start idle (element's `active` false), so that every
//     warp instruction covers whole sectors whatever the plane's size;
//   channels_last (inner == 1): the first S = C * floor(grid threads / C) threads each keep
//     channel t % C and step by S (the launcher gives the grid at least C threads).
// With `vectors` (every pointer, parameters included, aligned to its vector):
//   NCHW: a thread takes V = 16 / sizeof(T) consecutive elements of its plane at a time, as
//     one 16-byte vector: chunk(e, params, V) for elements e .. e + V - 1 from the plane's
//     first 32-byte boundary of `anchor` (params of width 1: the plane's channel), and
//     element() for the elements before it and after the plane's last whole vector (a lane
//     each);
//   channels_last (C % K == 0): the first S = (C / K) * floor(grid threads / (C / K)) threads
//     each keep K consecutive channels K * (t % (C / K)) .. + K - 1, load their parameters as
//     one vector per array (width K), and step by K * S, K elements at a time:
//     chunk(e, params, K). A warp's parameter loads cover 32 K consecutive channels, where K
//     strided scalar loads per array would move each sector K times. K = 16 / sizeof(T)
//     (16-byte vectors) unless the kernel caps it (walk_k: a thread holds K parameters per
//     array in registers).
// load(Width<n>{}, c) loads the parameters of channels c .. c + n - 1.
template <int N>
using Width = std::integral_constant<int, N>;

// K consecutive per-channel parameters from p + c, one vector load (K = 1: a scalar).
template <int K, typename A, typename I>
__device__ __forceinline__ AlignedVec<A, K> load_params(const A* __restrict__ p, I c) {
  using Vec = AlignedVec<A, K>;
  return SEGNET_LOAD(reinterpret_cast<const Vec*>(p + c));
}

template <typename I, int K>
struct ChannelWalk {
  I numel, inner;
  Divider<I> C, groups;  // groups: C / K channel groups of a channels_last vector walk
  bool vectors;
  ChannelWalk(ChannelDims d, bool vectors)
      : numel(I(d.numel())), inner(I(d.inner)), C(d.C), groups(d.C / K), vectors(vectors) {}

  template <typename T, typename Load, typename Element, typename Chunk>
  __device__ __forceinline__ void operator()(const T* anchor, Load load, Element element, Chunk chunk) const {
    constexpr I V = 16 / sizeof(T);
    if (inner > 1) {
      for (I p = blockIdx.x; p * inner < numel; p += gridDim.x) {
        const auto params = load(Width<1>{}, C.mod(p));
        const I first = p * inner, lead = I(reinterpret_cast<uintptr_t>(anchor + first) % 32 / sizeof(T));
        if (!vectors) {
          for (I i = threadIdx.x; i < inner + lead; i += blockDim.x) {
            const bool active = i >= lead;
            element(active ? first + i - lead : first, params, active);
          }
          continue;
        }
        // the elements before the plane's first 32-byte boundary and after its last whole
        // vector, a lane each (one warp instruction apiece); whole vectors between them
        const I head = lead ? (32 / sizeof(T) - lead < inner ? 32 / sizeof(T) - lead : inner) : I(0);
        const I vectors_in_plane = (inner - head) / V, tail_start = head + vectors_in_plane * V;
        if (threadIdx.x < head) element(first + threadIdx.x, params, true);
        for (I i = threadIdx.x; i < vectors_in_plane; i += blockDim.x)
          chunk(first + head + i * V, params, Width<int(V)>{});
        if (threadIdx.x < inner - tail_start) element(first + tail_start + threadIdx.x, params, true);
      }
    } else if (vectors) {
      const I t = I(blockIdx.x) * blockDim.x + threadIdx.x;
      const I stride = groups.div(I(gridDim.x) * blockDim.x) * groups.divisor;
      if (t >= stride) return;
      const auto params = load(Width<K>{}, K * groups.mod(t));
      for (I e = K * t; e < numel; e += K * stride) chunk(e, params, Width<K>{});
    } else {
      const I t = I(blockIdx.x) * blockDim.x + threadIdx.x;
      const I stride = C.div(I(gridDim.x) * blockDim.x) * C.divisor;
      if (t >= stride) return;
      const auto params = load(Width<1>{}, C.mod(t));
      for (I e = t; e < numel; e += stride) element(e, params, true);
    }
  }
};

// Channels per thread of a channels_last vector walk: 16-byte vectors, at most kMaxK.
template <typename T, int kMaxK>
constexpr int walk_k() {
  return 16 / int(sizeof(T)) < kMaxK ? 16 / int(sizeof(T)) : kMaxK;
}

// Whether a ChannelWalk over d may move vectors of T (K channels at a time in channels_last),
// given every tensor it accesses and every per-channel parameter array (of A).
template <typename T, typename A>
bool walk_vectors(const ChannelDims& d, int K, std::initializer_list<const void*> tensors,
                  std::initializer_list<const A*> params) {
  if (d.inner == 1 && d.C % K != 0) return false;
  const size_t alignment = d.inner > 1 ? 16 : K * sizeof(T);
  for (const void* p : tensors)
    if (p && reinterpret_cast<uintptr_t>(p) % alignment != 0) return false;
  for (const A* p : params)
    if (d.inner == 1 && reinterpret_cast<uintptr_t>(p) % (K * sizeof(A)) != 0) return false;
  return true;
}

// Blocks and threads for a ChannelWalk, about `per_thread` elements per thread per channel it
// keeps (K in a channels_last vector walk, else 1), so that each thread's parameters (loaded
// once per plane or once) weigh little against its elements: NCHW, a block per plane (up to
// the cap) of just enough warps; channels_last, at least C threads.
inline std::pair<unsigned, int> walk_geometry(const ChannelDims& d, const LaunchConfig& cfg, int64_t per_thread,
                                              int K = 1) {
  if (d.inner > 1) {
    const int64_t threads = std::min<int64_t>(cfg.threads, std::max<int64_t>(32, (d.inner / per_thread + 31) / 32 * 32));
    return {static_cast<unsigned>(std::min<int64_t>(d.outer * d.C, cfg.max_blocks)), static_cast<int>(threads)};
  }
  const int64_t want = std::max<int64_t>(d.C, d.numel() / (per_thread * K));
  return {static_cast<unsigned>(std::max<int64_t>((d.C + cfg.threads - 1) / cfg.threads,
                                                  std::min<int64_t>((want + cfg.threads - 1) / cfg.threads,
                                                                    cfg.max_blocks))),
          cfg.threads};
}

// What a reduction adds per element: the shifted moments of x (stats), or the gradient
// sums g and g * (x - mean) (backward). prepare(c) loads what channel c's terms share once
// (a thread's channel is fixed while it loops over the channel's elements); finish turns a
// channel's two sums into the op's two outputs (mean and biased variance; the sums).
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
  SEGNET_HD static void finish(const Channel& ch, int64_t count, double s1, double s2, A* mean, A* var) {
    const Moments m = Moments::from_shifted(double(count), double(ch.pivot), s1, s2);
    SEGNET_STORE(mean, static_cast<A>(m.mean));
    SEGNET_STORE(var, static_cast<A>(m.var()));
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
  SEGNET_HD static void finish(const Channel&, int64_t, double s1, double s2, A* sum_g, A* sum_gc) {
    SEGNET_STORE(sum_g, static_cast<A>(s1));
    SEGNET_STORE(sum_gc, static_cast<A>(s2));
  }
};

// A block's partial sums of one channel: one 16-byte store (and load in the finish) where two
// 8-byte ones would each move a sector. The launchers take the caller's buffer of
// ReductionPlan::partial_doubles() doubles (16-byte aligned, as every allocation).
using Partial = AlignedVec<double, 2>;

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
// the channel's terms for the block. The stride slices*threads = so * inner + si (split by
// the launcher); the one division per thread and channel in I.
template <typename T, typename A, typename Term, typename I>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    channel_partials_nchw(Term term, ChannelDims d, Divider<I> inner, int64_t so, int64_t si,
                          Partial* __restrict__ partial, A* __restrict__ out1, A* __restrict__ out2) {
  __shared__ double scratch[1024];
  __shared__ typename Term::Channel channel;
  const int64_t stride = int64_t(gridDim.y) * blockDim.x;
  for (int64_t c = blockIdx.x; c < d.C; c += gridDim.x) {
    __syncthreads();  // channel may still be read for the previous one
    if (threadIdx.x == 0) channel = term.prepare(c, d);
    __syncthreads();
    const auto ch = channel;
    A s1 = 0, s2 = 0;
    const I lead = d.inner >= 32 ? I(reinterpret_cast<uintptr_t>(term.x + c * d.inner) % 32 / sizeof(T)) : I(0);
    // j = o * inner + i steps by stride = so * inner + si, so its element's offset
    // at = (o * C + c) * inner + i by so * C * inner + si, and by (C - 1) * inner more where i
    // wraps: the one division before the loop, no multiplication in it. Counted from the
    // lead (jl = j + lead), in I: where I is unsigned, `at` is exact modulo 2^32 and below
    // 2^31 wherever it is used.
    const I plane = I(d.C) * I(d.inner), wrap = plane - I(d.inner), step = I(so) * plane + I(si);
    const I end = I(d.count()) + lead, first = I(c) * I(d.inner);
    I jl = I(blockIdx.y) * I(blockDim.x) + I(threadIdx.x);
    const I o = jl < lead ? I(0) : inner.div(jl - lead);
    int64_t i = int64_t(jl) - int64_t(lead) - int64_t(o) * d.inner;  // >= -lead
    I at = (o * I(d.C)) * I(d.inner) + first + I(i);
    for (; jl < end; jl += I(stride)) {
      term.add(jl < lead ? first : at, ch, s1, s2, jl >= lead);
      at += step, i += si;
      if (i >= d.inner) i -= d.inner, at += wrap;
      else if (i < 0) i += d.inner, at -= wrap;  // the step from the lead (inner > lead: one wrap)
    }
    const double t1 = block_sum(s1, scratch);
    const double t2 = block_sum(s2, scratch);
    if (threadIdx.x == 0 && gridDim.y == 1) {
      Term::finish(ch, d.count(), t1, t2, out1 + c, out2 + c);
    } else if (threadIdx.x == 0) {
      SEGNET_STORE(partial + int64_t(blockIdx.y) * d.C + c, (Partial{{t1, t2}}));
    }
  }
}

// Stage 1, channels_last: block (32, ROWS) threads; threadIdx.x picks a channel of a
// 32-channel tile (blockIdx.x), threadIdx.y a row of slice blockIdx.y: a warp reads 32
// consecutive channels of one row (coalesced). Per-channel sums across threadIdx.y go
// through shared memory in a fixed order. Rows counted in I.
template <typename T, typename A, typename Term, typename I>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    channel_partials_nhwc(Term term, ChannelDims d, Partial* __restrict__ partial, A* __restrict__ out1,
                          A* __restrict__ out2) {
  __shared__ double sums[2][32][33];
  const int64_t c = int64_t(blockIdx.x) * 32 + threadIdx.x;
  A s1 = 0, s2 = 0;
  typename Term::Channel ch{};
  if (c < d.C) {
    ch = term.prepare(c, d);
    const I stride = I(gridDim.y) * blockDim.y, rows = I(d.outer);
    for (I r = I(blockIdx.y) * blockDim.y + threadIdx.y; r < rows; r += stride) term.add(int64_t(r) * d.C + c, ch, s1, s2);
  }
  sums[0][threadIdx.y][threadIdx.x] = s1;
  sums[1][threadIdx.y][threadIdx.x] = s2;
  __syncthreads();
  if (threadIdx.y == 0 && c < d.C) {
    double t1 = 0, t2 = 0;
    for (unsigned y = 0; y < blockDim.y; ++y) t1 += sums[0][y][threadIdx.x], t2 += sums[1][y][threadIdx.x];
    if (gridDim.y == 1) {
      Term::finish(ch, d.count(), t1, t2, out1 + c, out2 + c);
    } else {
      SEGNET_STORE(partial + int64_t(blockIdx.y) * d.C + c, (Partial{{t1, t2}}));
    }
  }
}

// Stage 2 of the statistics: one thread per channel (grid-stride) adds its P partials
// in slice order and writes mean and biased variance.
template <typename T, typename A>
__global__ void __launch_bounds__(kMaxThreadsPerBlock) stats_finish(const T* __restrict__ x, ChannelDims d, const Partial* __restrict__ partial, int slices,
                             A* __restrict__ mean, A* __restrict__ var) {
  const int C = int(d.C);  // channels: below 2^31
  for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < C; c += gridDim.x * blockDim.x) {
    double s1 = 0, s2 = 0;
    for (int p = 0; p < slices; ++p) {
      const Partial sums = SEGNET_LOAD(partial + int64_t(p) * C + c);
      s1 += sums.v[0], s2 += sums.v[1];
    }
    const Moments m = Moments::from_shifted(double(d.count()), double(static_cast<A>(SEGNET_LOAD(x + c * d.inner))), s1, s2);
    SEGNET_STORE(mean + c, static_cast<A>(m.mean));
    SEGNET_STORE(var + c, static_cast<A>(m.var()));
  }
}

template <typename A>
__global__ void __launch_bounds__(kMaxThreadsPerBlock) sums_finish(ChannelDims d, const Partial* __restrict__ partial, int slices, A* __restrict__ sum1,
                            A* __restrict__ sum2) {
  const int C = int(d.C);  // channels: below 2^31
  for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < C; c += gridDim.x * blockDim.x) {
    double s1 = 0, s2 = 0;
    for (int p = 0; p < slices; ++p) {
      const Partial sums = SEGNET_LOAD(partial + int64_t(p) * C + c);
      s1 += sums.v[0], s2 += sums.v[1];
    }
    SEGNET_STORE(sum1 + c, static_cast<A>(s1));
    SEGNET_STORE(sum2 + c, static_cast<A>(s2));
  }
}

// Element-wise passes (a ChannelWalk), in vectors where the walk allows.
// scale_shift_relu reads x (and the residual), writes y; backward_apply reads dy and x, writes
// dx. With a residual (null: none), y = relu(x * scale + shift + residual), ResNet's add.
// Their parameters for K channels (K = 1: one, for every element of a chunk).
template <typename A, int K>
struct AffineParams {
  AlignedVec<A, K> scale, shift;
};
template <typename A, int K>
struct GradParams {
  AlignedVec<A, K> scale, shift, mean, k1, k2, k3;
};

// 16-byte vectors in channels_last too (8 channels of a 16-bit type): 2 parameters per channel
constexpr int kScaleShiftMaxK = 8;

template <typename T, typename A, typename I>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    scale_shift_relu_kernel(const T* __restrict__ x, ChannelWalk<I, walk_k<T, kScaleShiftMaxK>()> walk,
                            const A* __restrict__ scale, const A* __restrict__ shift, bool relu,
                            const T* __restrict__ residual, T* __restrict__ y) {
  const auto out = [&](A xv, A r, A sc, A sh) {
    return static_cast<T>(residual ? affine_add_relu(xv, sc, sh, r, relu) : affine_relu(xv, sc, sh, relu));
  };
  walk(y,
      [&](auto width, I c) {
        constexpr int K = decltype(width)::value;
        return AffineParams<A, K>{load_params<K>(scale, c), load_params<K>(shift, c)};
      },
      [&](I e, const AffineParams<A, 1>& p, bool active) {
        const A xv = static_cast<A>(SEGNET_LOAD_IF(active, x + e, T(0)));
        const A r = residual ? static_cast<A>(SEGNET_LOAD_IF(active, residual + e, T(0))) : A(0);
        SEGNET_STORE_IF(active, y + e, out(xv, r, p.scale.v[0], p.shift.v[0]));
      },
      [&](I e, const auto& p, auto width) {
        constexpr int N = decltype(width)::value, K = sizeof(p.scale) / sizeof(A);
        using Vec = AlignedVec<T, N>;
        const Vec xs = SEGNET_LOAD(reinterpret_cast<const Vec*>(x + e));
        const Vec rs = residual ? SEGNET_LOAD(reinterpret_cast<const Vec*>(residual + e)) : Vec{};
        Vec ys;
#pragma unroll
        for (int k = 0; k < N; ++k)
          ys.v[k] = out(static_cast<A>(xs.v[k]), residual ? static_cast<A>(rs.v[k]) : A(0), p.scale.v[k % K],
                        p.shift.v[k % K]);
        SEGNET_STORE(reinterpret_cast<Vec*>(y + e), ys);
      });
}

// 4 channels at a time in channels_last (16 bytes in float32, 8 in 16-bit types): 6
// parameters per channel, 24 registers; 8 channels would hold 48.
constexpr int kBackwardApplyMaxK = 4;

template <typename T, typename A, typename I>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    bn_relu_backward_apply_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                  ChannelWalk<I, walk_k<T, kBackwardApplyMaxK>()> walk,
                                  const A* __restrict__ scale, const A* __restrict__ shift, const A* __restrict__ mean,
                                  const A* __restrict__ k1, const A* __restrict__ k2, const A* __restrict__ k3,
                                  bool relu, T* __restrict__ dx) {
  const auto out = [&](A xv, A g, const auto& p, int k) {
    return static_cast<T>(bn_relu_input_grad(xv, g, p.scale.v[k], p.shift.v[k], p.mean.v[k], p.k1.v[k], p.k2.v[k],
                                             p.k3.v[k], relu));
  };
  walk(dx,
      [&](auto width, I c) {
        constexpr int K = decltype(width)::value;
        return GradParams<A, K>{load_params<K>(scale, c), load_params<K>(shift, c), load_params<K>(mean, c),
                                load_params<K>(k1, c),    load_params<K>(k2, c),    load_params<K>(k3, c)};
      },
      [&](I e, const GradParams<A, 1>& p, bool active) {
        const A xv = static_cast<A>(SEGNET_LOAD_IF(active, x + e, T(0)));
        const A g = static_cast<A>(SEGNET_LOAD_IF(active, dy + e, T(0)));
        SEGNET_STORE_IF(active, dx + e, out(xv, g, p, 0));
      },
      [&](I e, const auto& p, auto width) {
        constexpr int N = decltype(width)::value, K = sizeof(p.scale) / sizeof(A);
        using Vec = AlignedVec<T, N>;
        const Vec xs = SEGNET_LOAD(reinterpret_cast<const Vec*>(x + e));
        const Vec gs = SEGNET_LOAD(reinterpret_cast<const Vec*>(dy + e));
        Vec dxs;
#pragma unroll
        for (int k = 0; k < N; ++k) dxs.v[k] = out(static_cast<A>(xs.v[k]), static_cast<A>(gs.v[k]), p, k % K);
        SEGNET_STORE(reinterpret_cast<Vec*>(dx + e), dxs);
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

// Stage 1; with one slice per channel its blocks also write the outputs (out1, out2), and
// the caller launches no stage 2.
template <typename T, typename A, typename Term>
void launch_channel_partials(const Term& term, ChannelDims d, const ReductionPlan& plan, double* partial, A* out1,
                             A* out2, cudaStream_t stream, const LaunchConfig& cfg) {
  Partial* records = reinterpret_cast<Partial*>(partial);
  with_index_type(d.numel(), cfg, [&](auto index) {
    using I = decltype(index);
    if (plan.channels_last) {
      const dim3 grid(static_cast<unsigned>((d.C + 31) / 32), plan.slices);
      auto kernel = channel_partials_nhwc<T, A, Term, I>;
      SEGNET_LAUNCH(kernel, grid, dim3(32, plan.rows_per_block), stream, term, d, records, out1, out2);
    } else {
      const dim3 grid(static_cast<unsigned>(std::min<int64_t>(d.C, std::max<int64_t>(1, cfg.max_blocks / plan.slices))),
                      plan.slices);
      const int64_t stride = int64_t(plan.slices) * cfg.threads;
      auto kernel = channel_partials_nchw<T, A, Term, I>;
      SEGNET_LAUNCH(kernel, grid, cfg.threads, stream, term, d, Divider<I>(d.inner), stride / d.inner,
                    stride % d.inner, records, out1, out2);
    }
  });
}

template <typename T, typename A = typename AccOf<T>::type>
void launch_bn_stats(const T* x, ChannelDims d, bool channels_last, A* mean, A* var, double* partial,
                     const ReductionPlan& plan, cudaStream_t stream, LaunchConfig cfg = {}) {
  if (d.C == 0) return;
  if (d.count() == 0) {
    // no values: mean and variance 0 (the caller rejects training on fewer than 2 values)
    auto finish = sums_finish<A>;
    SEGNET_LAUNCH(finish, blocks_for(d.C, cfg), cfg.threads, stream, d, reinterpret_cast<const Partial*>(partial), 0,
                  mean, var);
    return;
  }
  const StatsTerm<T, A> term{x, nullptr, nullptr, nullptr, nullptr, false};
  launch_channel_partials<T, A>(term, d, plan, partial, mean, var, stream, cfg);
  if (plan.slices == 1) return;
  auto finish = stats_finish<T, A>;
  SEGNET_LAUNCH(finish, blocks_for(d.C, cfg), cfg.threads, stream, x, d, reinterpret_cast<const Partial*>(partial),
                plan.slices, mean, var);
}

template <typename T, typename A = typename AccOf<T>::type>
void launch_bn_relu_backward_reduce(const T* dy, const T* x, ChannelDims d, bool channels_last, const A* scale,
                                    const A* shift, const A* mean, bool relu, A* sum_g, A* sum_gc, double* partial,
                                    const ReductionPlan& plan, cudaStream_t stream, LaunchConfig cfg = {}) {
  if (d.C == 0) return;
  int slices = 0;  // no values: sums of 0
  if (d.count() > 0) {
    const GradTerm<T, A> term{x, dy, scale, shift, mean, relu};
    launch_channel_partials<T, A>(term, d, plan, partial, sum_g, sum_gc, stream, cfg);
    if (plan.slices == 1) return;
    slices = plan.slices;
  }
  auto finish = sums_finish<A>;
  SEGNET_LAUNCH(finish, blocks_for(d.C, cfg), cfg.threads, stream, d, reinterpret_cast<const Partial*>(partial),
                slices, sum_g, sum_gc);
}

template <typename T, typename A = typename AccOf<T>::type>
void launch_scale_shift_relu(const T* x, ChannelDims d, const A* scale, const A* shift, bool relu, const T* residual,
                             T* y, cudaStream_t stream, LaunchConfig cfg = {}) {
  if (d.numel() == 0) return;
  with_index_type(d.numel(), cfg, [&](auto index) {
    using I = decltype(index);
    auto kernel = scale_shift_relu_kernel<T, A, I>;
    constexpr int K = walk_k<T, kScaleShiftMaxK>();
    const bool vectors = walk_vectors<T, A>(d, K, {x, residual, y}, {scale, shift});
    const auto geometry = walk_geometry(d, cfg, 32, vectors ? K : 1);  // 2 parameters per channel
    SEGNET_LAUNCH(kernel, geometry.first, geometry.second, stream, x, ChannelWalk<I, K>(d, vectors), scale, shift,
                  relu, residual, y);
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
    constexpr int K = walk_k<T, kBackwardApplyMaxK>();
    const bool vectors = walk_vectors<T, A>(d, K, {dy, x, dx}, {scale, shift, mean, k1, k2, k3});
    const auto geometry = walk_geometry(d, cfg, 64, vectors ? K : 1);  // 6 parameters per channel
    SEGNET_LAUNCH(kernel, geometry.first, geometry.second, stream, dy, x, ChannelWalk<I, K>(d, vectors), scale, shift,
                  mean, k1, k2, k3, relu, dx);
  });
}

}  // namespace kernels
}  // namespace segnet
