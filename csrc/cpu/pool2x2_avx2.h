// AVX2 + BMI2 versions of the float loops the compiler does not vectorise well enough
// to keep up with memory. Compiled with a target attribute and used only when the CPU
// has the instructions (cpu_has_avx2), so the library still runs on any x86-64.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SEGNET_HAVE_AVX2_PATH 1

namespace segnet {
namespace avx2 {

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2");
  return has;
}

// Windows are processed 8 at a time in the lane order 0 1 4 5 2 3 6 7 that
// _mm256_shuffle_ps leaves them in; this puts the 8 bits of a movemask back in order.
__attribute__((target("avx2,bmi2"))) inline unsigned window_order(unsigned bits) {
  return (bits & 0xC3u) | ((bits & 0x0Cu) << 2) | ((bits & 0x30u) >> 2);
}

// t = candidate replaces the running maximum m (torch's rule: greater, or NaN)
__attribute__((target("avx2,bmi2"))) inline __m256 replaces(__m256 candidate, __m256 m) {
  return _mm256_or_ps(_mm256_cmp_ps(candidate, m, _CMP_GT_OQ),
                      _mm256_cmp_ps(candidate, candidate, _CMP_UNORD_Q));
}

// NCHW, n full windows (8 at a time; the caller does the rest): values y[0, n), one code
// byte per window. Input rows are prefetched ~2 KB ahead: without it the loop's
// arithmetic delays the loads enough to leave memory bandwidth unused.
__attribute__((target("avx2,bmi2"))) inline int64_t pool_span(const float* __restrict__ r0,
                                                              const float* __restrict__ r1,
                                                              int64_t n, float* __restrict__ y,
                                                              uint8_t* __restrict__ codes) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_prefetch(reinterpret_cast<const char*>(r0 + 2 * i + 512), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(r1 + 2 * i + 512), _MM_HINT_T0);
    const __m256 lo0 = _mm256_loadu_ps(r0 + 2 * i), hi0 = _mm256_loadu_ps(r0 + 2 * i + 8);
    const __m256 lo1 = _mm256_loadu_ps(r1 + 2 * i), hi1 = _mm256_loadu_ps(r1 + 2 * i + 8);
    const __m256 a = _mm256_shuffle_ps(lo0, hi0, 0x88), b = _mm256_shuffle_ps(lo0, hi0, 0xDD);
    const __m256 c = _mm256_shuffle_ps(lo1, hi1, 0x88), d = _mm256_shuffle_ps(lo1, hi1, 0xDD);
    const __m256 t1 = replaces(b, a);
    __m256 m = _mm256_blendv_ps(a, b, t1);
    const __m256 t2 = replaces(c, m);
    m = _mm256_blendv_ps(m, c, t2);
    const __m256 t3 = replaces(d, m);
    m = _mm256_blendv_ps(m, d, t3);
    _mm256_storeu_ps(y + i, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(m), 0xD8)));
    const unsigned k1 = _mm256_movemask_ps(t1), k2 = _mm256_movemask_ps(t2),
                   k3 = _mm256_movemask_ps(t3);
    // code = 3 if t3, else 2 if t2, else 1 if t1, else 0
    const unsigned bit0 = window_order(k3 | (k1 & ~k2)), bit1 = window_order(k2 | k3);
    const uint64_t bytes =
        _pdep_u64(bit0, 0x0101010101010101ull) | _pdep_u64(bit1, 0x0202020202020202ull);
    std::memcpy(codes + i, &bytes, 8);
  }
  return i;
}

}  // namespace avx2
}  // namespace segnet
#endif
