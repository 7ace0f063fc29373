// AVX2 + BMI2 versions of the float loops the compiler does not vectorise well enough
// to keep up with memory. Compiled with a target attribute and used only when the CPU
// has the instructions (cpu_has_avx2), so the library still runs on any x86-64.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/vectorize.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SEGNET_HAVE_AVX2_PATH 1

namespace segnet {
namespace avx2 {

// Whether these loops run: the CPU has AVX2 and BMI2 (x86-64-v3) and SEGNET_EXT_NO_AVX2 is
// unset (vectorize.h; the tests set it to run the portable loops).
inline bool cpu_has_avx2() { return cpu_level() >= CpuLevel::avx2; }

// Windows are processed 8 at a time in the lane order 0 1 4 5 2 3 6 7 that
// _mm256_shuffle_ps leaves them in; this puts the 8 bits of a movemask back in order.
__attribute__((target("avx2,bmi2"))) inline unsigned window_order(unsigned bits) {
  return (bits & 0xC3u) | ((bits & 0x0Cu) << 2) | ((bits & 0x30u) >> 2);
}

// Outputs are written once and not read again soon: where 32-byte aligned, stream them
// past the cache (no read-for-ownership of the output lines). The loops do not fence:
// callers fence once per parallel task (store_fence), not per row, since each fence waits
// for the write-combining buffers to drain.
template <bool STREAM>
__attribute__((target("avx2,bmi2"))) inline void store8(float* p, __m256 v) {
  if constexpr (STREAM) _mm256_stream_ps(p, v);
  else _mm256_storeu_ps(p, v);
}

inline bool aligned32(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 31) == 0; }

// t = candidate replaces the running maximum m (torch's rule: greater, or NaN)
__attribute__((target("avx2,bmi2"))) inline __m256 replaces(__m256 candidate, __m256 m) {
  return _mm256_or_ps(_mm256_cmp_ps(candidate, m, _CMP_GT_OQ),
                      _mm256_cmp_ps(candidate, candidate, _CMP_UNORD_Q));
}

// NCHW loops read a window row's two input rows one after the other, a chunk of up to
// kChunk windows at a time: first the top row's, keeping per window what the bottom row's
// pass needs in an L1-resident buffer, then the bottom row's. The input is then read as one
// sequential stream (row 2i + 1 follows row 2i in memory). Reading both rows at once, two
// streams one row apart, keeps this CPU's prefetchers from running ahead: a 177 MB gather
// on one core took 17-19 ms that way and takes 9-10 ms in two passes (a plain read: 7-8 ms).
constexpr int64_t kChunk = 512;

// The 8 windows whose left elements in this row are r[0], r[2], ..., r[14]: their left
// (a) and right (b) elements in the lane order 0 1 4 5 2 3 6 7.
__attribute__((target("avx2,bmi2"))) inline void load_row_windows(const float* r, __m256& a, __m256& b) {
  const __m256 lo = _mm256_loadu_ps(r), hi = _mm256_loadu_ps(r + 8);
  a = _mm256_shuffle_ps(lo, hi, 0x88);
  b = _mm256_shuffle_ps(lo, hi, 0xDD);
}

// lanes in window order 0 .. 7 again
__attribute__((target("avx2,bmi2"))) inline __m256 in_window_order(__m256 v) {
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), 0xD8));
}

// The arg-max rule on 8 windows at once: returns their maxima, and the movemasks of "b,
// then c, then d replaced the running maximum" (in lane order).
__attribute__((target("avx2,bmi2"))) inline __m256 window_max(__m256 a, __m256 b, __m256 c,
                                                             __m256 d, unsigned& k1, unsigned& k2,
                                                             unsigned& k3) {
  const __m256 t1 = replaces(b, a);
  __m256 m = _mm256_blendv_ps(a, b, t1);
  const __m256 t2 = replaces(c, m);
  m = _mm256_blendv_ps(m, c, t2);
  const __m256 t3 = replaces(d, m);
  k1 = _mm256_movemask_ps(t1);
  k2 = _mm256_movemask_ps(t2);
  k3 = _mm256_movemask_ps(t3);
  return _mm256_blendv_ps(m, d, t3);
}

// code bytes of 8 windows (byte i: window i's code 2 dy + dx) from the bits dx and dy of
// each window (bit i: window i)
__attribute__((target("avx2,bmi2"))) inline uint64_t code_bytes_of(unsigned dx, unsigned dy) {
  return _pdep_u64(dx, 0x0101010101010101ull) | _pdep_u64(dy, 0x0202020202020202ull);
}

// code bytes of 8 windows from the movemasks of "b, c, d replaced the maximum" (in window
// order): 3 if t3, else 2 if t2, else 1 if t1, else 0
__attribute__((target("avx2,bmi2"))) inline uint64_t code_bytes(unsigned k1, unsigned k2,
                                                                unsigned k3) {
  return code_bytes_of(k3 | (k1 & ~k2), k2 | k3);
}

// NCHW, n full windows (8 at a time; the caller does the rest): values y[0, n), and either
// one code byte per window (out = codes) or, PACKED, the 2 packed bytes of each 8 windows
// (window k's code in bits 2k, 2k + 1; out = the byte of window 0, which must start a
// byte), so no code buffer is written and packed afterwards. Two passes per chunk (see
// kChunk): the top row's maxima and "b replaced a" bits, then the bottom row's pairs
// against them. The arg-max rule (greater, or NaN) gives the same window maximum and
// position whether it runs over a, b, c, d or over the top pair's and the bottom pair's
// winners: both pick the last NaN if any, else the first maximum.
template <bool STREAM, bool PACKED>
__attribute__((target("avx2,bmi2"))) inline int64_t pool_span_impl(
    const float* __restrict__ r0, const float* __restrict__ r1, int64_t n, float* __restrict__ y,
    uint8_t* __restrict__ out) {
  alignas(32) float top[kChunk];
  uint8_t top_dx[kChunk / 8];
  const int64_t full = n - n % 8;
  for (int64_t i0 = 0; i0 < full; i0 += kChunk) {
    const int64_t len = std::min(kChunk, full - i0);
    for (int64_t j = 0; j < len; j += 8) {
      __m256 a, b;
      load_row_windows(r0 + 2 * (i0 + j), a, b);
      const __m256 t = replaces(b, a);
      _mm256_store_ps(top + j, _mm256_blendv_ps(a, b, t));
      top_dx[j / 8] = static_cast<uint8_t>(_mm256_movemask_ps(t));
    }
    for (int64_t j = 0; j < len; j += 8) {
      const int64_t i = i0 + j;
      __m256 c, d;
      load_row_windows(r1 + 2 * i, c, d);
      const __m256 u = replaces(d, c);
      const __m256 bottom = _mm256_blendv_ps(c, d, u), m_top = _mm256_load_ps(top + j);
      const __m256 t = replaces(bottom, m_top);  // the bottom pair's winner replaces the top's
      store8<STREAM>(y + i, in_window_order(_mm256_blendv_ps(m_top, bottom, t)));
      const unsigned kt = _mm256_movemask_ps(t), ku = _mm256_movemask_ps(u);
      const unsigned dx = window_order((kt & ku) | (~kt & top_dx[j / 8])), dy = window_order(kt);
      if constexpr (PACKED) {
        const auto bytes = static_cast<uint16_t>(_pdep_u32(dx, 0x5555u) | _pdep_u32(dy, 0xAAAAu));
        std::memcpy(out + i / 4, &bytes, 2);
      } else {
        const uint64_t bytes = code_bytes_of(dx, dy);
        std::memcpy(out + i, &bytes, 8);
      }
    }
  }
  return full;  // streamed stores: the caller fences once per task (store_fence)
}

template <bool PACKED>
inline int64_t pool_span(const float* r0, const float* r1, int64_t n, float* y, uint8_t* out) {
  return aligned32(y) ? pool_span_impl<true, PACKED>(r0, r1, n, y, out)
                      : pool_span_impl<false, PACKED>(r0, r1, n, y, out);
}

// Orders streamed stores before whatever follows (the end of a parallel task).
__attribute__((target("avx2,bmi2"))) inline void store_fence() { _mm_sfence(); }

// channels_last, one full window across C channels (8 at a time): its four pixels' rows.
template <bool STREAM>
__attribute__((target("avx2,bmi2"))) inline int64_t pool_channels_impl(
    const float* __restrict__ p00, const float* __restrict__ p01, const float* __restrict__ p10,
    const float* __restrict__ p11, int64_t C, float* __restrict__ y, uint8_t* __restrict__ codes) {
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    unsigned k1, k2, k3;
    const __m256 m = window_max(_mm256_loadu_ps(p00 + c), _mm256_loadu_ps(p01 + c),
                                _mm256_loadu_ps(p10 + c), _mm256_loadu_ps(p11 + c), k1, k2, k3);
    store8<STREAM>(y + c, m);
    const uint64_t bytes = code_bytes(k1, k2, k3);
    std::memcpy(codes + c, &bytes, 8);
  }
  return c;  // streamed stores: the caller fences once per task (store_fence)
}

inline int64_t pool_channels(const float* p00, const float* p01, const float* p10,
                             const float* p11, int64_t C, float* y, uint8_t* codes) {
  return aligned32(y) && C % 8 == 0 ? pool_channels_impl<true>(p00, p01, p10, p11, C, y, codes)
                                    : pool_channels_impl<false>(p00, p01, p10, p11, C, y, codes);
}

// channels_last, 4 consecutive full windows across C channels (C % 8 == 0, C <= kQuadChannels),
// whose codes make one packed byte per channel: written to bytes[c * stride] with no code
// buffer to join. Each window is read whole (its 4 pixels, sequential as the prefetchers
// like), the code bits gathered per 8 channels. top, bottom: the windows' 8 pixels in each
// row; y: the 4 output pixels.
constexpr int64_t kQuadChannels = 1024;

template <bool STREAM>
__attribute__((target("avx2,bmi2"))) inline void pool_quad_impl(
    const float* __restrict__ top, const float* __restrict__ bottom, int64_t C, float* __restrict__ y,
    uint8_t* __restrict__ bytes, int64_t stride) {
  uint64_t acc[kQuadChannels / 8];  // code bytes of channels c .. c + 7
  std::fill(acc, acc + C / 8, uint64_t(0));
  for (int j = 0; j < 4; ++j) {
    const float* p0 = top + 2 * j * C;
    const float* p1 = bottom + 2 * j * C;
    for (int64_t c = 0; c < C; c += 8) {
      unsigned k1, k2, k3;
      const __m256 m = window_max(_mm256_loadu_ps(p0 + c), _mm256_loadu_ps(p0 + C + c), _mm256_loadu_ps(p1 + c),
                                  _mm256_loadu_ps(p1 + C + c), k1, k2, k3);
      store8<STREAM>(y + j * C + c, m);
      acc[c / 8] |= code_bytes(k1, k2, k3) << (2 * j);
    }
  }
  for (int64_t c = 0; c < C; c += 8)
    for (int i = 0; i < 8; ++i) bytes[(c + i) * stride] = static_cast<uint8_t>(acc[c / 8] >> (8 * i));
}

// A row of n full windows (n % 4 == 0) as quads; false (nothing done) where C does not fit.
inline bool pool_row_packed(const float* top, const float* bottom, int64_t n, int64_t C, float* y,
                            uint8_t* bytes, int64_t stride) {
  if (C % 8 != 0 || C > kQuadChannels) return false;
  const bool stream = aligned32(y) && aligned32(y + C);
  for (int64_t q = 0; q < n / 4; ++q) {
    const int64_t w = 4 * q;
    if (stream)
      pool_quad_impl<true>(top + 2 * w * C, bottom + 2 * w * C, C, y + w * C, bytes + q, stride);
    else
      pool_quad_impl<false>(top + 2 * w * C, bottom + 2 * w * C, C, y + w * C, bytes + q, stride);
  }
  return true;  // streamed stores: the caller fences once per task (store_fence)
}

// channels_last unpooling, one output pixel across C channels (8 at a time); streamed
// stores are fenced by the caller once per task (store_fence).
template <bool STREAM>
__attribute__((target("avx2,bmi2"))) inline int64_t unpool_channels_impl(
    const float* __restrict__ v, const uint8_t* __restrict__ codes, int64_t C, uint8_t want,
    float* __restrict__ out) {
  const __m256i wanted = _mm256_set1_epi32(want);
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    int64_t packed8;
    std::memcpy(&packed8, codes + c, 8);
    const __m256i k = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(packed8));
    const __m256 here = _mm256_castsi256_ps(_mm256_cmpeq_epi32(k, wanted));
    store8<STREAM>(out + c, _mm256_and_ps(_mm256_loadu_ps(v + c), here));
  }
  return c;
}

inline int64_t unpool_channels(const float* v, const uint8_t* codes, int64_t C, uint8_t want,
                               float* out) {
  return aligned32(out) && C % 8 == 0 ? unpool_channels_impl<true>(v, codes, C, want, out)
                                      : unpool_channels_impl<false>(v, codes, C, want, out);
}

// NCHW unpooling, output row dy of n windows (8 at a time): out[2i], out[2i + 1]. Reads
// the codes straight from the packed bytes (window 0 must start a byte).
template <bool STREAM>
__attribute__((target("avx2,bmi2"))) inline int64_t unpool_span_impl(
    const float* __restrict__ v, const uint8_t* __restrict__ packed, int64_t n, int dy,
    float* __restrict__ out) {
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14), three = _mm256_set1_epi32(3);
  const __m256i want0 = _mm256_set1_epi32(2 * dy), want1 = _mm256_set1_epi32(2 * dy + 1);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint16_t bits16;
    std::memcpy(&bits16, packed + i / 4, 2);
    const __m256i k = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(bits16), shifts), three);
    const __m256 x = _mm256_loadu_ps(v + i);
    const __m256 left = _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_cmpeq_epi32(k, want0)));
    const __m256 right = _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_cmpeq_epi32(k, want1)));
    const __m256 lo = _mm256_unpacklo_ps(left, right), hi = _mm256_unpackhi_ps(left, right);
    store8<STREAM>(out + 2 * i, _mm256_permute2f128_ps(lo, hi, 0x20));
    store8<STREAM>(out + 2 * i + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
  return i;  // streamed stores: the caller fences once per task (store_fence)
}

inline int64_t unpool_span(const float* v, const uint8_t* packed, int64_t n, int dy, float* out) {
  return aligned32(out) ? unpool_span_impl<true>(v, packed, n, dy, out)
                        : unpool_span_impl<false>(v, packed, n, dy, out);
}

// The codes of the 8 windows whose packed bits start at packed[i / 4], one per lane in the
// lane order 0 1 4 5 2 3 6 7 (in the low 2 bits; the bits above are the next windows')
__attribute__((target("avx2,bmi2"))) inline __m256i lane_codes(const uint8_t* packed, int64_t i) {
  uint16_t bits16;
  std::memcpy(&bits16, packed + i / 4, 2);
  return _mm256_srlv_epi32(_mm256_set1_epi32(bits16), _mm256_setr_epi32(0, 2, 8, 10, 4, 6, 12, 14));
}

// blendv reads each lane's sign bit: code bit 0 (dx) shifted there, or bit 1 (dy)
__attribute__((target("avx2,bmi2"))) inline __m256 dx_mask(__m256i k) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(k, 31));
}
__attribute__((target("avx2,bmi2"))) inline __m256 dy_mask(__m256i k) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(k, 30));
}

// NCHW gather (unpooling backward), n full windows, 8 at a time: out[i] = the element of
// window i (rows g0, g1) that its code names. Reads the codes straight from the packed
// bytes (window 0 must start a byte: 2 bytes per 8 windows). Two passes per chunk (see
// kChunk): each window's pick from the top row, then from the bottom row and between the two.
template <bool STREAM>
__attribute__((target("avx2,bmi2"))) inline int64_t gather_span_impl(
    const float* __restrict__ g0, const float* __restrict__ g1, const uint8_t* __restrict__ packed,
    int64_t n, float* __restrict__ out) {
  alignas(32) float top[kChunk];
  const int64_t full = n - n % 8;
  for (int64_t i0 = 0; i0 < full; i0 += kChunk) {
    const int64_t len = std::min(kChunk, full - i0);
    for (int64_t j = 0; j < len; j += 8) {
      __m256 a, b;
      load_row_windows(g0 + 2 * (i0 + j), a, b);
      _mm256_store_ps(top + j, _mm256_blendv_ps(a, b, dx_mask(lane_codes(packed, i0 + j))));
    }
    for (int64_t j = 0; j < len; j += 8) {
      const int64_t i = i0 + j;
      __m256 c, d;
      load_row_windows(g1 + 2 * i, c, d);
      const __m256i k = lane_codes(packed, i);
      const __m256 picked =
          _mm256_blendv_ps(_mm256_load_ps(top + j), _mm256_blendv_ps(c, d, dx_mask(k)), dy_mask(k));
      store8<STREAM>(out + i, in_window_order(picked));
    }
  }
  return full;  // streamed stores: the caller fences once per task (store_fence)
}

inline int64_t gather_span(const float* g0, const float* g1, const uint8_t* packed, int64_t n,
                           float* out) {
  return aligned32(out) ? gather_span_impl<true>(g0, g1, packed, n, out)
                        : gather_span_impl<false>(g0, g1, packed, n, out);
}

// channels_last: plane c's packed byte src[c * plane_bytes] split into the codes of its 4
// windows, codes[i * C + c], 8 planes per gather. Each gather lane reads 4 bytes from its
// plane's byte on: the caller makes sure 3 bytes past the last plane's are readable, and
// 8 * plane_bytes fits an int32. Returns the planes done (a multiple of 8).
__attribute__((target("avx2,bmi2"))) inline int64_t split_codes_across_planes(
    const uint8_t* __restrict__ src, int64_t C, int64_t plane_bytes, uint8_t* __restrict__ codes) {
  const __m256i offsets = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                             _mm256_set1_epi32(static_cast<int32_t>(plane_bytes)));
  const __m256i three = _mm256_set1_epi32(3);
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const __m256i b = _mm256_i32gather_epi32(reinterpret_cast<const int*>(src + c * plane_bytes), offsets, 1);
    for (int i = 0; i < 4; ++i) {
      const __m256i k = _mm256_and_si256(_mm256_srli_epi32(b, 2 * i), three);
      const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(k), _mm256_extracti128_si256(k, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i * C + c), _mm_packus_epi16(w, w));
    }
  }
  return c;
}

}  // namespace avx2
}  // namespace segnet
#endif
