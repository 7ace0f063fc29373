// Winograd F(2x2, 3x3) convolution with the inference epilogue, on the CPU:
//   y = relu?(conv2d(x, weight, stride 1, padding 1) * scale[co] + shift[co]).
//
// Lavin & Gray (2016): a 2x2 output tile is A^T [(G g G^T) . (B^T d B)] A over its 4x4
// input patch d, so a tile costs 16 multiplies per (input, output) channel pair instead of
// the 36 of a direct convolution. The 16 products become 16 GEMMs, run by ATen's CPU GEMM
// (MKL or oneDNN): no hand-written GEMM. The weights are transformed once per call (U,
// [16, Cout, Cin] or [16, Cin, Cout], in double then rounded once).
//
// Work: blocks of 64-512 tiles along one tile row (about 1.5 MiB of V and M), in parallel
// over (image, tile row, block). A thread transforms its block's input into V, multiplies V
// by U into M and transforms M back with scale, shift and ReLU fused, so V and M stay in
// its caches and the memory traffic is one read of x (twice for the rows two tile rows
// share) and one write of y. NCHW: V is [16, Cin, tiles] and the loops run over tiles (the
// patch rows split into even and odd columns); channels_last: V is [16, tiles, Cin] and
// they run over channels. The transforms only add and subtract: float32 results stay
// within 8 ulp of the sum of the products' magnitudes, as the direct convolution's do
// (tested).
#include "cpu/winograd3x3.h"

#include <ATen/ATen.h>
#include <ATen/CPUFunctions.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/outputs.h"
#include "cpu/vectorize.h"

namespace segnet {
namespace {

constexpr int64_t kBlockBytes = 1536 * 1024;  // V and M of one block (best of 384 KiB - 3 MiB here)
constexpr int64_t kMinTiles = 64;             // GEMMs narrower than this lose to their packing
constexpr int64_t kMaxTiles = 512;

// ---- leaf loops (vectorised per ISA) -------------------------------------------------------
// B^T applied along one direction: with B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], four
// runs a, b, c, d (a patch's rows or columns) become four.
template <typename T>
SEGNET_LEAF void bt_runs(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ c,
                                 const T* __restrict__ d, int64_t n, T* __restrict__ o0, T* __restrict__ o1,
                                 T* __restrict__ o2, T* __restrict__ o3) {
  for (int64_t i = 0; i < n; ++i) {
    o0[i] = a[i] - c[i];
    o1[i] = b[i] + c[i];
    o2[i] = c[i] - b[i];
    o3[i] = b[i] - d[i];
  }
}

// A^T applied along one direction: A^T = [1 1 1 0; 0 1 -1 -1].
template <typename T>
SEGNET_LEAF void at_runs(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ c,
                                 const T* __restrict__ d, int64_t n, T* __restrict__ o0, T* __restrict__ o1) {
  for (int64_t i = 0; i < n; ++i) {
    o0[i] = a[i] + b[i] + c[i];
    o1[i] = b[i] - c[i] - d[i];
  }
}

template <typename T>
SEGNET_LEAF void deinterleave(const T* __restrict__ src, int64_t n, T* __restrict__ even,
                                      T* __restrict__ odd) {
  for (int64_t i = 0; i < n; ++i) {
    even[i] = src[2 * i];
    odd[i] = src[2 * i + 1];
  }
}

template <typename T>
inline T epilogue(T v, T scale, T shift, bool relu) {
  const T y = v * scale + shift;
  return relu ? std::max(y, T(0)) : y;
}

// NCHW output: the even and odd columns of one output row, through the epilogue.
template <typename T>
SEGNET_LEAF void epilogue_interleave(const T* __restrict__ even, const T* __restrict__ odd, int64_t n,
                                             T scale, T shift, bool relu, T* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) {
    out[2 * i] = epilogue(even[i], scale, shift, relu);
    out[2 * i + 1] = epilogue(odd[i], scale, shift, relu);
  }
}

// channels_last output: one pixel's channels, through the epilogue.
template <typename T>
SEGNET_LEAF void epilogue_channels(const T* __restrict__ v, int64_t n, const T* __restrict__ scale,
                                           const T* __restrict__ shift, bool relu, T* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) out[i] = epilogue(v[i], scale[i], shift[i], relu);
}

// ---- one block of tiles -----------------------------------------------------------------------
// Tile t of the block covers output rows 2 ty, 2 ty + 1 and columns 2 (tx0 + t) + {0, 1}; its
// input patch starts one row and one column earlier (padding 1, zeros outside x).

// NCHW: per input channel, the 4 patch rows are split into even and odd columns, so patch
// column j of tile t is E[t], O[t], E[t + 1], O[t + 1] for j = 0..3: every loop is unit-stride.
template <typename T>
SEGNET_LEAF void block_nchw(const T* x, int64_t C, int64_t H, int64_t W, int64_t ty, int64_t tx0, int64_t nt,
                            const at::Tensor& U, const T* scale, const T* shift, bool relu, int64_t Cout, T* y,
                            std::vector<T>& buf) {
  const int64_t row_len = 2 * nt + 2, half = nt + 1, c0 = 2 * tx0 - 1, r0 = 2 * ty - 1;
  buf.resize(16 * (C + Cout) * nt + 16 * half + 2 * row_len);
  T* v = buf.data();
  T* m = v + 16 * C * nt;
  T* eo = m + 16 * Cout * nt;  // [4 rows][even, odd][half]; then the same for their B^T rows
  T* out = eo + 16 * half;   // two output rows of 2 nt, for blocks at the right edge
  const auto E = [&](int set, int i) { return eo + (8 * set + 2 * i) * half; };
  const auto O = [&](int set, int i) { return eo + (8 * set + 2 * i + 1) * half; };
  // Patch column c0 + 2 k is E[k], c0 + 2 k + 1 is O[k]: read straight from x for the k whose
  // two columns lie inside it, zeros or one column for the rest.
  const int64_t k0 = c0 < 0 ? 1 : 0, k1 = std::max(k0, std::min(half, (W - c0) / 2));
  for (int64_t ci = 0; ci < C; ++ci) {
    for (int i = 0; i < 4; ++i) {
      const int64_t r = r0 + i;
      T *e = E(0, i), *o = O(0, i);
      if (r < 0 || r >= H) {
        std::fill(e, e + half, T(0));
        std::fill(o, o + half, T(0));
        continue;
      }
      const T* xr = x + (ci * H + r) * W;
      const auto at_edge = [&](int64_t k) {
        const int64_t c = c0 + 2 * k;
        e[k] = c >= 0 && c < W ? xr[c] : T(0);
        o[k] = c + 1 >= 0 && c + 1 < W ? xr[c + 1] : T(0);
      };
      for (int64_t k = 0; k < k0; ++k) at_edge(k);
      deinterleave(xr + c0 + 2 * k0, k1 - k0, e + k0, o + k0);
      for (int64_t k = k1; k < half; ++k) at_edge(k);
    }
    bt_runs(E(0, 0), E(0, 1), E(0, 2), E(0, 3), half, E(1, 0), E(1, 1), E(1, 2), E(1, 3));
    bt_runs(O(0, 0), O(0, 1), O(0, 2), O(0, 3), half, O(1, 0), O(1, 1), O(1, 2), O(1, 3));
    T* vc = v + ci * nt;  // V[k][ci][t], k = 4 i + j
    const int64_t k = C * nt;
    for (int i = 0; i < 4; ++i)
      bt_runs(E(1, i), O(1, i), E(1, i) + 1, O(1, i) + 1, nt, vc + (4 * i) * k, vc + (4 * i + 1) * k,
              vc + (4 * i + 2) * k, vc + (4 * i + 3) * k);
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto V = at::from_blob(v, {16, C, nt}, opts);
  auto M = at::from_blob(m, {16, Cout, nt}, opts);
  at::cpu::bmm_out(M, U, V);  // M[k] = U[k] (Cout x Cin) @ V[k] (Cin x nt)
  const int64_t w0 = 2 * tx0, width = std::min(W, 2 * (tx0 + nt)) - w0;
  T* s = eo;  // [2 rows][4 columns][nt], then [2 rows][even, odd][nt]
  for (int64_t co = 0; co < Cout; ++co) {
    const T* mc = m + co * nt;
    const int64_t k = Cout * nt;
    for (int j = 0; j < 4; ++j) at_runs(mc + j * k, mc + (4 + j) * k, mc + (8 + j) * k, mc + (12 + j) * k, nt,
                                        s + j * nt, s + (4 + j) * nt);
    for (int i = 0; i < 2 && 2 * ty + i < H; ++i) {
      T* yrow = y + (co * H + 2 * ty + i) * W + w0;
      T* even = s + (8 + 2 * i) * nt;
      T* odd = even + nt;
      const T* si = s + 4 * i * nt;
      at_runs(si, si + nt, si + 2 * nt, si + 3 * nt, nt, even, odd);
      if (width == 2 * nt) {
        epilogue_interleave(even, odd, nt, scale[co], shift[co], relu, yrow);
      } else {
        epilogue_interleave(even, odd, nt, scale[co], shift[co], relu, out);
        std::copy(out, out + width, yrow);
      }
    }
  }
}

// channels_last: the runs are a pixel's channels.
template <typename T>
SEGNET_LEAF void block_nhwc(const T* x, int64_t C, int64_t H, int64_t W, int64_t ty, int64_t tx0, int64_t nt,
                            const at::Tensor& U, const T* scale, const T* shift, bool relu, int64_t Cout, T* y,
                            std::vector<T>& buf) {
  const int64_t Cm = std::max(C, Cout);
  buf.resize(16 * (C + Cout) * nt + C + 16 * Cm);
  T* v = buf.data();
  T* m = v + 16 * C * nt;
  T* zeros = m + 16 * Cout * nt;
  T* r = zeros + C;  // 16 runs of up to Cm
  std::fill(zeros, zeros + C, T(0));
  for (int64_t t = 0; t < nt; ++t) {
    const T* d[16];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const int64_t row = 2 * ty - 1 + i, col = 2 * (tx0 + t) - 1 + j;
        d[4 * i + j] = (row >= 0 && row < H && col >= 0 && col < W) ? x + (row * W + col) * C : zeros;
      }
    for (int j = 0; j < 4; ++j)  // columns of the patch: r[4 i + j] = (B^T d)[i][j]
      bt_runs(d[j], d[4 + j], d[8 + j], d[12 + j], C, r + j * Cm, r + (4 + j) * Cm, r + (8 + j) * Cm,
              r + (12 + j) * Cm);
    T* vt = v + t * C;  // V[k][t][ci]
    const int64_t k = nt * C;
    for (int i = 0; i < 4; ++i)
      bt_runs(r + 4 * i * Cm, r + (4 * i + 1) * Cm, r + (4 * i + 2) * Cm, r + (4 * i + 3) * Cm, C, vt + 4 * i * k,
              vt + (4 * i + 1) * k, vt + (4 * i + 2) * k, vt + (4 * i + 3) * k);
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto V = at::from_blob(v, {16, nt, C}, opts);
  auto M = at::from_blob(m, {16, nt, Cout}, opts);
  at::cpu::bmm_out(M, V, U);  // M[k] = V[k] (nt x Cin) @ U[k] (Cin x Cout)
  for (int64_t t = 0; t < nt; ++t) {
    const T* mt = m + t * Cout;
    const int64_t k = nt * Cout;
    for (int j = 0; j < 4; ++j)  // r[4 i + j] = (A^T m)[i][j], i = 0, 1
      at_runs(mt + j * k, mt + (4 + j) * k, mt + (8 + j) * k, mt + (12 + j) * k, Cout, r + j * Cm, r + (4 + j) * Cm);
    for (int i = 0; i < 2 && 2 * ty + i < H; ++i) {
      T* out = r + (8 + 2 * i) * Cm;
      at_runs(r + 4 * i * Cm, r + (4 * i + 1) * Cm, r + (4 * i + 2) * Cm, r + (4 * i + 3) * Cm, Cout, out, out + Cm);
      for (int j = 0; j < 2 && 2 * (tx0 + t) + j < W; ++j)
        epilogue_channels(out + j * Cm, Cout, scale, shift, relu, y + ((2 * ty + i) * W + 2 * (tx0 + t) + j) * Cout);
    }
  }
}

// U = G g G^T for every (co, ci), as [16, Cout, Cin] (NCHW) or [16, Cin, Cout].
at::Tensor transform_weight(const at::Tensor& weight, bool channels_last) {
  const auto G = at::tensor({1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, -0.5, 0.5, 0.0, 0.0, 1.0},
                            at::TensorOptions().dtype(at::kDouble)).view({4, 3});
  const auto U = at::matmul(at::matmul(G, weight.to(at::kDouble)), G.t());  // [Cout, Cin, 4, 4]
  const int64_t Cout = weight.size(0), Cin = weight.size(1);
  const auto K = channels_last ? U.permute({2, 3, 1, 0}).reshape({16, Cin, Cout})
                               : U.permute({2, 3, 0, 1}).reshape({16, Cout, Cin});
  return K.to(weight.scalar_type()).contiguous();
}

}  // namespace

bool winograd3x3_applies(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const auto is = [](at::IntArrayRef a, int64_t v) { return a.size() == 2 && a[0] == v && a[1] == v; };
  return x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
         x.dim() == 4 && weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3 && groups == 1 &&
         is(stride, 1) && is(padding, 1) && is(dilation, 1);
}

at::Tensor winograd3x3_scale_shift_relu(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scale_in,
                                        const at::Tensor& shift_in, bool relu) {
  const bool channels_last = x_in.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto x = x_in.contiguous(format);
  const auto scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Cout = weight.size(0);
  auto y = empty_output({N, Cout, H, W}, x.options().memory_format(format));
  if (y.numel() == 0) return y;
  const auto U = transform_weight(weight, channels_last);
  const int64_t Ht = (H + 1) / 2, Wt = (W + 1) / 2;
  const int64_t max_tiles = std::clamp<int64_t>(kBlockBytes / (16 * (C + Cout) * x.element_size()), kMinTiles, kMaxTiles);
  const int64_t blocks = (Wt + max_tiles - 1) / max_tiles, tiles = (Wt + blocks - 1) / blocks;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd3x3_scale_shift_relu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const scalar_t *sp = scale.const_data_ptr<scalar_t>(), *tp = shift.const_data_ptr<scalar_t>();
    at::parallel_for(0, N * Ht * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> buf;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / (Ht * blocks), ty = item / blocks % Ht, tx0 = item % blocks * tiles;
        const int64_t nt = std::min(tiles, Wt - tx0);
        if (nt <= 0) continue;
        // a block's transforms, with their leaf loops, built per ISA level (vectorize.h)
        if (channels_last)
          SEGNET_VECTORIZED(block_nhwc(xp + n * C * H * W, C, H, W, ty, tx0, nt, U, sp, tp, relu, Cout,
                                       yp + n * Cout * H * W, buf));
        else
          SEGNET_VECTORIZED(block_nchw(xp + n * C * H * W, C, H, W, ty, tx0, nt, U, sp, tp, relu, Cout,
                                       yp + n * Cout * H * W, buf));
      }
    });
  });
  return y;
}

}  // namespace segnet
