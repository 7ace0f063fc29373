// Kernel launch and launch geometry, shared by the real CUDA build and the CPU
// emulation build (tests/cuda_emu/cuda_emu.h), so tests run the same launchers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <type_traits>

#include "common/pool2x2.h"

// Global memory goes through SEGNET_LOAD(p), SEGNET_LOAD_IF(active, p, otherwise) (a
// predicated load: `otherwise` where !active), SEGNET_STORE(p, value) and
// SEGNET_STORE_IF(active, p, value) (a predicated store): plain accesses
// under nvcc; in the emulator, accesses whose 32-byte sectors tests count per warp
// instruction (tests/cuda_emu/cuda_emu.h), each macro use one access site.
// SEGNET_CP_ASYNC(dst, src, bytes, zfill): an asynchronous copy of global to shared memory
// (cuda_pipeline.h's __pipeline_memcpy_async: the last `zfill` bytes zeros), its source one
// load site.
#ifdef SEGNET_CUDA_EMULATION
#define SEGNET_LAUNCH(kernel, blocks, threads, stream, ...)                                               \
  ::cuda_emu::launch(__PRETTY_FUNCTION__, dim3(blocks), dim3(threads), ::segnet::kernels::kMaxThreadsPerBlock, \
                     [&] { kernel(__VA_ARGS__); })
#define SEGNET_LOAD(p) ::cuda_emu::global_load((p), __COUNTER__)
#define SEGNET_LOAD_IF(active, p, otherwise) ::cuda_emu::global_load_if((active), (p), (otherwise), __COUNTER__)
#define SEGNET_STORE(p, value) ::cuda_emu::global_store(true, (p), (value), __COUNTER__)
#define SEGNET_STORE_IF(active, p, value) ::cuda_emu::global_store((active), (p), (value), __COUNTER__)
#define SEGNET_CP_ASYNC(dst, src, bytes, zfill) ::cuda_emu::cp_async((dst), (src), (bytes), (zfill), __COUNTER__)
#else
#define SEGNET_LAUNCH(kernel, blocks, threads, stream, ...) \
  kernel<<<blocks, threads, 0, stream>>>(__VA_ARGS__)
#define SEGNET_LOAD(p) (*(p))
#define SEGNET_LOAD_IF(active, p, otherwise) ((active) ? *(p) : (otherwise))
#define SEGNET_STORE(p, value) (*(p) = (value))
#define SEGNET_STORE_IF(active, p, value) \
  do {                                    \
    if (active) *(p) = (value);           \
  } while (0)
#define SEGNET_CP_ASYNC(dst, src, bytes, zfill) __pipeline_memcpy_async((dst), (src), (bytes), (zfill))
#endif

namespace segnet {
namespace kernels {

// Every kernel is compiled for blocks of at most this many threads (__launch_bounds__: nvcc
// budgets registers for it); a GPU refuses a larger block, and so does the emulator.
constexpr int kMaxThreadsPerBlock = 256;

#ifdef SEGNET_CUDA_EMULATION
inline bool stream_is_capturing(cudaStream_t) { return false; }
inline bool device_has_tensor_core_kernels(int) { return true; }
inline int device_sms(int) { return 132; }  // an H100 / H200
// The emulator's timer: runs `work` and returns the time a test assigned (cuda_emu::fake_timer).
inline double device_time_ms(const std::function<void()>& work, cudaStream_t) {
  return ::cuda_emu::fake_timer().time(work);
}
#else
inline bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(stream, &status) == cudaSuccess && status != cudaStreamCaptureStatusNone;
}

// Whether the device runs the sm_80 kernels (WMMA in bf16 and TF32, cp.async): the others
// were compiled without their bodies.
inline bool device_has_tensor_core_kernels(int device) {
  int major = 0;
  return cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 8;
}

inline int device_sms(int device) {
  int sms = 0;
  return cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess && sms > 0 ? sms : 132;
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
// use small values so that partial blocks, partial warps and grid-stride loops run, and
// index64 to run the 64-bit index path on small tensors.
struct LaunchConfig {
  int threads = kMaxThreadsPerBlock;
  int64_t max_blocks = 8192;
  bool index64 = false;
};

SEGNET_HD uint32_t mulhi(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return uint32_t((uint64_t(a) * b) >> 32);
#endif
}

// The lanes of the calling thread's warp that exist: a block whose size is not a multiple of
// 32 ends in a partial warp, and a shuffle's mask must not name lanes it lacks.
__device__ __forceinline__ unsigned warp_lanes() {
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned n = blockDim.x * blockDim.y * blockDim.z, left = n - (t & ~31u);
  return left >= 32 ? ~0u : (1u << left) - 1;
}

// Division by a divisor fixed at launch. For 32-bit indices (numerators below 2^31) a
// multiply-high, an add and a shift, as ATen's IntDivider; for 64-bit ones the plain
// division, which on a GPU is a subroutine of dozens of instructions.
template <typename I>
struct Divider {
  I divisor;
  explicit Divider(int64_t d = 1) : divisor(I(d > 0 ? d : 1)) {}
  SEGNET_HD I div(I n) const { return n / divisor; }
  SEGNET_HD I mod(I n) const { return n % divisor; }
};

template <>
struct Divider<uint32_t> {
  uint32_t divisor, magic, shift;
  explicit Divider(int64_t d = 1) : divisor(uint32_t(d > 0 ? d : 1)) {
    for (shift = 0; shift < 32 && (uint64_t(1) << shift) < divisor; ++shift) {}
    magic = uint32_t(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - divisor)) / divisor + 1);
  }
  SEGNET_HD uint32_t div(uint32_t n) const { return (mulhi(n, magic) + n) >> shift; }
  SEGNET_HD uint32_t mod(uint32_t n) const { return n - div(n) * divisor; }
};

// Calls body(I{}) with the index type for `numel` elements: uint32_t below 2^31 (unless
// cfg.index64), else int64_t. Grid-stride loops then stay below 2^32 as well.
template <typename F>
void with_index_type(int64_t numel, const LaunchConfig& cfg, F&& body) {
  if (!cfg.index64 && numel < (int64_t(1) << 31)) {
    body(uint32_t{});
  } else {
    body(int64_t{});
  }
}

// Calls body(std::true_type{}) for channels_last, body(std::false_type{}) for NCHW, so a
// launcher names its kernel's layout instance once.
template <typename F>
void with_layout(bool channels_last, F&& body) {
  if (channels_last) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

// Splits a dense memory-order index of an [N, C, H, W] tensor into (n, c, h, w).
template <typename I, bool CHANNELS_LAST>
struct Unravel {
  Divider<I> d0, d1, d2;  // the three fastest dimensions' sizes, fastest first
  Unravel(int64_t C, int64_t H, int64_t W)
      : d0(CHANNELS_LAST ? C : W), d1(CHANNELS_LAST ? W : H), d2(CHANNELS_LAST ? H : C) {}
  SEGNET_HD void operator()(I t, I& n, I& c, I& h, I& w) const {
    const I q0 = d0.div(t), q1 = d1.div(q0), q2 = d2.div(q1);
    const I i0 = t - q0 * d0.divisor, i1 = q0 - q1 * d1.divisor, i2 = q1 - q2 * d2.divisor;
    n = q2;
    c = CHANNELS_LAST ? i0 : i2;
    h = CHANNELS_LAST ? i2 : i1;
    w = CHANNELS_LAST ? i1 : i0;
  }
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
