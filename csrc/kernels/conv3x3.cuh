// Implicit-GEMM 3x3 convolution (stride 1, padding 1) with the scale/shift/ReLU epilogue
// fused: y[n, co, h, w] = relu(scale[co] * sum_{ci,ky,kx} x[n, ci, h+ky-1, w+kx-1] *
// weight[co, ci, ky, kx] + shift[co]). Raw pointers only; also built by the emulator.
//
// GEMM view: [pixels P = N*H*W] x [K = Cin*9] times [K] x [Cout]. A block computes a
// 64-pixel x 64-channel tile with 256 threads, each a 4x4 register tile, stepping through
// K in chunks of 16: the im2col slice of the input (zero outside the image) and the
// weight slice are staged in shared memory (converted to the accumulation type, float for
// half/bfloat16 inputs), then multiplied out of shared memory. Thread t owns pixels
// 4*(t % 16)..+3 and channels 4*(t / 16)..+3, so the 16 threads of a half-warp store 64
// consecutive pixels of one channel (coalesced in NCHW). Traffic per tile: each input
// value is read up to 9 times through the K loop (L2-resident), weights once per tile,
// outputs written once; accumulation stays in registers.
#pragma once

#include "common/bn_relu.h"
#include "kernels/launch.cuh"

namespace segnet {
namespace kernels {

struct Conv3x3Dims {
  int64_t N, Cin, H, W, Cout;
  SEGNET_HD int64_t pixels() const { return N * H * W; }
  SEGNET_HD int64_t K() const { return Cin * 9; }
};

constexpr int kConvTileM = 64, kConvTileN = 64, kConvTileK = 16, kConvThreads = 256;

template <typename T, typename A>
__global__ void __launch_bounds__(kMaxThreadsPerBlock) __launch_bounds__(kConvThreads)
    conv3x3_scale_shift_relu_kernel(const T* __restrict__ x, Strides4 xs, const T* __restrict__ w,
                                    const A* __restrict__ scale, const A* __restrict__ shift, bool relu,
                                    T* __restrict__ y, Strides4 ys, Conv3x3Dims d) {
  __shared__ A a_tile[kConvTileK][kConvTileM + 4];
  __shared__ A b_tile[kConvTileK][kConvTileN + 4];
  const int t = threadIdx.x;
  const int tm = t % 16, tn = t / 16;
  const int64_t P = d.pixels(), K = d.K(), HW = d.H * d.W;
  const int64_t n0 = int64_t(blockIdx.y) * kConvTileN;
  for (int64_t m0 = int64_t(blockIdx.x) * kConvTileM; m0 < P; m0 += int64_t(gridDim.x) * kConvTileM) {
    A acc[4][4] = {};
    for (int64_t k0 = 0; k0 < K; k0 += kConvTileK) {
      for (int e = t; e < kConvTileK * kConvTileM; e += kConvThreads) {
        const int kk = e / kConvTileM, mm = e % kConvTileM;
        const int64_t p = m0 + mm, k = k0 + kk;
        A v = A(0);
        if (p < P && k < K) {
          const int64_t n = p / HW, hw = p - n * HW, oh = hw / d.W, ow = hw - oh * d.W;
          const int64_t ci = k / 9, tap = k - ci * 9;
          const int64_t ih = oh + tap / 3 - 1, iw = ow + tap % 3 - 1;
          if (ih >= 0 && ih < d.H && iw >= 0 && iw < d.W) v = static_cast<A>(x[xs.at(n, ci, ih, iw)]);
        }
        a_tile[kk][mm] = v;
      }
      for (int e = t; e < kConvTileK * kConvTileN; e += kConvThreads) {
        const int kk = e % kConvTileK, nn = e / kConvTileK;  // consecutive threads: consecutive k of one row
        const int64_t co = n0 + nn, k = k0 + kk;
        b_tile[kk][nn] = (co < d.Cout && k < K) ? static_cast<A>(w[co * K + k]) : A(0);
      }
      __syncthreads();
      for (int kk = 0; kk < kConvTileK; ++kk) {
        A a[4], b[4];
        for (int i = 0; i < 4; ++i) a[i] = a_tile[kk][tm * 4 + i];
        for (int j = 0; j < 4; ++j) b[j] = b_tile[kk][tn * 4 + j];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
      }
      __syncthreads();
    }
    for (int j = 0; j < 4; ++j) {
      const int64_t co = n0 + tn * 4 + j;
      if (co >= d.Cout) continue;
      for (int i = 0; i < 4; ++i) {
        const int64_t p = m0 + tm * 4 + i;
        if (p >= P) continue;
        const int64_t n = p / HW, hw = p - n * HW, oh = hw / d.W, ow = hw - oh * d.W;
        y[ys.at(n, co, oh, ow)] = static_cast<T>(affine_relu(acc[i][j], scale[co], shift[co], relu));
      }
    }
  }
}

// x: [N, Cin, H, W] (strides xs), w: [Cout, Cin, 3, 3] contiguous, scale/shift: [Cout],
// y: [N, Cout, H, W] (strides ys). cfg.max_blocks caps the pixel tiles (grid-stride).
template <typename T, typename A>
void launch_conv3x3_scale_shift_relu(const T* x, Strides4 xs, const T* w, const A* scale, const A* shift, bool relu,
                                     T* y, Strides4 ys, Conv3x3Dims d, cudaStream_t stream, LaunchConfig cfg = {}) {
  if (d.pixels() == 0 || d.Cout == 0) return;
  const int64_t tiles_m = (d.pixels() + kConvTileM - 1) / kConvTileM;
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(tiles_m, cfg.max_blocks))),
                  static_cast<unsigned>((d.Cout + kConvTileN - 1) / kConvTileN));
  auto kernel = conv3x3_scale_shift_relu_kernel<T, A>;
  SEGNET_LAUNCH(kernel, grid, kConvThreads, stream, x, xs, w, scale, shift, relu, y, ys, d);
}

}  // namespace kernels
}  // namespace segnet
