// Leaf loops that the compiler vectorises are built for several x86-64 levels
// (AVX-512, AVX2, baseline) and picked at load time by the CPU they run on.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(SEGNET_NO_MULTIVERSION)
#define SEGNET_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SEGNET_MULTIVERSION
#endif
