// CUDA kernels of max_pool2x2, max_unpool2x2 and max_unpool2x2_backward.
// Raw pointers only: this header also compiles on the host against the CUDA
// emulation header (tests/cuda_emu/), which is how the tests run these kernels.
#pragma once

#include <initializer_list>

#include "common/pool2x2.h"
#include "kernels/launch.cuh"

namespace segnet {
namespace kernels {

struct PoolDims {
  int64_t N, C, H, W, Ho, Wo;
  SEGNET_HD int64_t elements() const { return N * C * H * W; }
  SEGNET_HD int64_t windows() const { return N * C * Ho * Wo; }
};

// Pools window (n, c, oh, ow) of x and channels c .. c + V - 1 (channels_last: one vector
// per pixel): writes the maxima to y (where `store`), returns their codes (bits 2j, 2j + 1:
// channel c + j). An inactive lane (predicated off) loads and stores nothing and returns 0.
template <int V, typename T, typename I>
__device__ __forceinline__ unsigned pool_window(const T* __restrict__ x, Strides4 xs, T* __restrict__ y, Strides4 ys,
                                                I H, I W, I n, I c, I oh, I ow, bool active, bool store) {
  using Vec = AlignedVec<T, V>;
  const bool col1 = 2 * ow + 1 < W, row1 = 2 * oh + 1 < H;
  const T* p = x + (active ? xs.at(n, c, 2 * oh, 2 * ow) : 0);
  const Vec v00 = SEGNET_LOAD_IF(active, reinterpret_cast<const Vec*>(p), Vec{});
  const Vec v01 = SEGNET_LOAD_IF(active && col1, reinterpret_cast<const Vec*>(p + xs.w), v00);
  const Vec v10 = SEGNET_LOAD_IF(active && row1, reinterpret_cast<const Vec*>(p + xs.h), v00);
  const Vec v11 = SEGNET_LOAD_IF(active && col1 && row1, reinterpret_cast<const Vec*>(p + xs.h + xs.w), v00);
  Vec m;
  unsigned bits = 0;
#pragma unroll
  for (int j = 0; j < V; ++j)
    bits |= unsigned(window_argmax(v00.v[j], v01.v[j], v10.v[j], v11.v[j], col1, row1, &m.v[j])) << (2 * j);
  SEGNET_STORE_IF(active && store, reinterpret_cast<Vec*>(y + (active && store ? ys.at(n, c, oh, ow) : 0)), m);
  return active ? bits : 0u;
}

// ---- channels_last tiles: 32 V channels x 128 windows of one image ----
// The kernels of channels_last maps walk tiles of 32 V consecutive channels (threadIdx.x
// takes V of them: every value access of a warp covers 32 V consecutive channels of one
// pixel, V at a time; V = 1, or 16 bytes of channels where with_tile_vectors allows) by
// kTileWindows consecutive windows (NCHW window order, p = oh * Wo + ow) of one image.
// The tile's code bytes go through shared memory, each channel's loaded or stored as one
// warp instruction over consecutive bytes (a channel's codes are consecutive in the packed
// NCHW window order), where a thread per (window, channel) would access a byte per lane in
// 32 different places.
constexpr int kTileWindows = 128;

template <typename I>
struct WindowTiles {
  Divider<I> channel_tiles, window_tiles;
  I count, channels;  // tiles in the map, channels per tile
  WindowTiles(int64_t N, int64_t C, int64_t windows_per_plane, int channels = 32)
      : channel_tiles((C + channels - 1) / channels),
        window_tiles((windows_per_plane + kTileWindows - 1) / kTileWindows),
        count(I(N * channel_tiles.divisor * window_tiles.divisor)), channels(I(channels)) {}
  SEGNET_HD void operator()(I tile, I& n, I& first_channel, I& first_window) const {
    const I rest = channel_tiles.div(tile);
    first_channel = (tile - rest * channel_tiles.divisor) * channels;
    n = window_tiles.div(rest);
    first_window = (rest - n * window_tiles.divisor) * kTileWindows;
  }
};

// 33 bytes a channel: where Ho*Wo % 4 != 0 a channel's windows may start inside a byte.
template <int V>
using TileCodes = uint8_t[32 * V][36];

// Stages the code bytes of windows first_window .. first_window + count - 1 of channels
// first_channel .. + 32 V - 1 of image n (a channel's bytes from the one holding its first
// window).
template <int V, typename I>
__device__ __forceinline__ void load_tile_codes(TileCodes<V>& codes, const uint8_t* __restrict__ packed, I n, I C,
                                                I P, I first_channel, I first_window, I count) {
  for (I cc = threadIdx.y; cc < 32 * V; cc += blockDim.y) {
    const I c = first_channel + cc, first = ((n * C + c) * P + first_window);
    const I byte0 = first >> 2, last = (first + count - 1) >> 2;
    for (I j = threadIdx.x; j < 33; j += 32) {
      const bool needed = c < C && byte0 + j <= last;
      codes[cc][j] = SEGNET_LOAD_IF(needed, packed + (needed ? byte0 + j : 0), uint8_t(0));
    }
  }
}

// The code of window `first + q`, where `first` is the window index (n * C + c) * P +
// first_window of channel cc's first window in the tile.
template <int V, typename I>
__device__ __forceinline__ uint8_t tile_code(const TileCodes<V>& codes, I cc, I first, I q) {
  const I k = first + q;
  return code_in(codes[cc][(k >> 2) - (first >> 2)], k);
}

// Pooling, channels_last, in tiles: a warp pools one window of 32 V channels (every load and
// value store covers 32 V consecutive channels of one pixel, V a lane); the codes go through
// shared memory, and each channel's bytes are stored by one warp instruction. Where Ho*Wo % 4
// != 0 a byte may hold windows of two tiles (of one channel, or the last of a channel and the
// first of the next): the tile holding a byte's first window stores it, pooling the up to 3
// windows after its own once more for their codes (loads only; with V > 1, Ho*Wo >= 4, those
// of the next channels as the vectors of the lane's own channels and of the next V). Index
// math in I.
template <typename T, int V, typename I>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    max_pool2x2_nhwc_tile_kernel(const T* __restrict__ x, T* __restrict__ y, uint8_t* __restrict__ packed, PoolDims d,
                                 WindowTiles<I> tiles, Divider<I> wo, Divider<I> plane_windows, Divider<I> channels) {
  __shared__ uint8_t codes[32 * V][kTileWindows + 4];
  const I N = I(d.N), C = I(d.C), H = I(d.H), W = I(d.W), Wo = wo.divisor, P = plane_windows.divisor;
  const I windows = I(d.windows());
  const Strides4 xs = dense_strides(d.C, d.H, d.W, true), ys = dense_strides(d.C, d.Ho, d.Wo, true);
  for (I tile = blockIdx.x; tile < tiles.count; tile += gridDim.x) {
    I n, first_channel, first_window;
    tiles(tile, n, first_channel, first_window);
    const I count = P - first_window < I(kTileWindows) ? P - first_window : I(kTileWindows);
    const I c = first_channel + V * threadIdx.x;
    const bool on = c < C;
    const I first = (n * C + (on ? c : first_channel)) * P + first_window;  // channel c's first window
    const I byte_end = ((first + count + 3) >> 2) << 2, end = byte_end < windows ? byte_end : windows;
    const auto keep = [&](I q, unsigned bits) {
#pragma unroll
      for (int j = 0; j < V; ++j) codes[V * threadIdx.x + j][q] = (bits >> (2 * j)) & 3;
    };
    for (I q = threadIdx.y; q < count; q += blockDim.y) {  // the tile's windows
      const I p = first_window + q, oh = wo.div(p);
      keep(q, pool_window<V>(x, xs, y, ys, H, W, n, c, oh, p - oh * Wo, on, true));
    }
    // Where Ho*Wo % 4 != 0, the up to 3 windows after the tile's last that share a byte with it
    const I span = P & 3 ? count + 3 : count;
    for (I q = count + threadIdx.y; q < span; q += blockDim.y) {
      const I wp = first_window + q;
      // whether the last byte of channels c + j0 .. c + j1 - 1 in the tile holds window q
      const auto spill = [&](int j0, int j1) {
        bool any = false;
        for (int j = j0; j < j1; ++j) {
          const I r = (first + count + I(j) * P) & 3;  // windows of channel c + j's last byte in the tile
          any = any || (r != 0 && r + (q - count) < 4);
        }
        return any;
      };
      if (wp < P) {  // a window of the next tile of the same channels
        const I oh = wo.div(wp);
        keep(q, pool_window<V>(x, xs, y, ys, H, W, n, c, oh, wp - oh * Wo,
                               on && (V == 1 ? first + q < end : spill(0, V)), false));
      } else if constexpr (V > 1) {
        // window p of the next channels (Ho*Wo >= 4: a byte reaches at most 3 windows into
        // one): channel c + j's byte takes channel c + j + 1's code, which is the lane's own
        // channel j + 1 or, for j = V - 1, the first channel of the next lane (or image)
        const I p = wp - P, oh = wo.div(p), ow = p - oh * Wo;
        const bool wrap = c + V == C;
        const unsigned own = pool_window<V>(x, xs, y, ys, H, W, n, c, oh, ow, on && spill(0, V - 1), false);
        const unsigned next = pool_window<V>(x, xs, y, ys, H, W, wrap ? n + 1 : n, wrap ? I(0) : c + V, oh, ow,
                                             on && spill(V - 1, V) && (!wrap || n + 1 < N), false);
        keep(q, own >> 2 | next << (2 * (V - 1)));
      } else {  // a window of the next channel(s) that shares this tile's last byte
        const I plane = plane_windows.div(first + q), wn = channels.div(plane), p = first + q - plane * P;
        const I oh = wo.div(p);
        keep(q, pool_window<V>(x, xs, y, ys, H, W, wn, plane - wn * C, oh, p - oh * Wo, on && first + q < end, false));
      }
    }
    __syncthreads();
    for (I cc = threadIdx.y; cc < 32 * V; cc += blockDim.y) {
      const I channel = first_channel + cc;
      const I f = (n * C + (channel < C ? channel : first_channel)) * P + first_window;
      const I byte = ((f + 3) >> 2) + threadIdx.x;  // the bytes whose first window is in the tile
      const I e = ((f + count + 3) >> 2) << 2, channel_end = e < windows ? e : windows;
      const bool owned = channel < C && 4 * byte < f + count;
      uint8_t bits = 0;
      for (I i = 0; i < 4; ++i) {
        if (owned && 4 * byte + i < channel_end) bits |= codes[cc][4 * byte + i - f] << (2 * i);
      }
      SEGNET_STORE_IF(owned, packed + (owned ? byte : 0), bits);
    }
    __syncthreads();  // codes is refilled for the next tile
  }
}

// The walk both channels_last unpooling directions share: per tile of kTileWindows windows x
// 32 V channels, the tile's codes staged in shared memory, then body(n, c, on, p, oh, ow,
// codes) per window p = (oh, ow) of image n and channels c .. c + V - 1 of the tile (on: c <
// C; C % V == 0), bits 2j, 2j + 1 of codes the code of channel c + j; a warp's lanes take
// consecutive channels of one window.
template <int V, typename I, typename F>
__device__ __forceinline__ void for_each_tile_window(const uint8_t* __restrict__ packed, const PoolDims& d,
                                                     const WindowTiles<I>& tiles, const Divider<I>& wo, F&& body) {
  __shared__ TileCodes<V> codes;
  const I C = I(d.C), Wo = I(d.Wo), P = I(d.Ho) * Wo;
  for (I tile = blockIdx.x; tile < tiles.count; tile += gridDim.x) {
    I n, first_channel, first_window;
    tiles(tile, n, first_channel, first_window);
    const I count = P - first_window < I(kTileWindows) ? P - first_window : I(kTileWindows);
    load_tile_codes<V>(codes, packed, n, C, P, first_channel, first_window, count);
    __syncthreads();
    const I c = first_channel + V * threadIdx.x;
    const bool on = c < C;
    const I first = (n * C + (on ? c : first_channel)) * P + first_window;  // channel c's first window
    for (I q = threadIdx.y; q < count; q += blockDim.y) {
      const I p = first_window + q, oh = wo.div(p);
      unsigned bits = 0;
#pragma unroll
      for (int j = 0; j < V; ++j) bits |= unsigned(tile_code<V>(codes, I(V * threadIdx.x + j), first + j * P, q)) << (2 * j);
      body(n, c, on, p, oh, p - oh * Wo, bits);
    }
    __syncthreads();  // codes is refilled for the next tile
  }
}

// Unpooling, channels_last, in tiles: a warp places one window's values of 32 V channels and
// writes its 2x2 block as four stores of 32 V consecutive channels each (zeros where the code
// does not point), V channels a lane, plus the zeros of a last row or column that no window
// covers (floor mode, odd H or W): y's sectors once, v's once, the codes once. Index math in I.
template <typename T, int V, typename I>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    max_unpool2x2_nhwc_tile_kernel(const T* __restrict__ v, const uint8_t* __restrict__ packed, T* __restrict__ y,
                                   PoolDims d, WindowTiles<I> tiles, Divider<I> wo) {
  using Vec = AlignedVec<T, V>;
  const I C = I(d.C), H = I(d.H), W = I(d.W), Ho = I(d.Ho), Wo = I(d.Wo), P = Ho * Wo, row = W * C;
  for_each_tile_window<V>(packed, d, tiles, wo, [&](I n, I c, bool on, I p, I oh, I ow, unsigned codes) {
    const I h = 2 * oh, w = 2 * ow;
    const Vec value = SEGNET_LOAD_IF(on, reinterpret_cast<const Vec*>(v + (on ? (n * P + p) * C + c : 0)), Vec{});
    const auto at = [&](unsigned i) {  // the values whose code is i, zeros elsewhere
      Vec out;
#pragma unroll
      for (int j = 0; j < V; ++j) out.v[j] = ((codes >> (2 * j)) & 3) == i ? value.v[j] : T(0);
      return out;
    };
    Vec zero;
#pragma unroll
    for (int j = 0; j < V; ++j) zero.v[j] = T(0);
    const bool col1 = w + 1 < W, row1 = h + 1 < H;
    const bool col2 = ow + 1 == Wo && w + 2 < W, row2 = oh + 1 == Ho && h + 2 < H;  // uncovered
    T* top = y + (on ? ((n * H + h) * W + w) * C + c : 0);
    SEGNET_STORE_IF(on, reinterpret_cast<Vec*>(top), at(0));
    SEGNET_STORE_IF(on && col1, reinterpret_cast<Vec*>(top + C), at(1));
    SEGNET_STORE_IF(on && row1, reinterpret_cast<Vec*>(top + row), at(2));
    SEGNET_STORE_IF(on && row1 && col1, reinterpret_cast<Vec*>(top + row + C), at(3));
    SEGNET_STORE_IF(on && col2, reinterpret_cast<Vec*>(top + 2 * C), zero);
    SEGNET_STORE_IF(on && col2 && row1, reinterpret_cast<Vec*>(top + row + 2 * C), zero);
    for (I j = 0; j < I(2 + col2); ++j)
      SEGNET_STORE_IF(on && row2 && w + j < W, reinterpret_cast<Vec*>(top + 2 * row + j * C), zero);
  });
}

// Unpooling backward, channels_last, in tiles: a warp gathers the output gradient of 32 V
// channels at their windows' arg-max (zero where the code points outside the output) and
// stores them as one instruction. With V > 1 a lane's channels point to different pixels of
// the window: it loads the window's 2x2 block as 4 vectors and selects.
template <typename T, int V, typename I>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    max_unpool2x2_backward_nhwc_tile_kernel(const T* __restrict__ go, const uint8_t* __restrict__ packed,
                                            T* __restrict__ gv, PoolDims d, WindowTiles<I> tiles, Divider<I> wo) {
  using Vec = AlignedVec<T, V>;
  const I C = I(d.C), H = I(d.H), W = I(d.W), P = I(d.Ho) * I(d.Wo);
  for_each_tile_window<V>(packed, d, tiles, wo, [&](I n, I c, bool on, I p, I oh, I ow, unsigned codes) {
    Vec g;
    if (V == 1) {
      const I h = 2 * oh + (codes >> 1), w = 2 * ow + (codes & 1);
      const bool inside = on && h < H && w < W;
      g = SEGNET_LOAD_IF(inside, reinterpret_cast<const Vec*>(go + (inside ? ((n * H + h) * W + w) * C + c : 0)),
                         Vec{});
    } else {
      const I h = 2 * oh, w = 2 * ow;
      const bool col1 = w + 1 < W, row1 = h + 1 < H;
      const T* top = go + (on ? ((n * H + h) * W + w) * C + c : 0);
      const Vec a = SEGNET_LOAD_IF(on, reinterpret_cast<const Vec*>(top), Vec{});
      const Vec b = SEGNET_LOAD_IF(on && col1, reinterpret_cast<const Vec*>(top + C), Vec{});
      const Vec e = SEGNET_LOAD_IF(on && row1, reinterpret_cast<const Vec*>(top + W * C), Vec{});
      const Vec f = SEGNET_LOAD_IF(on && row1 && col1, reinterpret_cast<const Vec*>(top + W * C + C), Vec{});
#pragma unroll
      for (int j = 0; j < V; ++j) {  // a zero where the code points outside: the load left it
        const unsigned code = (codes >> (2 * j)) & 3;
        const T upper = code & 1 ? b.v[j] : a.v[j], lower = code & 1 ? f.v[j] : e.v[j];
        g.v[j] = code >> 1 ? lower : upper;
      }
    }
    SEGNET_STORE_IF(on, reinterpret_cast<Vec*>(gv + (on ? (n * P + p) * C + c : 0)), g);
  });
}

// ---- NCHW bands: whole window rows of narrow maps ----
// Where a row is narrow (Wo <= kBandWindows / 4) and the per-byte vectors do not apply (W % 8
// != 0 or a misaligned view: SegNet's 30-wide maps, 60 elements wide before pooling), a
// warp's consecutive windows span several rows, and their accesses would start and end
// inside sectors that the row's other instructions touch as well. There a block takes whole
// window rows r = plane * Ho + oh (across planes: their input or output rows are one
// contiguous stretch of memory, and so are their windows' values and packed codes), moves
// each stretch between global and shared memory flat, 16 bytes a lane (stage_in,
// stage_out), and works on the windows in shared memory. A band's windows are a multiple of
// 4, so no packed byte belongs to two blocks.
constexpr int kBandWindows = 256;
// Shared elements a band may need: its windows' 2x2 blocks, a column no window covers in
// each row, and in floor mode a row no window covers in each plane.
constexpr int kBandElements = 9 * kBandWindows;

template <typename I>
struct Bands {
  Divider<I> ho, wo;
  I H, W, rows_per_band, window_rows, count;
  Bands(const PoolDims& d)
      : ho(d.Ho), wo(d.Wo), H(I(d.H)), W(I(d.W)), rows_per_band(I(rows_for(d.Wo))),
        window_rows(I(d.N * d.C * d.Ho)), count((window_rows + rows_per_band - 1) / rows_per_band) {}
  // Rows of a band: as many as fit kBandWindows windows, a multiple of 4 / gcd(Wo, 4) so that
  // a band's windows are a multiple of 4 (Wo <= kBandWindows / 4: at least 4 rows fit).
  static int64_t rows_for(int64_t Wo) {
    const int64_t step = Wo % 4 == 0 ? 1 : Wo % 2 == 0 ? 2 : 4;
    return kBandWindows / Wo / step * step;
  }
  SEGNET_HD I rows_of(I r0) const { return window_rows - r0 < rows_per_band ? window_rows - r0 : rows_per_band; }
  // The flat offset of window row r's first row in the full map; the end of its rows, with
  // `uncovered` also of a row after it that no window covers.
  SEGNET_HD I top(I r) const {
    const I plane = ho.div(r);
    return (plane * H + 2 * (r - plane * ho.divisor)) * W;
  }
  SEGNET_HD I bottom(I r, bool uncovered) const {
    const I plane = ho.div(r), oh = r - plane * ho.divisor;
    const I h = uncovered && oh + 1 == ho.divisor ? H : (2 * oh + 2 < H ? 2 * oh + 2 : H);
    return (plane * H + h) * W;
  }
};

// Shared memory for a flat stretch of up to kElements elements of T, placed at the same
// offset modulo 32 bytes as the stretch's global address (so that 16-byte vectors of one are
// 16-byte vectors of the other). A raw buffer: T may have constructors.
template <typename T, int kElements>
struct Staging {
  alignas(32) unsigned char raw[kElements * sizeof(T) + 48];  // + the sector and vector around its ends
  __device__ __forceinline__ T* like(const T* global) {
    return reinterpret_cast<T*>(raw + reinterpret_cast<uintptr_t>(global) % 32);
  }
};

// A band's shared memory: its rows of the full map, its windows' values, their packed codes.
template <typename T>
struct BandBuffer {
  Staging<T, kBandElements> rows;
  Staging<T, kBandWindows> values;
  Staging<uint8_t, kBandWindows / 4> codes;
};

// Spreads a flat stretch of n elements at global address g over the block's threads: the
// whole 16-byte vectors from its first 32-byte sector boundary on, vector(i) for the one at
// element i (a warp's 32 vectors: 16 whole sectors), then the elements before them and after
// the last, single(i), a thread each (fewer than 3 vectors' worth).
template <typename T, typename I, typename Vector, typename Single>
__device__ __forceinline__ void for_each_flat_vector(const T* g, I n, Vector&& vector, Single&& single) {
  constexpr I V = 16 / sizeof(T), kSector = 32 / sizeof(T);
  const I misalign = I(reinterpret_cast<uintptr_t>(g) % 32 / sizeof(T));
  const I head = misalign == 0 ? 0 : (kSector - misalign < n ? kSector - misalign : n);
  const I vectors = (n - head) / V, tail = head + vectors * V;
  for (I t = threadIdx.x; t < vectors; t += blockDim.x) vector(head + t * V);
  for (I t = threadIdx.x; t < head + n - tail; t += blockDim.x) single(t < head ? t : tail + t - head);
}

// Loads the stretch g[0 .. n) of the tensor [lo, hi) into shared memory s (s =
// Staging::like(g)): from the sector that holds its first element and to the end of the
// 16-byte vector that holds its last, where those lie in the tensor (their sectors are moved
// anyway), so that single elements are loaded only at the tensor's ends.
template <typename T, typename I>
__device__ __forceinline__ void stage_in(T* s, const T* __restrict__ g, I n, const T* lo, const T* hi) {
  using Vec = AlignedVec<T, 16 / sizeof(T)>;
  constexpr I V = 16 / sizeof(T);
  const I before = I(reinterpret_cast<uintptr_t>(g) % 32 / sizeof(T));  // pointer arithmetic, not casts:
  const I after = (V - I(reinterpret_cast<uintptr_t>(g + n) % 16 / sizeof(T))) % V;  // nvcc keeps LDG
  const T* first = g - before >= lo ? g - before : g;
  const T* last = g + n + after <= hi ? g + n + after : g + n;
  s -= g - first;
  for_each_flat_vector(
      first, I(last - first),
      [&](I i) { *reinterpret_cast<Vec*>(s + i) = SEGNET_LOAD(reinterpret_cast<const Vec*>(first + i)); },
      [&](I i) { s[i] = SEGNET_LOAD(first + i); });
}

// Stores shared memory s (s = Staging::like(g)) into the stretch g[0 .. n).
template <typename T, typename I>
__device__ __forceinline__ void stage_out(T* __restrict__ g, const T* s, I n) {
  using Vec = AlignedVec<T, 16 / sizeof(T)>;
  for_each_flat_vector(
      g, n, [&](I i) { SEGNET_STORE(reinterpret_cast<Vec*>(g + i), *reinterpret_cast<const Vec*>(s + i)); },
      [&](I i) { SEGNET_STORE(g + i, s[i]); });
}

// Pooling, NCHW bands: the band's input rows are staged in shared memory, a thread per
// window pools from there (the 4 lanes of a packed byte OR their codes together by
// shuffles), and the values and codes are stored flat. Index math in I.
template <typename T, typename I>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    max_pool2x2_nchw_band_kernel(const T* __restrict__ x, T* __restrict__ y, uint8_t* __restrict__ packed,
                                 PoolDims d, Bands<I> bands) {
  __shared__ BandBuffer<T> buffer;
  const I H = bands.H, W = bands.W, Wo = bands.wo.divisor, lane = threadIdx.x % 32;
  const unsigned lanes = warp_lanes();
  for (I b = blockIdx.x; b < bands.count; b += gridDim.x) {
    const I r0 = b * bands.rows_per_band, rows = bands.rows_of(r0);
    const I begin = bands.top(r0), k0 = r0 * Wo, windows = rows * Wo, bytes = (windows + 3) / 4;  // k0 % 4 == 0
    T* band = buffer.rows.like(x + begin);
    T* values = buffer.values.like(y + k0);
    uint8_t* codes = buffer.codes.like(packed + k0 / 4);
    stage_in(band, x + begin, bands.bottom(r0 + rows - 1, false) - begin, x, x + d.elements());
    __syncthreads();
    // while any lane of the warp has a window (the shuffles need every lane); blocks of a
    // multiple of 4 threads, so lanes 4m .. 4m + 3 hold a packed byte's windows
    for (I j = threadIdx.x; j - lane < windows; j += blockDim.x) {
      const bool active = j < windows;
      const I g = bands.wo.div(active ? j : I(0)), ow = (active ? j : I(0)) - g * Wo, r = r0 + g;
      const I oh = r - bands.ho.div(r) * bands.ho.divisor;
      const T* top = band + (bands.top(r) - begin) + 2 * ow;
      const bool col1 = 2 * ow + 1 < W, row1 = 2 * oh + 1 < H;
      const T v00 = top[0], v01 = col1 ? top[1] : v00, v10 = row1 ? top[W] : v00, v11 = row1 && col1 ? top[W + 1] : v00;
      T m;
      const unsigned code = window_argmax(v00, v01, v10, v11, col1, row1, &m);
      unsigned bits = active ? code << (2 * (j & 3)) : 0u;
      bits |= __shfl_xor_sync(lanes, bits, 1);
      bits |= __shfl_xor_sync(lanes, bits, 2);
      if (active) values[j] = m;
      if (active && (j & 3) == 0) codes[j >> 2] = uint8_t(bits);
    }
    __syncthreads();
    stage_out(y + k0, values, windows);
    stage_out(packed + k0 / 4, codes, bytes);
    __syncthreads();  // the buffer is refilled for the next band
  }
}

// Unpooling, NCHW bands: the band's values and codes are staged in shared memory, a thread
// per window writes its 2x2 block into the band's output rows there, plus the zeros of a
// last row or column that no window covers (floor mode, odd H or W); then the rows are stored
// flat. Index math in I.
template <typename T, typename I>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    max_unpool2x2_nchw_band_kernel(const T* __restrict__ v, const uint8_t* __restrict__ packed, T* __restrict__ y,
                                   PoolDims d, Bands<I> bands) {
  __shared__ BandBuffer<T> buffer;
  const I H = bands.H, W = bands.W, Ho = bands.ho.divisor, Wo = bands.wo.divisor;
  for (I b = blockIdx.x; b < bands.count; b += gridDim.x) {
    const I r0 = b * bands.rows_per_band, rows = bands.rows_of(r0);
    const I begin = bands.top(r0), k0 = r0 * Wo, windows = rows * Wo;  // k0 % 4 == 0
    T* band = buffer.rows.like(y + begin);
    T* values = buffer.values.like(v + k0);
    uint8_t* codes = buffer.codes.like(packed + k0 / 4);
    stage_in(values, v + k0, windows, v, v + d.windows());
    stage_in(codes, packed + k0 / 4, (windows + 3) / 4, packed, packed + packed_bytes(d.windows()));
    __syncthreads();
    for (I j = threadIdx.x; j < windows; j += blockDim.x) {
      const I g = bands.wo.div(j), ow = j - g * Wo, r = r0 + g, oh = r - bands.ho.div(r) * Ho;
      const uint8_t code = code_in(codes[j >> 2], j);
      const T value = values[j], zero = T(0);
      const I h = 2 * oh, w = 2 * ow;
      const bool col1 = w + 1 < W, row1 = h + 1 < H;
      const bool col2 = ow + 1 == Wo && w + 2 < W, row2 = oh + 1 == Ho && h + 2 < H;  // uncovered
      T* top = band + (bands.top(r) - begin) + w;
      top[0] = code == 0 ? value : zero;
      if (col1) top[1] = code == 1 ? value : zero;
      if (row1) top[W] = code == 2 ? value : zero;
      if (row1 && col1) top[W + 1] = code == 3 ? value : zero;
      if (col2) top[2] = zero;
      if (col2 && row1) top[W + 2] = zero;
      for (I i = 0; row2 && i < I(2 + col2) && w + i < W; ++i) top[2 * W + i] = zero;
    }
    __syncthreads();
    stage_out(y + begin, band, bands.bottom(r0 + rows - 1, true) - begin);
    __syncthreads();  // the buffer is refilled for the next band
  }
}

// Unpooling backward, NCHW bands: the band's output-gradient rows and codes are staged in
// shared memory, a thread per window takes the gradient at its arg-max from there (zero where
// the code points outside), and the gradients are stored flat.
template <typename T, typename I>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    max_unpool2x2_backward_nchw_band_kernel(const T* __restrict__ go, const uint8_t* __restrict__ packed,
                                            T* __restrict__ gv, PoolDims d, Bands<I> bands) {
  __shared__ BandBuffer<T> buffer;
  const I H = bands.H, W = bands.W, Ho = bands.ho.divisor, Wo = bands.wo.divisor;
  for (I b = blockIdx.x; b < bands.count; b += gridDim.x) {
    const I r0 = b * bands.rows_per_band, rows = bands.rows_of(r0);
    const I begin = bands.top(r0), k0 = r0 * Wo, windows = rows * Wo;  // k0 % 4 == 0
    T* band = buffer.rows.like(go + begin);
    T* values = buffer.values.like(gv + k0);
    uint8_t* codes = buffer.codes.like(packed + k0 / 4);
    stage_in(band, go + begin, bands.bottom(r0 + rows - 1, false) - begin, go, go + d.elements());
    stage_in(codes, packed + k0 / 4, (windows + 3) / 4, packed, packed + packed_bytes(d.windows()));
    __syncthreads();
    for (I j = threadIdx.x; j < windows; j += blockDim.x) {
      const I g = bands.wo.div(j), ow = j - g * Wo, r = r0 + g, oh = r - bands.ho.div(r) * Ho;
      const uint8_t code = code_in(codes[j >> 2], j);
      const I dh = code >> 1, w = 2 * ow + (code & 1);
      values[j] = 2 * oh + dh < H && w < W ? band[bands.top(r) - begin + dh * W + w] : T(0);
    }
    __syncthreads();
    stage_out(gv + k0, values, windows);
    __syncthreads();  // the buffer is refilled for the next band
  }
}

// ---- NCHW vectors: W % 8 == 0 ----
// The walk of the vectorised NCHW kernels (W % 8 == 0, so Wo % 4 == 0 and a packed byte's 4
// windows share a row): one thread per byte t, body(t, k, r0, row1, row2) with k = 4 * t its
// first window, r0 the offset in the full map of the byte's 2 x 8 block, row1 whether the
// block's second row exists (not so in ceil mode with odd H), row2 whether a row that no
// window covers follows it (floor mode, odd H).
template <typename I, typename F>
__device__ __forceinline__ void for_each_window_byte(const PoolDims& d, const Divider<I>& wo, const Divider<I>& ho,
                                                     F&& body) {
  const I bytes = I(d.windows() / 4), H = I(d.H), W = I(d.W);
  for (I t = I(blockIdx.x) * blockDim.x + threadIdx.x; t < bytes; t += I(gridDim.x) * blockDim.x) {
    const I k = 4 * t, row = wo.div(k), ow = k - row * wo.divisor;
    const I plane = ho.div(row), oh = row - plane * ho.divisor, h = 2 * oh;
    body(t, k, (plane * H + h) * W + 2 * ow, h + 1 < H, oh + 1 == ho.divisor && h + 2 < H);
  }
}

// Pooling, NCHW with W % 8 == 0: a thread per packed byte loads its 2 x 8 input elements as
// two vectors and stores its 4 values as one vector. Index math in I.
template <typename T, typename I>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    max_pool2x2_nchw_vec_kernel(const T* __restrict__ x, T* __restrict__ y, uint8_t* __restrict__ packed, PoolDims d,
                                Divider<I> wo, Divider<I> ho) {
  using Row = AlignedVec<T, 8>;
  using Values = AlignedVec<T, 4>;
  const I W = I(d.W);
  for_each_window_byte(d, wo, ho, [&](I t, I k, I r0, bool row1, bool) {
    const Row a = SEGNET_LOAD(reinterpret_cast<const Row*>(x + r0));
    const Row b = SEGNET_LOAD_IF(row1, reinterpret_cast<const Row*>(x + r0 + W), a);
    Values out;
    uint8_t bits = 0;
    for (int i = 0; i < 4; ++i) {
      bits |= window_argmax(a.v[2 * i], a.v[2 * i + 1], b.v[2 * i], b.v[2 * i + 1], true, row1, &out.v[i]) << (2 * i);
    }
    SEGNET_STORE(reinterpret_cast<Values*>(y + k), out);
    SEGNET_STORE(packed + t, bits);
  });
}

// Unpooling, NCHW with W % 8 == 0: a thread per packed byte loads the byte and its 4 values
// (one vector) and stores its 2 x 8 output block as two vectors, plus 8 zeros of a row that
// no window covers. Index math in I.
template <typename T, typename I>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    max_unpool2x2_nchw_vec_kernel(const T* __restrict__ v, const uint8_t* __restrict__ packed, T* __restrict__ y,
                                  PoolDims d, Divider<I> wo, Divider<I> ho) {
  using Row = AlignedVec<T, 8>;
  using Values = AlignedVec<T, 4>;
  const I W = I(d.W);
  for_each_window_byte(d, wo, ho, [&](I t, I k, I r0, bool row1, bool row2) {
    const unsigned bits = SEGNET_LOAD(packed + t);
    const Values values = SEGNET_LOAD(reinterpret_cast<const Values*>(v + k));
    Row top, bottom, zeros;
    for (int i = 0; i < 4; ++i) {
      const unsigned code = (bits >> (2 * i)) & 3;
      const T value = values.v[i], zero = T(0);
      top.v[2 * i] = code == 0 ? value : zero, top.v[2 * i + 1] = code == 1 ? value : zero;
      bottom.v[2 * i] = code == 2 ? value : zero, bottom.v[2 * i + 1] = code == 3 ? value : zero;
      zeros.v[2 * i] = zeros.v[2 * i + 1] = zero;
    }
    SEGNET_STORE(reinterpret_cast<Row*>(y + r0), top);
    SEGNET_STORE_IF(row1, reinterpret_cast<Row*>(y + r0 + W), bottom);
    SEGNET_STORE_IF(row2, reinterpret_cast<Row*>(y + r0 + 2 * W), zeros);
  });
}

// Unpooling backward, NCHW with W % 8 == 0: a thread per packed byte loads the byte and the
// 2 x 8 output-gradient block of its 4 windows (two vectors) and stores the 4 gradients at
// the arg-maxes as one vector (zero where a code points below the last row).
template <typename T, typename I>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    max_unpool2x2_backward_nchw_vec_kernel(const T* __restrict__ go, const uint8_t* __restrict__ packed,
                                           T* __restrict__ gv, PoolDims d, Divider<I> wo, Divider<I> ho) {
  using Row = AlignedVec<T, 8>;
  using Values = AlignedVec<T, 4>;
  const I W = I(d.W);
  for_each_window_byte(d, wo, ho, [&](I t, I k, I r0, bool row1, bool) {
    const unsigned bits = SEGNET_LOAD(packed + t);
    const Row top = SEGNET_LOAD(reinterpret_cast<const Row*>(go + r0));
    const Row bottom = SEGNET_LOAD_IF(row1, reinterpret_cast<const Row*>(go + r0 + W), top);
    Values out;
    for (int i = 0; i < 4; ++i) {
      // selects, not an index by the code: a register array indexed at run time goes to local memory
      const unsigned code = (bits >> (2 * i)) & 3;
      const T a = code & 1 ? top.v[2 * i + 1] : top.v[2 * i], b = code & 1 ? bottom.v[2 * i + 1] : bottom.v[2 * i];
      out.v[i] = code < 2 ? a : row1 ? b : T(0);
    }
    SEGNET_STORE(reinterpret_cast<Values*>(gv + k), out);
  });
}

// ---- NCHW, one thread per window ----

// Pooling, NCHW where neither vectors nor bands apply (W % 8 != 0 or a misaligned view, and
// Wo > kBandWindows / 4): one thread per window, a warp 32 consecutive windows (their
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
  const unsigned lanes = warp_lanes();
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
    bits |= __shfl_xor_sync(lanes, bits, 1);
    bits |= __shfl_xor_sync(lanes, bits, 2);
    SEGNET_STORE_IF(active, y + k, m);
    SEGNET_STORE_IF(active && (k & 3) == 0, packed + (k >> 2), uint8_t(bits));
  }
}

// Unpooling, NCHW where neither vectors nor bands apply: one thread per window (a warp:
// consecutive windows of a row), which reads its code byte and value once and writes its 2x2
// block as two rows of two (one 2-element store each where W is even and y 2-element
// aligned: `pairs`), plus the zeros of a last row or column that no window covers (floor
// mode, odd H or W): y's sectors once, v's once, the packed bytes 4 lanes to a byte. Index math in I (32-bit below 2^31 elements: no 64-bit
// division).
template <typename T, typename I>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    max_unpool2x2_nchw_kernel(const T* __restrict__ v, const uint8_t* __restrict__ packed, T* __restrict__ y,
                              PoolDims d, Unravel<I, false> unravel, bool pairs) {
  using Pair = AlignedVec<T, 2>;
  const I C = I(d.C), H = I(d.H), W = I(d.W), Ho = I(d.Ho), Wo = I(d.Wo);
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

// Unpooling backward, NCHW where neither vectors nor bands apply: one thread per gradient of
// a value, in memory order; gathers the output gradient at the window's arg-max (zero where
// the code points outside the output).
template <typename T, typename I>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    max_unpool2x2_backward_nchw_kernel(const T* __restrict__ go, const uint8_t* __restrict__ packed,
                                       T* __restrict__ gv, PoolDims d, Unravel<I, false> unravel) {
  const I total = I(d.windows()), H = I(d.H), W = I(d.W);
  for (I k = I(blockIdx.x) * blockDim.x + threadIdx.x; k < total; k += I(gridDim.x) * blockDim.x) {
    I n, c, oh, ow;
    unravel(k, n, c, oh, ow);
    const uint8_t code = code_in(SEGNET_LOAD(packed + (k >> 2)), k);
    const I h = 2 * oh + (code >> 1), w = 2 * ow + (code & 1);
    const bool inside = h < H && w < W;
    SEGNET_STORE(gv + k, SEGNET_LOAD_IF(inside, go + (inside ? ((n * I(d.C) + c) * H + h) * W + w : 0), T(0)));
  }
}

// Zeros: the unpooled map where there is no window (H or W of 1 in floor mode).
template <typename T, typename I>
__global__ void __launch_bounds__(kMaxThreadsPerBlock) zero_kernel(T* __restrict__ y, I total) {
  for (I t = I(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += I(gridDim.x) * blockDim.x) {
    SEGNET_STORE(y + t, T(0));
  }
}

// ---- launchers: x, y, v, go, gv are dense in the given memory format ----

// Blocks of the channels_last tile kernels: 32 lanes x (threads / 32) rows.
inline dim3 tile_block(const LaunchConfig& cfg) { return dim3(32, std::max(1, cfg.threads / 32)); }

// Calls body(std::integral_constant<int, V>{}) with the channels a lane of a channels_last
// tile takes: 16 bytes of them where kVectors and `applies`, the index type I is 32-bit, C is
// a multiple and every tensor 16-byte aligned; else 1. (The 64-bit instances, for tensors of
// 2^31 elements or more, stay scalar: ptxas spills vector registers around their division
// subroutine calls.)
template <typename T, typename I, bool kVectors, typename F>
void with_tile_vectors(const PoolDims& d, bool applies, std::initializer_list<const void*> tensors, F&& body) {
  if constexpr (kVectors && std::is_same<I, uint32_t>::value) {
    constexpr int V = 16 / sizeof(T);
    bool vectors = applies && d.C % V == 0;
    for (const void* p : tensors) vectors = vectors && reinterpret_cast<uintptr_t>(p) % 16 == 0;
    if (vectors) return body(std::integral_constant<int, V>{});
  }
  body(std::integral_constant<int, 1>{});
}

// Launches a channels_last unpooling tile kernel (either direction) from src to dst:
// kernel_for(std::integral_constant<int, V>{}) for the channels per lane V that
// with_tile_vectors picks.
template <typename T, typename I, bool kVectors, typename KernelFor>
void launch_unpool_tiles(const T* src, const uint8_t* packed, T* dst, const PoolDims& d, cudaStream_t stream,
                         const LaunchConfig& cfg, KernelFor kernel_for) {
  with_tile_vectors<T, I, kVectors>(d, true, {src, dst}, [&](auto width) {
    const WindowTiles<I> tiles(d.N, d.C, d.Ho * d.Wo, 32 * decltype(width)::value);
    auto kernel = kernel_for(width);
    SEGNET_LAUNCH(kernel, unsigned(std::min<int64_t>(tiles.count, cfg.max_blocks)), tile_block(cfg), stream, src,
                  packed, dst, d, tiles, Divider<I>(d.Wo));
  });
}

template <typename T>
void launch_max_pool2x2(const T* x, T* y, uint8_t* packed, PoolDims d, bool channels_last,
                        cudaStream_t stream, LaunchConfig cfg = {}) {
  const int64_t bytes = packed_bytes(d.windows());
  if (bytes == 0) return;
  with_index_type(d.elements(), cfg, [&](auto index) {
    using I = decltype(index);
    if (channels_last) {
      // vectors where a packed byte reaches into one next channel at most (Ho * Wo >= 4)
      with_tile_vectors<T, I, true>(d, d.Ho * d.Wo >= 4, {x, y}, [&](auto width) {
        constexpr int V = decltype(width)::value;
        auto kernel = max_pool2x2_nhwc_tile_kernel<T, V, I>;
        const WindowTiles<I> tiles(d.N, d.C, d.Ho * d.Wo, 32 * V);
        SEGNET_LAUNCH(kernel, unsigned(std::min<int64_t>(tiles.count, cfg.max_blocks)), tile_block(cfg), stream, x,
                      y, packed, d, tiles, Divider<I>(d.Wo), Divider<I>(d.Ho * d.Wo), Divider<I>(d.C));
      });
      return;
    }
    const int threads = std::max(4, cfg.threads / 4 * 4);  // a packed byte's 4 windows in one warp
    if (d.W % 8 == 0 && is_aligned_for_vec<T, 8>(x) && is_aligned_for_vec<T, 4>(y)) {
      auto kernel = max_pool2x2_nchw_vec_kernel<T, I>;
      SEGNET_LAUNCH(kernel, blocks_for(bytes, cfg), cfg.threads, stream, x, y, packed, d, Divider<I>(d.Wo),
                    Divider<I>(d.Ho));
    } else if (d.Wo <= kBandWindows / 4) {
      const Bands<I> bands(d);
      auto kernel = max_pool2x2_nchw_band_kernel<T, I>;
      SEGNET_LAUNCH(kernel, unsigned(std::min<int64_t>(bands.count, cfg.max_blocks)), threads, stream, x, y, packed, d,
                    bands);
    } else {
      auto kernel = max_pool2x2_nchw_kernel<T, I>;
      SEGNET_LAUNCH(kernel, blocks_for(d.windows(), LaunchConfig{threads, cfg.max_blocks}), threads, stream, x, y,
                    packed, d, Unravel<I, false>(d.C, d.Ho, d.Wo), d.W % 2 == 0 && is_aligned_for_vec<T, 2>(x));
    }
  });
}

template <typename T>
void launch_max_unpool2x2(const T* v, const uint8_t* packed, T* y, PoolDims d, bool channels_last,
                          cudaStream_t stream, LaunchConfig cfg = {}) {
  const int64_t total = d.elements();
  if (total == 0) return;
  with_index_type(total, cfg, [&](auto index) {
    using I = decltype(index);
    if (d.windows() == 0) {  // no window (H or W is 1, floor mode): all zeros, in either layout
      auto kernel = zero_kernel<T, I>;
      SEGNET_LAUNCH(kernel, blocks_for(total, cfg), cfg.threads, stream, y, I(total));
    } else if (channels_last) {
      launch_unpool_tiles<T, I, true>(v, packed, y, d, stream, cfg, [](auto width) {
        return max_unpool2x2_nhwc_tile_kernel<T, decltype(width)::value, I>;
      });
    } else if (d.W % 8 == 0 && is_aligned_for_vec<T, 4>(v) && is_aligned_for_vec<T, 8>(y)) {
      auto kernel = max_unpool2x2_nchw_vec_kernel<T, I>;
      SEGNET_LAUNCH(kernel, blocks_for(d.windows() / 4, cfg), cfg.threads, stream, v, packed, y, d, Divider<I>(d.Wo),
                    Divider<I>(d.Ho));
    } else if (d.Wo <= kBandWindows / 4) {
      const Bands<I> bands(d);
      auto kernel = max_unpool2x2_nchw_band_kernel<T, I>;
      SEGNET_LAUNCH(kernel, unsigned(std::min<int64_t>(bands.count, cfg.max_blocks)), cfg.threads, stream, v, packed,
                    y, d, bands);
    } else {
      auto kernel = max_unpool2x2_nchw_kernel<T, I>;
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
  with_index_type(d.elements(), cfg, [&](auto index) {  // the gathers index the full map
    using I = decltype(index);
    if (channels_last) {
      // vectors load a window's four pixels where a lane's gather loads the one its code
      // names: a sector that no channel of it names (probability (3/4)^(32 / sizeof(T)) per
      // sector: 10% in float32, 1% in 16-bit types) is not moved. Vectors in 16-bit types only.
      launch_unpool_tiles<T, I, sizeof(T) == 2>(go, packed, gv, d, stream, cfg, [](auto width) {
        return max_unpool2x2_backward_nhwc_tile_kernel<T, decltype(width)::value, I>;
      });
    } else if (d.W % 8 == 0 && is_aligned_for_vec<T, 8>(go) && is_aligned_for_vec<T, 4>(gv)) {
      auto kernel = max_unpool2x2_backward_nchw_vec_kernel<T, I>;
      SEGNET_LAUNCH(kernel, blocks_for(total / 4, cfg), cfg.threads, stream, go, packed, gv, d, Divider<I>(d.Wo),
                    Divider<I>(d.Ho));
    } else if (d.Wo <= kBandWindows / 4) {
      const Bands<I> bands(d);
      auto kernel = max_unpool2x2_backward_nchw_band_kernel<T, I>;
      SEGNET_LAUNCH(kernel, unsigned(std::min<int64_t>(bands.count, cfg.max_blocks)), cfg.threads, stream, go, packed,
                    gv, d, bands);
    } else {
      auto kernel = max_unpool2x2_backward_nchw_kernel<T, I>;
      SEGNET_LAUNCH(kernel, blocks_for(total, cfg), cfg.threads, stream, go, packed, gv, d,
                    Unravel<I, false>(d.C, d.Ho, d.Wo));
    }
  });
}

}  // namespace kernels
}  // namespace segnet
