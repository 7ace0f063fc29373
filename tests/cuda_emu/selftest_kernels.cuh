// Kernels that test the emulator itself: the shapes of code the real kernels use
// (grid-stride loads, warp shuffles, __shared__ partials, __syncthreads, atomics).
#pragma once

#include <cstdint>

namespace selftest {

// Sum of x into *out: warp shuffles, then per-warp partials in shared memory read by
// warp 0. Without SYNC the barrier between the two is missing: a race.
template <bool SYNC>
__global__ void block_sum(const float* x, int64_t n, float* out) {
  __shared__ float partial[32];
  float s = 0.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    s += x[i];
  for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_down_sync(0xffffffffu, s, offset);
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = s;
  if (SYNC) __syncthreads();
  if (warp == 0) {
    s = lane < (blockDim.x + 31) / 32 ? partial[lane] : 0.f;
    for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_down_sync(0xffffffffu, s, offset);
    if (lane == 0) atomicAdd(out, s);
  }
  if (SYNC) __syncthreads();  // partial is reused by the block that runs next
}

// out[5 * t + i]: shfl_down by 1, shfl_up by 1, shfl_xor 1, shfl from lane 0, all of lane
// id t within segments of `width`; as CUDA defines them.
__global__ void shuffles(int* out, int width) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % 32;
  out[5 * t + 0] = __shfl_down_sync(0xffffffffu, lane, 1, width);
  out[5 * t + 1] = __shfl_up_sync(0xffffffffu, lane, 1, width);
  out[5 * t + 2] = __shfl_xor_sync(0xffffffffu, lane, 1, width);
  out[5 * t + 3] = __shfl_sync(0xffffffffu, lane, 0, width);
  out[5 * t + 4] = __shfl_sync(0xffffffffu, lane, width - 1, width);
}

// Every thread adds 1 to counters[0], ORs its bit into counters[1 + t / 32], and
// takes the max of its global index into counters[1 + nwarps].
__global__ void atomics(int64_t* counters, int nwarps) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  atomicAdd(&counters[0], int64_t(1));
  atomicOr(&counters[1 + t / 32], int64_t(1) << (t % 32));
  atomicMax(&counters[1 + nwarps], t);
}

// Shuffles from a lane past the end of a partial warp: an error in the emulator.
__global__ void shuffle_past_partial_warp(float* out) {
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.f, 16);
}

// Lanes below `returning` return; the rest shuffle (each reads its own lane) and
// __syncwarp with `mask`: the emulator accepts only the mask of the lanes present.
__global__ void warp_sync_with_mask(float* out, unsigned mask, int returning) {
  if (int(threadIdx.x) < returning) return;
  out[threadIdx.x] = __shfl_xor_sync(mask, float(threadIdx.x), 0);
  __syncwarp(mask);
}

// A grid-stride copy with the classic off-by-one bound (i <= n): the last thread reads and
// writes one element past both buffers. Only the sanitizer job calls it, to show that such
// a kernel is caught; it is never part of the shipped library.
__global__ void copy_off_by_one(const float* x, int64_t n, float* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i <= n;
       i += int64_t(gridDim.x) * blockDim.x)
    y[i] = x[i];
}

// y[i] = x[i * stride] through the counted accessors (a stride of 1 is a coalesced copy);
// lanes whose i is odd skip the load when `odd_lanes_skip` (a predicated load).
__global__ void strided_copy(const float* x, int64_t n, int stride, bool odd_lanes_skip, float* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    SEGNET_STORE(y + i, SEGNET_LOAD_IF(!(odd_lanes_skip && i % 2), x + i * stride, 0.f));
}

// out[block * blockDim.x + t] = what the block finds in shared memory before writing it:
// poison (NaN) in every block, never the previous block's 1.
__global__ void read_shared_first(float* out) {
  __shared__ float s[1024];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x];
  __syncthreads();
  s[threadIdx.x] = 1.f;
}

// out[4t..4t+3] = what thread t finds in shared memory at the 16 bytes thread (t + 32) %
// blockDim.x copied there from x with cp.async (odd threads zero-filling their last 8 bytes),
// after waiting for its copies when `wait`, and a __syncthreads when `sync`.
__global__ void cp_async_exchange(const float* x, bool wait, bool sync, float* out) {
  alignas(16) __shared__ float s[4 * 256];
  const int t = threadIdx.x;
  SEGNET_CP_ASYNC(s + 4 * t, x + 4 * t, 16, t % 2 ? 8 : 0);
  __pipeline_commit();
  if (wait) __pipeline_wait_prior(0);
  if (sync) __syncthreads();
  const int from = (t + 32) % int(blockDim.x);
  for (int e = 0; e < 4; ++e) out[4 * t + e] = s[4 * from + e];
}

}  // namespace selftest
