// Implicit-GEMM 3x3 convolution (stride 1, padding 1) on tensor cores, with the folded-BN
// epilogue fused: y[n, h, w, co] = relu(scale[co] * sum_{tap,ci} x[n, h+dy, w+dx, ci] *
// w[co, tap, ci] + shift[co]), channels_last (NHWC) in and out. Raw pointers only; also
// built by the emulator (tests/cuda_emu/, which has WMMA and cp.async).
//
// GEMM view: [pixels M = N*H*W] x [K = 9*Cin] times [K] x [Cout], K ordered (tap, channel):
// for one tap a pixel's K slice is a run of consecutive channels in memory, so the operand
// tiles arrive as 16-byte vectors (Cin a multiple of 8 channels in 16-bit types, 4 in
// float; the launcher's caller checks). A block of 4 warps computes 128 pixels x 64 output
// channels; each warp 32 x 64 as 2 x 4 WMMA accumulators (16x16, float): 16x16x16 bf16 or
// fp16 fragments, or 16x16x8 TF32 ones for float inputs (rounded by __float_to_tf32, as
// cuDNN does when torch.backends.cudnn.allow_tf32 lets it). K advances 64 bytes of channels
// a step (32 in 16-bit types, 16 in float) through a 3-stage cp.async pipeline in shared
// memory: the step two ahead is in flight while one is multiplied. Outside the image and
// past Cin or Cout, cp.async fills zeros. The epilogue stages the accumulators in shared
// memory (reusing the pipeline's, beside the tile's scale and shift, fetched once per block),
// then writes each pixel's channels as 16-byte vectors
// (scalar stores where Cout is not a multiple of the vector), scale and shift applied with
// one fused multiply-add, as the CPU kernels do. In the training forward (moments given) the
// epilogue writes z (scale 1, shift the bias) and each tile's per-channel mean and centred sum
// of squares, which a second small kernel combines in tile order into the batch statistics,
// so BN does not read z again. Where the grid would fill less than half of the GPU's first
// wave (SegNet's 45x60 and 23x30 layers), K is split over blockIdx.z: each split writes its
// float sums, and a second kernel adds them in split order (deterministic) and applies the
// epilogue. Traffic: each input vector is fetched once
// per tap and output-channel tile (L2-resident), weights once per pixel tile, y once.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/bn_relu.h"
#include "kernels/launch.cuh"

#ifndef SEGNET_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <mma.h>
#endif

namespace segnet {
namespace kernels {

// The tensor cores' view of an input type: the fragment's element type, the shared-memory
// element type and the fragment depth (K).
template <typename T>
struct TensorCore;
template <>
struct TensorCore<float> {
  using fragment_type = nvcuda::wmma::precision::tf32;
  using shared_type = float;
  static constexpr int kDepth = 8;
};
#ifdef SEGNET_CUDA_EMULATION
template <>
struct TensorCore<c10::Half> {
  using fragment_type = c10::Half;
  using shared_type = c10::Half;
  static constexpr int kDepth = 16;
};
template <>
struct TensorCore<c10::BFloat16> {
  using fragment_type = c10::BFloat16;
  using shared_type = c10::BFloat16;
  static constexpr int kDepth = 16;
};
#else
template <>
struct TensorCore<c10::Half> {
  using fragment_type = __half;
  using shared_type = __half;
  static constexpr int kDepth = 16;
};
template <>
struct TensorCore<c10::BFloat16> {
  using fragment_type = __nv_bfloat16;
  using shared_type = __nv_bfloat16;
  static constexpr int kDepth = 16;
};
#endif

struct Conv3x3Dims {
  int64_t N, Cin, H, W, Cout;
  SEGNET_HD int64_t pixels() const { return N * H * W; }
};

constexpr int kConvTileM = 128, kConvTileN = 64, kConvWarps = 4, kConvThreads = kConvWarps * 32, kConvStages = 3;
static_assert(kConvThreads == 2 * kConvTileN, "the epilogue's threads fetch a scale or a shift each");
constexpr int kConvStepBytes = 64;  // K per step: 64 bytes of channels, 4 vectors of 16 bytes

// A pixel tile's mean and centred sum of squares of one output channel (the training epilogue).
using TileMoments = AlignedVec<double, 2>;
using Float4 = AlignedVec<float, 4>;

// Whether the kernel takes these tensors: element type, channel counts in whole vectors.
template <typename T>
bool conv3x3_supports(int64_t Cin) {
  return Cin > 0 && (Cin * int64_t(sizeof(T))) % 16 == 0;
}

template <typename T>
struct ConvTiles {
  using S = typename TensorCore<T>::shared_type;
  static constexpr int kVec = 16 / sizeof(T);                     // elements per 16-byte vector
  static constexpr int kStepK = kConvStepBytes / sizeof(T);       // K per pipeline step
  static constexpr int kLd = kStepK + kVec;                       // a tile row: 80 bytes, conflict-free
  static constexpr int kLdC = kConvTileN + 4;                     // the accumulators' rows (floats)
  static constexpr int kStageA = kConvTileM * kLd, kStageB = kConvTileN * kLd;
  static constexpr int kBytes = kConvStages * (kStageA + kStageB) * int(sizeof(S));
  static_assert((kConvTileM * kLdC + 2 * kConvTileN) * 4 + kConvThreads * 8 <= kBytes,
                "the epilogue reuses the pipeline's shared memory");
  static_assert(kBytes <= 48 * 1024, "static shared memory");
};

inline dim3 conv3x3_grid(const Conv3x3Dims& d) {
  return dim3(static_cast<unsigned>((d.pixels() + kConvTileM - 1) / kConvTileM),
              static_cast<unsigned>((d.Cout + kConvTileN - 1) / kConvTileN));
}

template <typename T>
__global__ void __launch_bounds__(kConvThreads)
    conv3x3_scale_shift_relu_kernel(const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ scale,
                                    const float* __restrict__ shift, bool relu, T* __restrict__ y, Conv3x3Dims d,
                                    TileMoments* __restrict__ moments, float* __restrict__ split_sums, int split_steps) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using Tiles = ConvTiles<T>;
  using S = typename Tiles::S;
  using F = typename TensorCore<T>::fragment_type;
  constexpr int kDepth = TensorCore<T>::kDepth, kVec = Tiles::kVec, kStepK = Tiles::kStepK, kLd = Tiles::kLd;
  alignas(128) __shared__ unsigned char smem[Tiles::kBytes];
  S* const a_tiles = reinterpret_cast<S*>(smem);
  S* const b_tiles = a_tiles + kConvStages * Tiles::kStageA;

  const int t = threadIdx.x, warp = t / 32;
  const int64_t P = d.pixels(), m0 = int64_t(blockIdx.x) * kConvTileM;
  const int n0 = int(blockIdx.y) * kConvTileN, Cin = int(d.Cin), Cout = int(d.Cout), H = int(d.H), W = int(d.W);
  const int chunks = (Cin + kStepK - 1) / kStepK;
  // this block's K steps: all of them, or, split K (blockIdx.z), split_steps of them
  const int first = int(blockIdx.z) * split_steps, steps = 9 * chunks - first < split_steps ? 9 * chunks - first : split_steps;
  const int vec = t % 4;  // the 16-byte vector of a tile row this thread copies

  // This thread's rows of the pixel tile (4) and of the weight tile (2), fixed for the
  // whole K loop: a pixel's offset in x and its position, a weight row's offset in w.
  int64_t pixel_at[4];
  int oh[4], ow[4];
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + t / 4 + 32 * i;
    const int64_t n = m / (int64_t(H) * W), hw = m - n * H * W;
    oh[i] = m < P ? int(hw / W) : -(1 << 20);  // a pixel past the end is outside every tap
    ow[i] = int(hw % W);
    pixel_at[i] = m * Cin;
  }

  auto issue = [&](int step, int stage) {
    const int tap = step / chunks, ci = (step - tap * chunks) * kStepK + vec * kVec;
    const int dy = tap / 3 - 1, dx = tap % 3 - 1;
    S* const a = a_tiles + stage * Tiles::kStageA;
    S* const b = b_tiles + stage * Tiles::kStageB;
    for (int i = 0; i < 4; ++i) {
      const int ih = oh[i] + dy, iw = ow[i] + dx;
      const bool in = ci < Cin && ih >= 0 && ih < H && iw >= 0 && iw < W;
      const T* src = in ? x + pixel_at[i] + (int64_t(dy) * W + dx) * Cin + ci : x;
      SEGNET_CP_ASYNC(a + (t / 4 + 32 * i) * kLd + vec * kVec, src, 16, in ? 0 : 16);
    }
    for (int j = 0; j < 2; ++j) {
      const int co = n0 + t / 4 + 32 * j;
      const bool in = ci < Cin && co < Cout;
      const T* src = in ? w + (int64_t(co) * 9 + tap) * Cin + ci : w;
      SEGNET_CP_ASYNC(b + (t / 4 + 32 * j) * kLd + vec * kVec, src, 16, in ? 0 : 16);
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, kDepth, float> acc[2][4];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int s = 0; s < kConvStages - 1; ++s) {
    if (s < steps) issue(first + s, s);
    __pipeline_commit();
  }
  for (int s = 0; s < steps; ++s) {
    __pipeline_wait_prior(kConvStages - 2);  // step s has arrived (this thread's copies)
    __syncthreads();                         // ... everyone's; and step s - 1's stage is free
    if (s + kConvStages - 1 < steps) issue(first + s + kConvStages - 1, (s + kConvStages - 1) % kConvStages);
    __pipeline_commit();
    const S* const a = a_tiles + (s % kConvStages) * Tiles::kStageA + warp * 32 * kLd;
    const S* const b = b_tiles + (s % kConvStages) * Tiles::kStageB;
    for (int k = 0; k < kStepK; k += kDepth) {
      wmma::fragment<wmma::matrix_a, 16, 16, kDepth, F, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, kDepth, F, wmma::col_major> fb[4];
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(fa[i], a + i * 16 * kLd + k, kLd);
        if constexpr (std::is_same_v<T, float>)
          for (int e = 0; e < fa[i].num_elements; ++e) fa[i].x[e] = wmma::__float_to_tf32(fa[i].x[e]);
      }
      for (int j = 0; j < 4; ++j) {
        wmma::load_matrix_sync(fb[j], b + j * 16 * kLd + k, kLd);
        if constexpr (std::is_same_v<T, float>)
          for (int e = 0; e < fb[j].num_elements; ++e) fb[j].x[e] = wmma::__float_to_tf32(fb[j].x[e]);
      }
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 4; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  __pipeline_wait_prior(0);
  __syncthreads();  // every warp is done with the pipeline's shared memory

  float* const c = reinterpret_cast<float*>(smem);
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j)
      wmma::store_matrix_sync(c + (warp * 32 + i * 16) * Tiles::kLdC + j * 16, acc[i][j], Tiles::kLdC,
                              wmma::mem_row_major);
  if (split_sums != nullptr) {  // split K: this split's sums, for conv3x3_split_k_epilogue
    __syncthreads();
    float* const out = split_sums + int64_t(blockIdx.z) * P * Cout;
    constexpr int kGroups = kConvTileN / 4, kRowsPerPass = kConvThreads / kGroups;
    const int g = t % kGroups, co0 = n0 + g * 4;
    const bool whole = Cout % 4 == 0 && co0 + 4 <= Cout;
    for (int r = t / kGroups; r < kConvTileM && m0 + r < P; r += kRowsPerPass) {
      Float4 v;
      for (int e = 0; e < 4; ++e) v.v[e] = c[r * Tiles::kLdC + g * 4 + e];
      float* const dst = out + (m0 + r) * Cout + co0;
      if (whole) {
        SEGNET_STORE(reinterpret_cast<Float4*>(dst), v);
      } else {
        for (int e = 0; e < 4; ++e) SEGNET_STORE_IF(co0 + e < Cout, dst + e, v.v[e]);
      }
    }
    return;
  }
  // the tile's scale and shift, fetched once per block (coalesced) into shared memory
  float* const params = c + kConvTileM * Tiles::kLdC;
  {
    const int co = n0 + t % kConvTileN;
    params[t] = SEGNET_LOAD_IF(co < Cout, (t < kConvTileN ? scale : shift) + co, 0.0f);
  }
  __syncthreads();

  // The epilogue: thread t takes kVec consecutive channels of a pixel, the block's threads
  // consecutive vectors of consecutive pixels (coalesced: a pixel's channels are contiguous).
  constexpr int kGroups = kConvTileN / kVec, kRowsPerPass = kConvThreads / kGroups;
  const int g = t % kGroups, co0 = n0 + g * kVec;
  const bool whole = Cout % kVec == 0 && co0 + kVec <= Cout;
  float sc[kVec], sh[kVec];
  for (int e = 0; e < kVec; ++e) {
    sc[e] = params[g * kVec + e];
    sh[e] = params[kConvTileN + g * kVec + e];
  }
  for (int r = t / kGroups; r < kConvTileM; r += kRowsPerPass) {
    const int64_t m = m0 + r;
    if (m >= P) break;
    using Vec = AlignedVec<T, kVec>;
    Vec out;
    for (int e = 0; e < kVec; ++e)
      out.v[e] = static_cast<T>(affine_relu(c[r * Tiles::kLdC + g * kVec + e], sc[e], sh[e], relu));
    T* const dst = y + int64_t(m) * Cout + co0;
    if (whole) {
      SEGNET_STORE(reinterpret_cast<Vec*>(dst), out);
    } else {
      for (int e = 0; e < kVec; ++e) SEGNET_STORE_IF(co0 + e < Cout, dst + e, out.v[e]);
    }
  }

  // The training epilogue: this tile's mean and centred sum of squares per output channel, of
  // the values as written (rounded to T), in double; two threads a channel, half the rows each.
  if (moments != nullptr) {
    double* const scratch = reinterpret_cast<double*>(params + 2 * kConvTileN);
    const int j = t % kConvTileN, half = t / kConvTileN, rows = int(P - m0 < kConvTileM ? P - m0 : kConvTileM);
    const int r0 = half * (kConvTileM / 2), r1 = rows < r0 + kConvTileM / 2 ? rows : r0 + kConvTileM / 2;
    auto value = [&](int r) {
      return double(static_cast<float>(
          static_cast<T>(affine(c[r * Tiles::kLdC + j], params[j], params[kConvTileN + j]))));
    };
    double sum = 0;
    for (int r = r0; r < r1; ++r) sum += value(r);
    scratch[t] = sum;
    __syncthreads();
    const double mean = (scratch[j] + scratch[kConvTileN + j]) / rows;
    __syncthreads();
    double m2 = 0;
    for (int r = r0; r < r1; ++r) {
      const double dv = value(r) - mean;
      m2 += dv * dv;
    }
    scratch[t] = m2;
    __syncthreads();
    if (half == 0 && n0 + j < Cout)
      SEGNET_STORE(moments + int64_t(blockIdx.x) * Cout + n0 + j, (TileMoments{{mean, scratch[j] + scratch[kConvTileN + j]}}));
  }
#endif
}

// The batch statistics from the tiles' moments: one thread per channel combines them in tile
// order (deterministic), each tile holding min(128, pixels left) values.
template <typename A>
__global__ void __launch_bounds__(kConvThreads)
    conv3x3_stats_finish(const TileMoments* __restrict__ moments, int64_t pixels, int tiles, int C, A* __restrict__ mean,
                         A* __restrict__ var) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  Moments total;
  for (int i = 0; i < tiles; ++i) {
    const TileMoments m = SEGNET_LOAD(moments + int64_t(i) * C + c);
    const int64_t left = pixels - int64_t(i) * kConvTileM;
    Moments tile;
    tile.n = double(left < kConvTileM ? left : kConvTileM), tile.mean = m.v[0], tile.m2 = m.v[1];
    total.combine(tile);
  }
  SEGNET_STORE(mean + c, static_cast<A>(total.mean));
  SEGNET_STORE(var + c, static_cast<A>(total.var()));
}

// Split K's second pass: y = relu(scale * (the splits' sums, added in split order) + shift),
// 4 channels of a pixel a thread (16-byte loads and 8-byte 16-bit or 16-byte float stores
// where Cout is a multiple of 4).
// Index math in 32 bits (a split grid is under half a wave of 128x64 tiles: far below 2^31
// groups), the pixel by fast division.
template <typename T>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    conv3x3_split_k_epilogue(const float* __restrict__ split_sums, int splits, uint32_t P, int Cout,
                             Divider<uint32_t> groups, const float* __restrict__ scale,
                             const float* __restrict__ shift, bool relu, T* __restrict__ y) {
  const uint32_t total = P * groups.divisor;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    const uint32_t m = groups.div(i);
    const int co0 = int(i - m * groups.divisor) * 4;
    const bool whole = Cout % 4 == 0;
    float acc[4] = {0, 0, 0, 0};
    for (int k = 0; k < splits; ++k) {
      const float* const src = split_sums + (int64_t(k) * P + m) * Cout + co0;  // below 2^31 floats a split
      if (whole) {
        const Float4 v = SEGNET_LOAD(reinterpret_cast<const Float4*>(src));
        for (int e = 0; e < 4; ++e) acc[e] += v.v[e];
      } else {
        for (int e = 0; e < 4; ++e) acc[e] += SEGNET_LOAD_IF(co0 + e < Cout, src + e, 0.0f);
      }
    }
    using Vec = AlignedVec<T, 4>;
    Vec out;
    for (int e = 0; e < 4; ++e) {
      const int co = co0 + e < Cout ? co0 + e : Cout - 1;
      out.v[e] = static_cast<T>(affine_relu(acc[e], SEGNET_LOAD(scale + co), SEGNET_LOAD(shift + co), relu));
    }
    T* const dst = y + int64_t(m) * Cout + co0;
    if (whole) {
      SEGNET_STORE(reinterpret_cast<Vec*>(dst), out);
    } else {
      for (int e = 0; e < 4; ++e) SEGNET_STORE_IF(co0 + e < Cout, dst + e, out.v[e]);
    }
  }
}

// How many ways to split K so that a grid of less than half a wave (4 blocks on each of the
// device's `sms`) fills about one: 1 (no split) for grids of half a wave or more.
inline int conv3x3_splits(const Conv3x3Dims& d, int sms, int steps) {
  const int64_t blocks = int64_t(conv3x3_grid(d).x) * conv3x3_grid(d).y, wave = 4 * int64_t(sms);
  if (2 * blocks >= wave || d.pixels() * d.Cout >= (int64_t(1) << 31)) return 1;  // the split epilogue's 32 bits
  return int(std::min<int64_t>({(wave + blocks - 1) / blocks, 16, std::max(1, steps / 4)}));
}

// x: [N, H, W, Cin] (channels_last memory), w: [Cout, 3, 3, Cin] contiguous (channels_last
// weights), scale/shift: [Cout] float, y: [N, H, W, Cout]. Needs conv3x3_supports<T>(Cin),
// 16-byte aligned x and w, and, on a GPU, compute capability 8.0 or newer.
// With splits > 1 (conv3x3_splits), K is split that many ways through `split_sums`, a
// buffer of splits * N*H*W * Cout floats, and a second kernel adds the splits.
inline int conv3x3_steps(const Conv3x3Dims& d, int element_size) {
  const int step = kConvStepBytes / element_size;
  return 9 * int((d.Cin + step - 1) / step);
}

template <typename T>
void launch_conv3x3_scale_shift_relu(const T* x, const T* w, const float* scale, const float* shift, bool relu, T* y,
                                     Conv3x3Dims d, cudaStream_t stream, int splits = 1, float* split_sums = nullptr) {
  if (d.pixels() == 0 || d.Cout == 0) return;
  auto kernel = conv3x3_scale_shift_relu_kernel<T>;
  const int steps = conv3x3_steps(d, sizeof(T));
  if (splits <= 1) {
    SEGNET_LAUNCH(kernel, conv3x3_grid(d), kConvThreads, stream, x, w, scale, shift, relu, y, d, nullptr, nullptr,
                  steps);
    return;
  }
  const int split_steps = (steps + splits - 1) / splits;
  splits = (steps + split_steps - 1) / split_steps;  // none empty
  dim3 grid = conv3x3_grid(d);
  grid.z = splits;
  SEGNET_LAUNCH(kernel, grid, kConvThreads, stream, x, w, scale, shift, relu, y, d, nullptr, split_sums, split_steps);
  auto epilogue = conv3x3_split_k_epilogue<T>;
  const int64_t groups = (d.Cout + 3) / 4, work = d.pixels() * groups;
  SEGNET_LAUNCH(epilogue, unsigned(std::min<int64_t>((work + 255) / 256, 8192)), 256, stream, split_sums, splits,
                uint32_t(d.pixels()), int(d.Cout), Divider<uint32_t>(groups), scale, shift, relu, y);
}

// The training forward: z = conv(x, w) + bias (ones and the bias, or zeros, as scale and
// shift), and z's per-channel mean and biased variance (A: float), through `moments`, a
// buffer of conv3x3_moments(d) TileMoments.
inline int64_t conv3x3_moments(const Conv3x3Dims& d) { return (d.pixels() + kConvTileM - 1) / kConvTileM * d.Cout; }

template <typename T>
void launch_conv3x3_bn_stats(const T* x, const T* w, const float* ones, const float* bias, T* z, Conv3x3Dims d,
                             TileMoments* moments, float* mean, float* var, cudaStream_t stream) {
  if (d.pixels() == 0 || d.Cout == 0) return;
  auto kernel = conv3x3_scale_shift_relu_kernel<T>;
  SEGNET_LAUNCH(kernel, conv3x3_grid(d), kConvThreads, stream, x, w, ones, bias, false, z, d, moments, nullptr,
                conv3x3_steps(d, sizeof(T)));
  auto finish = conv3x3_stats_finish<float>;
  const int tiles = int((d.pixels() + kConvTileM - 1) / kConvTileM), C = int(d.Cout);
  SEGNET_LAUNCH(finish, (C + kConvThreads - 1) / kConvThreads, kConvThreads, stream, moments, d.pixels(), tiles, C,
                mean, var);
}

}  // namespace kernels
}  // namespace segnet
