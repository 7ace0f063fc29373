// Kernel launch and launch geometry, shared by the real CUDA build and the CPU
// emulation build (tests/cuda_emu/cuda_emu.h), so tests run the same launchers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>

#include "common/pool2x2.h"

#ifdef SEGNET_CUDA_EMULATION
#define SEGNET_LAUNCH(kernel, blocks, threads, stream, ...) \
  ::cuda_emu::launch(__func__, dim3(blocks), dim3(threads), [&] { kernel(__VA_ARGS__); })
#else
#define SEGNET_LAUNCH(kernel, blocks, threads, stream, ...) \
  kernel<<<blocks, threads, 0, stream>>>(__VA_ARGS__)
#endif

namespace segnet {
namespace kernels {

#ifdef SEGNET_CUDA_EMULATION
inline bool stream_is_capturing(cudaStream_t) { return false; }
// The emulator's timer: runs `work` and returns the time a test assigned (cuda_emu::fake_timer).
inline double device_time_ms(const std::function<void()>& work, cudaStream_t) {
  return ::cuda_emu::fake_timer().time(work);
}
#else
inline bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(stream, &status) == cudaSuccess && status != cudaStreamCaptureStatusNone;
}

// Milliseconds per run of `work` (launches on `stream`): one warm-up run (which also lets
// cuDNN pick its algorithm), then the mean of a few runs between two events.
inline double device_time_ms(const std::function<void()>& work, cudaStream_t stream) {
  constexpr int kRuns = 5;
  work();
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  cudaEventRecord(start, stream);
  for (int i = 0; i < kRuns; ++i) work();
  cudaEventRecord(stop, stream);
  float ms = 0;
  const bool ok = cudaEventSynchronize(stop) == cudaSuccess && cudaEventElapsedTime(&ms, start, stop) == cudaSuccess;
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ok ? ms / kRuns : 1e30;  // a failed timing never makes a candidate win
}
#endif

// threads per block and a cap on blocks (grid-stride loops cover the rest). Tests
// use small values so that partial blocks, partial warps and grid-stride loops run.
struct LaunchConfig {
  int threads = 256;
  int64_t max_blocks = 8192;
};

inline unsigned blocks_for(int64_t work, const LaunchConfig& cfg) {
  const int64_t blocks = (work + cfg.threads - 1) / cfg.threads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, cfg.max_blocks)));
}

// Element strides of a 4-D tensor, in [n, c, h, w] order.
struct Strides4 {
  int64_t n, c, h, w;
  SEGNET_HD int64_t at(int64_t in, int64_t ic, int64_t ih, int64_t iw) const {
    return in * n + ic * c + ih * h + iw * w;
  }
};

SEGNET_HD Strides4 dense_strides(int64_t C, int64_t H, int64_t W, bool channels_last) {
  return channels_last ? Strides4{H * W * C, 1, W * C, C} : Strides4{C * H * W, H * W, W, 1};
}

// N contiguous elements loaded or stored as one aligned vector.
template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T v[N];
};

template <typename T, int N>
bool is_aligned_for_vec(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(AlignedVec<T, N>) == 0;
}

}  // namespace kernels
}  // namespace segnet
