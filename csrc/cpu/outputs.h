// Activation-sized outputs of the CPU kernels. Under glibc's default malloc every block above
// 32 MB is mapped afresh for each allocation and page-faulted 4 KB at a time as the kernel
// first writes it: 73-76 ms for 177 MB on a 2-core AMD EPYC, 4x the writing itself (19 ms).
// Where a new output's memory is not in use yet, the kernels ask for transparent huge pages
// (MADV_HUGEPAGE): one 2 MB page per fault, 26-32 ms for the same 177 MB. Memory already in
// use (a block the allocator hands out again) is left as it is, and so is everything where
// the kernel has no THP.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace segnet {

inline void prefer_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end < begin + 4 * kHuge) return;  // small outputs: little to gain
  unsigned char resident = 0;
  if (mincore(reinterpret_cast<void*>(begin), 1, &resident) != 0 || (resident & 1)) return;
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

// at::empty for an output the kernel writes in full.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  prefer_huge_pages(t.data_ptr(), t.nbytes());
  return t;
}

}  // namespace segnet
