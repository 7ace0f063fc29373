// CUDA kernels of max_pool2x2, max_unpool2x2 and max_unpool2x2_backward.
// Raw pointers only: this header also compiles on the host against the CUDA
// emulation header (tests/cuda_emu/), which is how the tests run these kernels.
#pragma once

#include "common/pool2x2.h"
#include "kernels/launch.cuh"

namespace segnet {
namespace kernels {

struct PoolDims {
  int64_t N, C, H, W, Ho, Wo;
  SEGNET_HD int64_t windows() const { return N * C * Ho * Wo; }
};

// Pools window (n, c, oh, ow) of x: writes its maximum to y, returns its code. An inactive
// lane (predicated off) loads and stores nothing and returns 0.
template <typename T, typename I>
__device__ __forceinline__ uint8_t pool_window(const T* __restrict__ x, Strides4 xs, T* __restrict__ y, Strides4 ys,
                                               I H, I W, I n, I c, I oh, I ow, bool active = true) {
  const bool col1 = 2 * ow + 1 < W, row1 = 2 * oh + 1 < H;
  const T* p = x + (active ? xs.at(n, c, 2 * oh, 2 * ow) : 0);
  const T v00 = SEGNET_LOAD_IF(active, p, T(0));
  T m;
  const uint8_t code =
      window_argmax(v00, SEGNET_LOAD_IF(active && col1, p + xs.w, v00), SEGNET_LOAD_IF(active && row1, p + xs.h, v00),
                    SEGNET_LOAD_IF(active && col1 && row1, p + xs.h + xs.w, v00), col1, row1, &m);
  SEGNET_STORE_IF(active, y + (active ? ys.at(n, c, oh, ow) : 0), m);
  return active ? code : 0;
}

// Pooling, channels_last where Ho*Wo % 4 != 0 (a packed byte may hold windows of two
// channels): one thread owns each packed byte and pools its 4 windows.
template <typename T>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    max_pool2x2_kernel(const T* __restrict__ x, Strides4 xs, T* __restrict__ y, Strides4 ys,
                       uint8_t* __restrict__ packed, PoolDims d) {
  const int64_t bytes = packed_bytes(d.windows()), windows = d.windows();
  for (int64_t byte = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; byte < bytes;
       byte += int64_t(gridDim.x) * blockDim.x) {
    uint8_t bits = 0;
    for (int i = 0; i < 4 && 4 * byte + i < windows; ++i) {
      const int64_t k = 4 * byte + i, ow = k % d.Wo, oh = (k / d.Wo) % d.Ho, c = (k / (d.Wo * d.Ho)) % d.C;
      bits |= pool_window(x, xs, y, ys, d.H, d.W, k / (d.Wo * d.Ho * d.C), c, oh, ow) << (2 * i);
    }
    SEGNET_STORE(packed + byte, bits);
  }
}

// Pooling, channels_last with Ho*Wo % 4 == 0 (a byte's windows are of one channel): a block
// takes tiles of 32 channels x 32 packed-byte positions of one image (128 windows of each
// channel); threadIdx.x is the channel, so every load and value store of a warp covers 32
// consecutive channels of one pixel; the codes go through shared memory, so that each
// channel's 32 bytes (consecutive: the packed codes are in NCHW window order) are stored by
// one warp instruction. Index math in I.
template <typename T, typename I>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    max_pool2x2_nhwc_tile_kernel(const T* __restrict__ x, T* __restrict__ y, uint8_t* __restrict__ packed, PoolDims d,
                                 Divider<I> wo, Divider<I> byte_tiles, Divider<I> channel_tiles) {
  __shared__ uint8_t codes[32][33];
  const I C = I(d.C), H = I(d.H), W = I(d.W), plane_bytes = I(d.Ho * d.Wo / 4);
  const I tiles = I(d.N) * byte_tiles.divisor * channel_tiles.divisor;
  const Strides4 xs = dense_strides(d.C, d.H, d.W, true), ys = dense_strides(d.C, d.Ho, d.Wo, true);
  for (I tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const I rest = channel_tiles.div(tile), first_channel = (tile - rest * channel_tiles.divisor) * 32;
    const I n = byte_tiles.div(rest), first_byte = (rest - n * byte_tiles.divisor) * 32;
    const I c = first_channel + threadIdx.x;
    for (I jj = threadIdx.y; jj < 32; jj += blockDim.y) {
      const I j = first_byte + jj;
      const bool active = c < C && j < plane_bytes;
      uint8_t bits = 0;
      for (I i = 0; i < 4; ++i) {
        const I p = 4 * j + i, oh = wo.div(p), ow = p - oh * wo.divisor;
        bits |= pool_window(x, xs, y, ys, H, W, n, c, oh, ow, active) << (2 * i);
      }
      codes[threadIdx.x][jj] = bits;
    }
    __syncthreads();
    for (I cc = threadIdx.y; cc < 32; cc += blockDim.y) {
      const I channel = first_channel + cc, j = first_byte + threadIdx.x;
      SEGNET_STORE_IF(channel < C && j < plane_bytes, packed + (n * C + channel) * plane_bytes + j,
                      codes[cc][threadIdx.x]);
    }
    __syncthreads();  // codes is refilled for the next tile
  }
}

// Pooling, NCHW with W % 8 == 0 (so Wo % 4 == 0 and a byte's 4 windows share a row):
// one thread owns a byte, loads its 2 x 8 input elements as aligned vectors and stores
// its 4 values as one vector.
template <typename T>
__global__ void __launch_bounds__(kMaxThreadsPerBlock) max_pool2x2_nchw_vec_kernel(const T* __restrict__ x, T* __restrict__ y,
                                            uint8_t* __restrict__ packed, PoolDims d) {
  const int64_t bytes = d.windows() / 4;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < bytes;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = 4 * t, row = k / d.Wo, ow = k % d.Wo;
    const int64_t h = 2 * (row % d.Ho), plane = row / d.Ho;
    const T* r0 = x + (plane * d.H + h) * d.W + 2 * ow;
    const bool row1 = h + 1 < d.H;
    using In = AlignedVec<T, 8>;
    using Out = AlignedVec<T, 4>;
    const In a = SEGNET_LOAD(reinterpret_cast<const In*>(r0));
    const In b = SEGNET_LOAD_IF(row1, reinterpret_cast<const In*>(r0 + d.W), a);
    Out out;
    uint8_t bits = 0;
    for (int i = 0; i < 4; ++i) {
      bits |= window_argmax(a.v[2 * i], a.v[2 * i + 1], b.v[2 * i], b.v[2 * i + 1], true, row1,
                            &out.v[i])
              << (2 * i);
    }
    SEGNET_STORE(reinterpret_cast<Out*>(y + k), out);
    SEGNET_STORE(packed + t, bits);
  }
}

// Pooling, NCHW where the vectorised kernel does not apply (W % 8 != 0: SegNet's 60- and
// 30-wide maps, odd sizes): one thread per window, a warp 32 consecutive windows (their
// values consecutive: coalesced stores), reading each of its two input rows as one 2-element
// load where W is even and x 2-element aligned (`pairs`); the 4 lanes of a packed byte OR
// their codes together by shuffles and the first stores the byte. The loop runs while any lane of the warp has a window (the
// shuffles need every lane), the others idle. Blocks of a multiple of 4 threads, so that a
// byte's 4 windows are lanes 4j..4j+3 of one warp. Index math in I.
template <typename T, typename I>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    max_pool2x2_nchw_kernel(const T* __restrict__ x, T* __restrict__ y, uint8_t* __restrict__ packed, PoolDims d,
                            Unravel<I, false> unravel, bool pairs) {
  using Pair = AlignedVec<T, 2>;
  const I windows = I(d.windows()), C = I(d.C), H = I(d.H), W = I(d.W);
  const I lane = threadIdx.x % 32;
  for (I k = I(blockIdx.x) * blockDim.x + threadIdx.x; k - lane < windows; k += I(gridDim.x) * blockDim.x) {
    const bool active = k < windows;
    I n, c, oh, ow;
    unravel(active ? k : 0, n, c, oh, ow);
    const I h = 2 * oh, w = 2 * ow;
    const bool col1 = w + 1 < W, row1 = h + 1 < H;
    const T* top = x + ((n * C + c) * H + h) * W + w;
    T v00, v01, v10, v11;
    if (pairs) {
      const Pair a = SEGNET_LOAD_IF(active, reinterpret_cast<const Pair*>(top), Pair{});
      const Pair b = SEGNET_LOAD_IF(active && row1, reinterpret_cast<const Pair*>(top + W), a);
      v00 = a.v[0], v01 = a.v[1], v10 = b.v[0], v11 = b.v[1];
    } else {
      v00 = SEGNET_LOAD_IF(active, top, T(0));
      v01 = SEGNET_LOAD_IF(active && col1, top + 1, v00);
      v10 = SEGNET_LOAD_IF(active && row1, top + W, v00);
      v11 = SEGNET_LOAD_IF(active && row1 && col1, top + W + 1, v00);
    }
    T m;
    const unsigned code = window_argmax(v00, v01, v10, v11, col1, row1, &m);
    unsigned bits = active ? code << (2 * (k & 3)) : 0u;
    bits |= __shfl_xor_sync(0xffffffffu, bits, 1);
    bits |= __shfl_xor_sync(0xffffffffu, bits, 2);
    SEGNET_STORE_IF(active, y + k, m);
    SEGNET_STORE_IF(active && (k & 3) == 0, packed + (k >> 2), uint8_t(bits));
  }
}

// Unpooling, channels_last: one thread per output element, in memory order (coalesced
// stores), every element written once: the value where the window's code points here, else
// zero; reads a value only where it is placed.
// Unpooling, NCHW: one thread per window (a warp: consecutive windows of a row), which reads
// its code byte and value once and writes its 2x2 block as two rows of two (one 2-element
// store each where W is even and y 2-element aligned: `pairs`), plus the zeros of a last row or column that no window covers
// (floor mode, odd H or W): y's sectors once, v's once, the packed bytes 4 lanes to a byte.
// `unravel` splits the loop index: output elements (channels_last) or windows (NCHW);
// `pairs` only matters for NCHW.
// Index math in I (32-bit below 2^31 elements: no 64-bit division).
template <typename T, typename I, bool CHANNELS_LAST>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    max_unpool2x2_kernel(const T* __restrict__ v, const uint8_t* __restrict__ packed, T* __restrict__ y, PoolDims d,
                         Unravel<I, CHANNELS_LAST> unravel, bool pairs) {
  const I C = I(d.C), H = I(d.H), W = I(d.W), Ho = I(d.Ho), Wo = I(d.Wo);
  if constexpr (CHANNELS_LAST) {
    const I total = I(d.N * d.C * d.H * d.W);
    const Strides4 vs = dense_strides(d.C, d.Ho, d.Wo, true);
    for (I t = I(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += I(gridDim.x) * blockDim.x) {
      I n, c, h, w;
      unravel(t, n, c, h, w);
      const I oh = h >> 1, ow = w >> 1;
      const bool inside = oh < Ho && ow < Wo;
      const I k = ((n * C + c) * Ho + oh) * Wo + ow;
      const uint8_t byte = SEGNET_LOAD_IF(inside, packed + (k >> 2), uint8_t(0));
      const bool here = inside && code_in(byte, k) == 2 * (h & 1) + (w & 1);
      SEGNET_STORE(y + t, SEGNET_LOAD_IF(here, v + vs.at(n, c, oh, ow), T(0)));
    }
  } else {
    using Pair = AlignedVec<T, 2>;
    const I windows = I(d.windows());
    for (I k = I(blockIdx.x) * blockDim.x + threadIdx.x; k < windows; k += I(gridDim.x) * blockDim.x) {
      I n, c, oh, ow;
      unravel(k, n, c, oh, ow);
      const uint8_t code = code_in(SEGNET_LOAD(packed + (k >> 2)), k);
      const T value = SEGNET_LOAD(v + k), zero = T(0);
      const I h = 2 * oh, w = 2 * ow;
      const bool col1 = w + 1 < W, row1 = h + 1 < H;
      const bool col2 = ow + 1 == Wo && w + 2 < W, row2 = oh + 1 == Ho && h + 2 < H;  // uncovered
      T* top = y + ((n * C + c) * H + h) * W + w;
      const T a0 = code == 0 ? value : zero, a1 = code == 1 ? value : zero;
      const T b0 = code == 2 ? value : zero, b1 = code == 3 ? value : zero;
      if (pairs) {
        SEGNET_STORE(reinterpret_cast<Pair*>(top), (Pair{{a0, a1}}));
        SEGNET_STORE_IF(row1, reinterpret_cast<Pair*>(top + W), (Pair{{b0, b1}}));
      } else {
        SEGNET_STORE(top, a0);
        SEGNET_STORE_IF(col1, top + 1, a1);
        SEGNET_STORE_IF(row1, top + W, b0);
        SEGNET_STORE_IF(row1 && col1, top + W + 1, b1);
      }
      SEGNET_STORE_IF(col2, top + 2, zero);
      SEGNET_STORE_IF(col2 && row1, top + W + 2, zero);
      for (I j = 0; j < I(2 + col2); ++j) SEGNET_STORE_IF(row2 && w + j < W, top + 2 * W + j, zero);
    }
  }
}

// Unpooling backward: one thread per gradient of a value, in memory order; gathers the
// output gradient at the window's arg-max (zero where the code points outside the output).
template <typename T, typename I, bool CHANNELS_LAST>
__global__ void __launch_bounds__(kMaxThreadsPerBlock) max_unpool2x2_backward_kernel(const T* __restrict__ go,
                                              const uint8_t* __restrict__ packed,
                                              T* __restrict__ gv, PoolDims d, Unravel<I, CHANNELS_LAST> unravel) {
  const I total = I(d.windows()), C = I(d.C), H = I(d.H), W = I(d.W), Ho = I(d.Ho), Wo = I(d.Wo);
  const Strides4 gs = dense_strides(d.C, d.H, d.W, CHANNELS_LAST);
  for (I t = I(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += I(gridDim.x) * blockDim.x) {
    I n, c, oh, ow;
    unravel(t, n, c, oh, ow);
    const I k = ((n * C + c) * Ho + oh) * Wo + ow;
    const uint8_t code = code_in(SEGNET_LOAD(packed + (k >> 2)), k);
    const I h = 2 * oh + (code >> 1), w = 2 * ow + (code & 1);
    SEGNET_STORE(gv + t, SEGNET_LOAD_IF(h < H && w < W, go + gs.at(n, c, h, w), T(0)));
  }
}

// ---- launchers: x, y, v, go, gv are dense in the given memory format ----

template <typename T>
void launch_max_pool2x2(const T* x, T* y, uint8_t* packed, PoolDims d, bool channels_last,
                        cudaStream_t stream, LaunchConfig cfg = {}) {
  const int64_t bytes = packed_bytes(d.windows());
  if (bytes == 0) return;
  const Strides4 xs = dense_strides(d.C, d.H, d.W, channels_last);
  const Strides4 ys = dense_strides(d.C, d.Ho, d.Wo, channels_last);
  if (!channels_last && d.W % 8 == 0 && is_aligned_for_vec<T, 8>(x) &&
      is_aligned_for_vec<T, 4>(y)) {
    auto kernel = max_pool2x2_nchw_vec_kernel<T>;
    SEGNET_LAUNCH(kernel, blocks_for(bytes, cfg), cfg.threads, stream, x, y, packed, d);
  } else if (channels_last && (d.Ho * d.Wo) % 4 == 0) {
    with_index_type(d.N * d.C * d.H * d.W, cfg, [&](auto index) {
      using I = decltype(index);
      auto kernel = max_pool2x2_nhwc_tile_kernel<T, I>;
      const int64_t byte_tiles = (d.Ho * d.Wo / 4 + 31) / 32, channel_tiles = (d.C + 31) / 32;
      const int64_t tiles = d.N * byte_tiles * channel_tiles;
      SEGNET_LAUNCH(kernel, unsigned(std::min(tiles, cfg.max_blocks)), dim3(32, std::max(1, cfg.threads / 32)),
                    stream, x, y, packed, d, Divider<I>(d.Wo), Divider<I>(byte_tiles), Divider<I>(channel_tiles));
    });
  } else if (!channels_last) {
    with_index_type(d.N * d.C * d.H * d.W, cfg, [&](auto index) {
      using I = decltype(index);
      auto kernel = max_pool2x2_nchw_kernel<T, I>;
      const int threads = std::max(4, cfg.threads / 4 * 4);
      SEGNET_LAUNCH(kernel, blocks_for(d.windows(), LaunchConfig{threads, cfg.max_blocks}), threads, stream, x, y,
                    packed, d, Unravel<I, false>(d.C, d.Ho, d.Wo), d.W % 2 == 0 && is_aligned_for_vec<T, 2>(x));
    });
  } else {
    auto kernel = max_pool2x2_kernel<T>;
    SEGNET_LAUNCH(kernel, blocks_for(bytes, cfg), cfg.threads, stream, x, xs, y, ys, packed, d);
  }
}

template <typename T>
void launch_max_unpool2x2(const T* v, const uint8_t* packed, T* y, PoolDims d, bool channels_last,
                          cudaStream_t stream, LaunchConfig cfg = {}) {
  const int64_t total = d.N * d.C * d.H * d.W;
  if (total == 0) return;
  with_index_type(total, cfg, [&](auto index) {
    using I = decltype(index);
    if (channels_last || d.windows() == 0) {  // no window (H or W is 1, floor mode): all zeros, in either layout
      auto kernel = max_unpool2x2_kernel<T, I, true>;
      SEGNET_LAUNCH(kernel, blocks_for(total, cfg), cfg.threads, stream, v, packed, y, d,
                    Unravel<I, true>(d.C, d.H, d.W), false);
    } else {
      auto kernel = max_unpool2x2_kernel<T, I, false>;
      SEGNET_LAUNCH(kernel, blocks_for(d.windows(), cfg), cfg.threads, stream, v, packed, y, d,
                    Unravel<I, false>(d.C, d.Ho, d.Wo), d.W % 2 == 0 && is_aligned_for_vec<T, 2>(y));
    }
  });
}

template <typename T>
void launch_max_unpool2x2_backward(const T* go, const uint8_t* packed, T* gv, PoolDims d,
                                   bool channels_last, cudaStream_t stream,
                                   LaunchConfig cfg = {}) {
  const int64_t total = d.windows();
  if (total == 0) return;
  with_index_type(d.N * d.C * d.H * d.W, cfg, [&](auto index) {  // the gathers index the full map
    with_layout(channels_last, [&](auto layout) {
      using I = decltype(index);
      constexpr bool CL = decltype(layout)::value;
      auto kernel = max_unpool2x2_backward_kernel<T, I, CL>;
      SEGNET_LAUNCH(kernel, blocks_for(total, cfg), cfg.threads, stream, go, packed, gv, d,
                    Unravel<I, CL>(d.C, d.Ho, d.Wo));
    });
  });
}

}  // namespace kernels
}  // namespace segnet
