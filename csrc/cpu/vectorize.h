// Leaf loops that the compiler vectorises are built for three x86-64 levels, AVX-512
// (x86-64-v4), AVX2 (x86-64-v3) and baseline x86-64, and the level is chosen at run time.
// A leaf is marked SEGNET_LEAF (always inlined into its caller), and called through
// SEGNET_VECTORIZED(leaf(...)): the call sits in three copies of a small lambda, each
// compiled for one level, and cpu_level() picks one.
//
// cpu_level() is the best level the CPU has, lowered by SEGNET_EXT_NO_AVX512=1 (to AVX2)
// or SEGNET_EXT_NO_AVX2=1 (to baseline; the hand-written AVX2 loops of pool2x2_avx2.h
// are off then too), so that one machine runs the code that CPUs without AVX-512, or
// without AVX2, run. torch.ops.segnet_ext.cpu_capability() names the level in use.
#pragma once

#include <cstdlib>

namespace segnet {

enum class CpuLevel { baseline = 0, avx2 = 1, avx512 = 2 };

inline CpuLevel detect_cpu_level() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  const bool off512 = std::getenv("SEGNET_EXT_NO_AVX512") != nullptr;
  const bool off2 = std::getenv("SEGNET_EXT_NO_AVX2") != nullptr;
  if (!off2 && !off512 && __builtin_cpu_supports("x86-64-v4")) return CpuLevel::avx512;
  if (!off2 && __builtin_cpu_supports("x86-64-v3")) return CpuLevel::avx2;
#endif
  return CpuLevel::baseline;
}

inline CpuLevel cpu_level() {
  static const CpuLevel level = detect_cpu_level();
  return level;
}

inline const char* cpu_level_name(CpuLevel level) {
  switch (level) {
    case CpuLevel::avx512: return "AVX512";
    case CpuLevel::avx2: return "AVX2";
    default: return "DEFAULT";
  }
}

}  // namespace segnet

#define SEGNET_LEAF [[gnu::always_inline]] inline

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SEGNET_VECTORIZED(...)                                                               \
  do {                                                                                       \
    switch (::segnet::cpu_level()) {                                                         \
      case ::segnet::CpuLevel::avx512:                                                       \
        [&]() __attribute__((target("arch=x86-64-v4"))) { __VA_ARGS__; }();                  \
        break;                                                                               \
      case ::segnet::CpuLevel::avx2:                                                         \
        [&]() __attribute__((target("arch=x86-64-v3"))) { __VA_ARGS__; }();                  \
        break;                                                                               \
      default:                                                                               \
        __VA_ARGS__;                                                                         \
    }                                                                                        \
  } while (0)
#else
#define SEGNET_VECTORIZED(...) \
  do {                         \
    __VA_ARGS__;               \
  } while (0)
#endif
