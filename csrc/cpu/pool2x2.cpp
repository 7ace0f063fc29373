// CPU kernels of max_pool2x2, max_unpool2x2 and max_unpool2x2_backward, both memory formats.
//
// Each kernel reads and writes every element once. The inner loops over full 2x2
// windows are branch-free leaf functions the compiler vectorises (vectorize.h builds
// them per ISA), with AVX2 versions of the float32 ones (pool2x2_avx2.h); the partial
// border windows of odd sizes take scalar code. Outside the AVX2 loops that read or write
// the packed bytes themselves (NCHW rows starting a byte; channels_last rows of whole
// bytes), 2-bit codes pass through a small L1-resident buffer of one byte per window
// between the arithmetic and the packing, which keeps both loops simple and vectorisable.
//
// Work is split into tasks over disjoint window ranges; a packed byte that two tasks
// share (a range not starting or ending on a multiple of 4 windows) is OR-ed
// atomically into the zeroed output, so results never depend on the split.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/pool2x2_args.h"
#include "cpu/outputs.h"
#include "cpu/pool2x2_avx2.h"
#include "cpu/vectorize.h"

namespace segnet {
namespace {

using at::Tensor;

// ---- vectorised leaf loops ------------------------------------------------------

// 16-bit floats pass through the leaf loops as their bits, which the compiler vectorises; as
// c10::Half / c10::BFloat16 it did not (bf16 unpooling took 7-8x float32's time for half the
// bytes). Unpooling and its backward only move values (and write +0.0, all bits zero); the
// arg-max compares the bits as integers (full_window_bits16).
template <typename T>
using Moved = std::conditional_t<sizeof(T) == 2, uint16_t, T>;

template <typename T>
const Moved<T>* moved(const T* p) { return reinterpret_cast<const Moved<T>*>(p); }
template <typename T>
Moved<T>* moved(T* p) { return reinterpret_cast<Moved<T>*>(p); }

// codes [4 * nbytes] -> packed [nbytes]
SEGNET_LEAF void pack_bytes(const uint8_t* __restrict__ codes, int64_t nbytes,
                                    uint8_t* __restrict__ packed) {
  for (int64_t i = 0; i < nbytes; ++i) {
    uint32_t w;
    std::memcpy(&w, codes + 4 * i, 4);  // little-endian: code 4i in the low byte
    packed[i] = uint8_t((w & 3u) | ((w >> 6) & 0xCu) | ((w >> 12) & 0x30u) | ((w >> 18) & 0xC0u));
  }
}

// packed [nbytes] -> codes [4 * nbytes]
SEGNET_LEAF void unpack_bytes(const uint8_t* __restrict__ packed, int64_t nbytes,
                                      uint8_t* __restrict__ codes) {
  for (int64_t i = 0; i < nbytes; ++i) {
    const uint8_t b = packed[i];
    codes[4 * i] = b & 3;
    codes[4 * i + 1] = (b >> 2) & 3;
    codes[4 * i + 2] = (b >> 4) & 3;
    codes[4 * i + 3] = b >> 6;
  }
}

// channels_last: the codes of 4 consecutive windows of each of C planes (codes[i * C + c])
// joined into plane c's byte, dst[c * plane_bytes].
SEGNET_LEAF void join_codes_across_planes(const uint8_t* __restrict__ codes, int64_t C,
                                                  uint8_t* __restrict__ dst, int64_t plane_bytes) {
  for (int64_t c = 0; c < C; ++c)
    dst[c * plane_bytes] = codes[c] | (codes[C + c] << 2) | (codes[2 * C + c] << 4) | (codes[3 * C + c] << 6);
}

// channels_last, the reverse: plane c's byte src[c * plane_bytes] split into the codes of
// its 4 windows, codes[i * C + c], for planes c0 <= c < C.
SEGNET_LEAF void split_codes_across_planes(const uint8_t* __restrict__ src, int64_t c0, int64_t C,
                                           int64_t plane_bytes, uint8_t* __restrict__ codes) {
  for (int64_t c = c0; c < C; ++c) {
    const uint8_t b = src[c * plane_bytes];
    codes[c] = b & 3;
    codes[C + c] = (b >> 2) & 3;
    codes[2 * C + c] = (b >> 4) & 3;
    codes[3 * C + c] = b >> 6;
  }
}

// One full window's arg-max, branch-free (the same rule as window_argmax).
template <typename T>
inline void full_window(T a, T b, T c, T d, T* max_out, uint8_t* code_out) {
  using acc = at::opmath_type<T>;
  T m = a;
  uint8_t k = 0;
  bool t = replaces_max(acc(b), acc(m));
  m = t ? b : m;
  k = t ? 1 : k;
  t = replaces_max(acc(c), acc(m));
  m = t ? c : m;
  k = t ? 2 : k;
  t = replaces_max(acc(d), acc(m));
  m = t ? d : m;
  k = t ? 3 : k;
  *max_out = m;
  *code_out = k;
}

// 16-bit floats (Half, BFloat16: sign, then exponent and mantissa; inf_bits: the magnitude
// of infinity) compared as integers, which the compiler vectorises (the conversion to float
// it did not: fp16 pooling ran slower than torch's): the sign-magnitude bits as a signed
// 16-bit integer (-0.0 and +0.0 both 0, as they compare equal), NaN above everything
// (0x7FFF: a number's magnitude is at most inf_bits), with its own flag for the rule's NaN
// case. 16 bits, not 32, so that a vector holds as many orders as values: in 32 bits the
// channels_last loop at AVX2 ran at 0.6x torch's speed.
template <uint16_t inf_bits>
struct Bits16 {
  int16_t order;
  bool nan;
  explicit Bits16(uint16_t b) {
    const int16_t magnitude = int16_t(b & 0x7FFF);
    nan = magnitude > int16_t(inf_bits);
    order = nan ? int16_t(0x7FFF) : b & 0x8000 ? int16_t(-magnitude) : magnitude;
  }
};

template <uint16_t inf_bits>
inline void full_window_bits16(uint16_t a, uint16_t b, uint16_t c, uint16_t d, uint16_t* max_out, uint8_t* code_out) {
  using K = Bits16<inf_bits>;
  uint16_t m = a;
  int16_t km = K(a).order;
  uint8_t k = 0;
  const K kb(b), kc(c), kd(d);
  bool t = kb.order > km || kb.nan;  // replaces_max
  m = t ? b : m;
  km = t ? kb.order : km;
  k = t ? 1 : k;
  t = kc.order > km || kc.nan;
  m = t ? c : m;
  km = t ? kc.order : km;
  k = t ? 2 : k;
  t = kd.order > km || kd.nan;
  m = t ? d : m;
  k = t ? 3 : k;
  *max_out = m;
  *code_out = k;
}

// One full window of T's values, as they pass through the leaf loops.
template <typename T>
inline void window(Moved<T> a, Moved<T> b, Moved<T> c, Moved<T> d, Moved<T>* max_out, uint8_t* code_out) {
  if constexpr (std::is_same_v<T, at::Half>) {
    full_window_bits16<0x7C00>(a, b, c, d, max_out, code_out);
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    full_window_bits16<0x7F80>(a, b, c, d, max_out, code_out);
  } else {
    full_window(a, b, c, d, max_out, code_out);
  }
}

// NCHW: n full windows whose top-left elements are r0[0], r0[2], ...; r1 = the row below.
template <typename T>
SEGNET_LEAF void pool_span_generic(const Moved<T>* __restrict__ r0, const Moved<T>* __restrict__ r1,
                                   int64_t n, Moved<T>* __restrict__ y, uint8_t* __restrict__ codes) {
  for (int64_t i = 0; i < n; ++i) window<T>(r0[2 * i], r0[2 * i + 1], r1[2 * i], r1[2 * i + 1], &y[i], &codes[i]);
}

// NCHW: the first windows of a row segment starting at window k, up to n, whose values and
// packed bytes an AVX2 loop writes directly; returns how many (0 where no such loop serves
// T, or k does not start a byte).
template <typename T>
int64_t pool_span_packed(const T* r0, const T* r1, int64_t k, int64_t n, T* y, uint8_t* packed) {
#ifdef SEGNET_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<T, float>) {
    if (k % 4 == 0 && avx2::cpu_has_avx2()) return avx2::pool_span<true>(r0, r1, n, y, packed + k / 4);
  }
#endif
  return 0;
}

template <typename T>
void pool_span(const T* r0, const T* r1, int64_t n, T* y, uint8_t* codes) {
  int64_t done = 0;
#ifdef SEGNET_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<T, float>) {
    if (avx2::cpu_has_avx2()) done = avx2::pool_span<false>(r0, r1, n, y, codes);
  }
#endif
  if (done < n)
    SEGNET_VECTORIZED(pool_span_generic<T>(moved(r0 + 2 * done), moved(r1 + 2 * done), n - done, moved(y + done),
                                           codes + done));
}

// channels_last: one full window across C channels, from its four pixels.
template <typename T>
SEGNET_LEAF void pool_channels_generic(const Moved<T>* __restrict__ p00, const Moved<T>* __restrict__ p01,
                                       const Moved<T>* __restrict__ p10, const Moved<T>* __restrict__ p11,
                                       int64_t C, Moved<T>* __restrict__ y, uint8_t* __restrict__ codes) {
  for (int64_t c = 0; c < C; ++c) window<T>(p00[c], p01[c], p10[c], p11[c], &y[c], &codes[c]);
}

template <typename T>
void pool_channels(const T* p00, const T* p01, const T* p10, const T* p11, int64_t C, T* y,
                   uint8_t* codes) {
  int64_t done = 0;
#ifdef SEGNET_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<T, float>) {
    if (avx2::cpu_has_avx2()) done = avx2::pool_channels(p00, p01, p10, p11, C, y, codes);
  }
#endif
  if (done < C)
    SEGNET_VECTORIZED(pool_channels_generic<T>(moved(p00 + done), moved(p01 + done), moved(p10 + done),
                                               moved(p11 + done), C - done, moved(y + done), codes + done));
}

// v where keep, else zero (+0.0: all bits zero). 16-bit floats, moved as their bits, are
// masked: at AVX2 the compiler left the select on uint16_t scalar ("control flow in loop";
// bf16 unpooling ran at 0.26-0.44x torch's speed there), the mask it vectorises.
template <typename T>
SEGNET_LEAF T kept(bool keep, T v) {
  if constexpr (std::is_integral_v<T>) {
    return v & T(T(0) - T(keep));
  } else {
    return keep ? v : T(0);
  }
}

// NCHW: output row dy of n windows (2n elements), zero where the code points elsewhere.
template <typename T>
SEGNET_LEAF void unpool_span(const T* __restrict__ v, const uint8_t* __restrict__ codes,
                                     int64_t n, int dy, T* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) {
    out[2 * i] = kept(codes[i] == 2 * dy, v[i]);
    out[2 * i + 1] = kept(codes[i] == 2 * dy + 1, v[i]);
  }
}

// channels_last: one output pixel across C channels.
template <typename T>
SEGNET_LEAF void unpool_channels_generic(const T* __restrict__ v, const uint8_t* __restrict__ codes,
                                         int64_t C, uint8_t want, T* __restrict__ out) {
  for (int64_t c = 0; c < C; ++c) out[c] = kept(codes[c] == want, v[c]);
}

template <typename T>
void unpool_channels(const T* v, const uint8_t* codes, int64_t C, uint8_t want, T* out) {
  int64_t done = 0;
#ifdef SEGNET_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<T, float>) {
    if (avx2::cpu_has_avx2()) done = avx2::unpool_channels(v, codes, C, want, out);
  }
#endif
  if (done < C) SEGNET_VECTORIZED(unpool_channels_generic(v + done, codes + done, C - done, want, out + done));
}

// Whether the AVX2 NCHW loops, which read 2-bit codes straight from the packed bytes, serve
// a row whose first window is k (it must start a byte).
template <typename T>
bool avx2_reads_packed(int64_t k) {
#ifdef SEGNET_HAVE_AVX2_PATH
  return std::is_same_v<T, float> && k % 4 == 0 && avx2::cpu_has_avx2();
#else
  return false;
#endif
}

// Orders the streamed stores of a task before the task ends (see pool2x2_avx2.h).
template <typename T>
void end_of_task() {
#ifdef SEGNET_HAVE_AVX2_PATH
  if (std::is_same_v<T, float> && avx2::cpu_has_avx2()) avx2::store_fence();
#endif
}

// NCHW: gradients of n full windows from rows g0, g1 of grad_output.
template <typename T>
SEGNET_LEAF void gather_span(const T* __restrict__ g0, const T* __restrict__ g1,
                                     const uint8_t* __restrict__ codes, int64_t n, T* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) {  // loads unconditional, so the loop vectorises
    const uint8_t k = codes[i];
    const T a = g0[2 * i], b = g0[2 * i + 1], c = g1[2 * i], d = g1[2 * i + 1];
    const T top = k & 1 ? b : a, bottom = k & 1 ? d : c;
    out[i] = k & 2 ? bottom : top;
  }
}

// channels_last: gradients of one full window across C channels.
template <typename T>
SEGNET_LEAF void gather_channels(const T* __restrict__ g00, const T* __restrict__ g01,
                                         const T* __restrict__ g10, const T* __restrict__ g11,
                                         const uint8_t* __restrict__ codes, int64_t C,
                                         T* __restrict__ out) {
  for (int64_t c = 0; c < C; ++c) {
    const uint8_t k = codes[c];
    const T a = g00[c], b = g01[c], d0 = g10[c], d1 = g11[c];
    const T top = k & 1 ? b : a, bottom = k & 1 ? d1 : d0;
    out[c] = k & 2 ? bottom : top;
  }
}

// ---- codes <-> packed bytes over window ranges ------------------------------------

// Codes of windows [k0, k0 + n), read from codes[i * stride]; bytes the range covers
// only in part are OR-ed atomically (the output starts zeroed).
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
  if (stride == 1) {
    const int64_t full = (end - k) / 4;
    SEGNET_VECTORIZED(pack_bytes(codes + (k - k0), full, packed + (k >> 2)));
    k += 4 * full;
  }
  for (; k + 4 <= end; k += 4) {
    const uint8_t* c = codes + (k - k0) * stride;
    packed[k >> 2] = c[0] | (c[stride] << 2) | (c[2 * stride] << 4) | (c[3 * stride] << 6);
  }
  if (k < end) store_partial(end);
}

// codes[i] = code of window k0 + i, for i < n.
void load_codes(const uint8_t* packed, int64_t k0, int64_t n, uint8_t* codes) {
  int64_t i = 0;
  for (; i < n && ((k0 + i) & 3); ++i) codes[i] = read_code(packed, k0 + i);
  const int64_t full = (n - i) / 4;
  SEGNET_VECTORIZED(unpack_bytes(packed + ((k0 + i) >> 2), full, codes + i));
  for (i += 4 * full; i < n; ++i) codes[i] = read_code(packed, k0 + i);
}

// channels_last: codes [Wo][C] of row oh of image n (plane c's windows lie Ho*Wo apart).
void load_codes_nhwc(const uint8_t* packed, const PoolGeometry& g, int64_t n, int64_t oh, uint8_t* codes) {
  const int64_t C = g.C, plane = g.Ho * g.Wo, first = (n * C * g.Ho + oh) * g.Wo;
  if (g.Wo % 4 == 0) {  // every row starts a byte: 4 windows of a channel per byte
    const int64_t plane_bytes = plane / 4;
    const uint8_t* end = packed + packed_bytes(g.windows());
    for (int64_t ow = 0; ow < g.Wo; ow += 4) {
      const uint8_t* src = packed + (first + ow) / 4;
      int64_t done = 0;
#ifdef SEGNET_HAVE_AVX2_PATH
      if (avx2::cpu_has_avx2() && 8 * plane_bytes < INT32_MAX && src + (C - 1) * plane_bytes + 4 <= end)
        done = avx2::split_codes_across_planes(src, C, plane_bytes, codes + ow * C);
#endif
      if (done < C) SEGNET_VECTORIZED(split_codes_across_planes(src, done, C, plane_bytes, codes + ow * C));
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c)
    for (int64_t ow = 0; ow < g.Wo; ++ow) codes[ow * C + c] = read_code(packed, first + c * plane + ow);
}

// ---- max_pool2x2 -----------------------------------------------------------------

// A partial border window (ceil mode), scalar.
template <typename T>
uint8_t border_window(const T* p, int64_t col_step, int64_t row_step, bool col1, bool row1, T* y) {
  return window_argmax(p[0], col1 ? p[col_step] : p[0], row1 ? p[row_step] : p[0],
                       col1 && row1 ? p[row_step + col_step] : p[0], col1, row1, y);
}

template <typename T>
void pool_nchw(const T* x, T* y, uint8_t* packed, const PoolGeometry& g) {
  constexpr int64_t kUnit = 8192;  // windows per task, a multiple of 4: tasks own whole bytes
  const int64_t windows = g.windows();
  at::parallel_for(0, (windows + kUnit - 1) / kUnit, 1, [&](int64_t u0, int64_t u1) {
    uint8_t codes[kUnit];
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t k0 = u * kUnit, k1 = std::min(k0 + kUnit, windows);
      for (int64_t k = k0; k < k1;) {  // one row segment at a time
        const int64_t row = k / g.Wo, ow0 = k % g.Wo, n = std::min(g.Wo - ow0, k1 - k);
        const int64_t h = 2 * (row % g.Ho);
        const T* r0 = x + ((row / g.Ho) * g.H + h) * g.W;
        const bool row1 = h + 1 < g.H;
        const int64_t full_end = row1 ? std::min(ow0 + n, g.W / 2) : ow0;
        // windows whose packed bytes the AVX2 loop writes itself; the rest go through codes
        const int64_t direct = pool_span_packed(r0 + 2 * ow0, r0 + g.W + 2 * ow0, k, full_end - ow0, y + k, packed);
        const int64_t ow1 = ow0 + direct;
        uint8_t* c = codes + (k - k0) - ow0;  // c[ow]: the code of window ow of this row
        pool_span(r0 + 2 * ow1, r0 + g.W + 2 * ow1, full_end - ow1, y + k + direct, c + ow1);
        for (int64_t ow = full_end; ow < ow0 + n; ++ow)
          c[ow] = border_window(r0 + 2 * ow, 1, g.W, 2 * ow + 1 < g.W, row1, y + k + ow - ow0);
        store_codes(packed, k + direct, c + ow1, n - direct, 1);
        k += n;
      }
    }
    end_of_task<T>();
  });
}

// channels_last: a row of n full windows (n % 4 == 0), codes straight into the packed
// planes (see avx2::pool_row_packed); false where no such loop serves T and C.
template <typename T>
bool pool_row_packed(const T* top, const T* bottom, int64_t n, int64_t C, T* y, uint8_t* packed,
                     int64_t plane_bytes) {
#ifdef SEGNET_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<T, float>) {
    if (avx2::cpu_has_avx2()) return avx2::pool_row_packed(top, bottom, n, C, y, packed, plane_bytes);
  }
#endif
  return false;
}

template <typename T>
void pool_nhwc(const T* x, T* y, uint8_t* packed, const PoolGeometry& g) {
  const int64_t C = g.C, plane = g.Ho * g.Wo;
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, C * g.Wo));
  at::parallel_for(0, g.N * g.Ho, grain, [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> codes(g.Wo * C);  // [ow][c]
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.Ho, oh = r % g.Ho;
      const T* top = x + (n * g.H + 2 * oh) * g.W * C;
      T* yrow = y + r * g.Wo * C;
      const int64_t first = (n * C * g.Ho + oh) * g.Wo;  // window of channel 0 at (oh, 0)
      const bool row1 = 2 * oh + 1 < g.H;
      // Wo % 4 == 0: every row starts a byte in every plane. A row of full windows goes to
      // its bytes in one pass (written per plane, [c][ow / 4], then copied out: storing them
      // straight into the planes, 64 pages apart, was slower).
      if (g.Wo % 4 == 0 && row1 && 2 * g.Wo <= g.W &&
          pool_row_packed(top, top + g.W * C, g.Wo, C, yrow, codes.data(), g.Wo / 4)) {
        for (int64_t c = 0; c < C; ++c)
          std::memcpy(packed + (first + c * plane) / 4, codes.data() + c * (g.Wo / 4), g.Wo / 4);
        continue;
      }
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        const T* p = top + 2 * ow * C;
        uint8_t* cp = codes.data() + ow * C;
        if (row1 && 2 * ow + 1 < g.W) {
          pool_channels(p, p + C, p + g.W * C, p + g.W * C + C, C, yrow + ow * C, cp);
        } else {
          for (int64_t c = 0; c < C; ++c)
            cp[c] = border_window(p + c, C, g.W * C, 2 * ow + 1 < g.W, row1, yrow + ow * C + c);
        }
      }
      if (g.Wo % 4 == 0) {
        for (int64_t s = 0; s < g.Wo; s += 4)
          SEGNET_VECTORIZED(join_codes_across_planes(codes.data() + s * C, C, packed + (first + s) / 4, plane / 4));
      } else {
        for (int64_t c = 0; c < C; ++c) store_codes(packed, first + c * plane, codes.data() + c, g.Wo, C);
      }
    }
    end_of_task<T>();
  });
}

// ---- max_unpool2x2 (also the backward of max_pool2x2) -----------------------------

template <typename T>
void unpool_nchw(const T* v, const uint8_t* packed, T* y, const PoolGeometry& g) {
  const int64_t pairs = (g.H + 1) / 2;  // output row pairs per plane
  const int64_t paired = std::min(g.Wo, g.W / 2);  // windows with both output columns
  at::parallel_for(0, g.N * g.C * pairs, 16, [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> codes(g.Wo);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t plane = t / pairs, oh = t % pairs;
      const int64_t k = (plane * g.Ho + oh) * g.Wo;
      // windows done by the AVX2 loop, which reads the packed bytes itself
      const int64_t done = avx2_reads_packed<T>(k) ? paired - paired % 8 : 0;
      if (oh < g.Ho) load_codes(packed, k + done, g.Wo - done, codes.data());
      for (int dy = 0; dy < 2 && 2 * oh + dy < g.H; ++dy) {
        T* o = y + (plane * g.H + 2 * oh + dy) * g.W;
        if (oh >= g.Ho) {  // the extra last row when H = 2 * Ho + 1
          std::fill(o, o + g.W, T(0));
          continue;
        }
#ifdef SEGNET_HAVE_AVX2_PATH
        if (done) {
          avx2::unpool_span(reinterpret_cast<const float*>(v + k), packed + k / 4, done, dy,
                            reinterpret_cast<float*>(o));
        }
#endif
        SEGNET_VECTORIZED(unpool_span(v + k + done, codes.data(), paired - done, dy, o + 2 * done));
        if (paired < g.Wo) o[2 * paired] = codes[paired - done] == 2 * dy ? v[k + paired] : T(0);
        std::fill(o + std::min(g.W, 2 * g.Wo), o + g.W, T(0));
      }
    }
    end_of_task<T>();
  });
}

template <typename T>
void unpool_nhwc(const T* v, const uint8_t* packed, T* y, const PoolGeometry& g) {
  const int64_t C = g.C, pairs = (g.H + 1) / 2;
  at::parallel_for(0, g.N * pairs, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> codes(g.Wo * C);  // [ow][c]
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / pairs, oh = t % pairs;
      if (oh < g.Ho) load_codes_nhwc(packed, g, n, oh, codes.data());
      for (int dy = 0; dy < 2 && 2 * oh + dy < g.H; ++dy) {
        T* o = y + (n * g.H + 2 * oh + dy) * g.W * C;
        for (int64_t w = 0; w < g.W; ++w, o += C) {
          const int64_t ow = w >> 1;
          if (oh >= g.Ho || ow >= g.Wo) {
            std::fill(o, o + C, T(0));
          } else {
            unpool_channels(v + ((n * g.Ho + oh) * g.Wo + ow) * C, codes.data() + ow * C, C,
                            uint8_t(2 * dy + (w & 1)), o);
          }
        }
      }
    }
    end_of_task<T>();
  });
}

// ---- max_unpool2x2_backward: grad_values = grad_output at each window's arg-max ----

// A border window's gradient (zero where the code points outside the output), scalar.
template <typename T>
T border_pick(const T* p, int64_t col_step, int64_t row_step, uint8_t code, bool col1, bool row1) {
  const bool dx = code & 1, dy = code >> 1;
  if ((dx && !col1) || (dy && !row1)) return T(0);
  return p[dy * row_step + dx * col_step];
}

template <typename T>
void gather_nchw(const T* go, const uint8_t* packed, T* gv, const PoolGeometry& g) {
  at::parallel_for(0, g.N * g.C * g.Ho, 16, [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> codes(g.Wo);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = 2 * (r % g.Ho);
      const bool row1 = h + 1 < g.H;
      const T* top = go + ((r / g.Ho) * g.H + h) * g.W;
      const int64_t full_end = row1 ? g.W / 2 : 0;
      T* out = gv + r * g.Wo;
      // windows gathered by the AVX2 loop, which reads the packed bytes itself
      const int64_t done = avx2_reads_packed<T>(r * g.Wo) ? full_end - full_end % 8 : 0;
#ifdef SEGNET_HAVE_AVX2_PATH
      if (done) {
        avx2::gather_span(reinterpret_cast<const float*>(top), reinterpret_cast<const float*>(top + g.W),
                          packed + r * g.Wo / 4, done, reinterpret_cast<float*>(out));
      }
#endif
      load_codes(packed, r * g.Wo + done, g.Wo - done, codes.data());
      SEGNET_VECTORIZED(gather_span(top + 2 * done, top + g.W + 2 * done, codes.data(), full_end - done, out + done));
      for (int64_t ow = full_end; ow < g.Wo; ++ow)
        out[ow] = border_pick(top + 2 * ow, 1, g.W, codes[ow - done], 2 * ow + 1 < g.W, row1);
    }
    end_of_task<T>();
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
      load_codes_nhwc(packed, g, n, oh, codes.data());
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        const T* p = go + ((n * g.H + 2 * oh) * g.W + 2 * ow) * C;
        const uint8_t* cp = codes.data() + ow * C;
        T* out = gv + (t * g.Wo + ow) * C;
        if (row1 && 2 * ow + 1 < g.W) {
          SEGNET_VECTORIZED(gather_channels(p, p + C, p + g.W * C, p + g.W * C + C, cp, C, out));
        } else {
          for (int64_t c = 0; c < C; ++c)
            out[c] = border_pick(p + c, C, g.W * C, cp[c], 2 * ow + 1 < g.W, row1);
        }
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
  Tensor values = empty_output({g.N, g.C, g.Ho, g.Wo}, x.options().memory_format(g.format));
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
  Tensor y = empty_output({g.N, g.C, g.H, g.W}, values.options().memory_format(g.format));
  if (y.numel() == 0) return y;
  SEGNET_DISPATCH_FLOATING(values.scalar_type(), "max_unpool2x2_cpu", [&] {
    auto run = g.channels_last() ? unpool_nhwc<Moved<scalar_t>> : unpool_nchw<Moved<scalar_t>>;
    run(moved(values.const_data_ptr<scalar_t>()), packed.const_data_ptr<uint8_t>(),
        moved(y.mutable_data_ptr<scalar_t>()), g);
  });
  return y;
}

// grad_output: [N, C, H, W], packed_indices, pooled_size (Ho, Wo) -> [N, C, Ho, Wo]
Tensor max_unpool2x2_backward_cpu(const Tensor& grad_output_in, const Tensor& packed_in,
                                  at::IntArrayRef pooled_size) {
  const PoolGeometry g = gather_geometry(grad_output_in, packed_in, pooled_size);
  const Tensor grad_output = grad_output_in.contiguous(g.format), packed = packed_in.contiguous();
  Tensor grad_values =
      empty_output({g.N, g.C, g.Ho, g.Wo}, grad_output.options().memory_format(g.format));
  if (grad_values.numel() == 0) return grad_values;
  SEGNET_DISPATCH_FLOATING(grad_output.scalar_type(), "max_unpool2x2_backward_cpu", [&] {
    auto run = g.channels_last() ? gather_nhwc<Moved<scalar_t>> : gather_nchw<Moved<scalar_t>>;
    run(moved(grad_output.const_data_ptr<scalar_t>()), packed.const_data_ptr<uint8_t>(),
        moved(grad_values.mutable_data_ptr<scalar_t>()), g);
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
