// Batch-norm + ReLU: the element rules and moment arithmetic every backend shares.
//
// Training BN+ReLU is four ops (see csrc/ops.cpp), so that statistics can be all-reduced
// between them under data parallelism:
//   bn_stats:                 mean[c], var[c] (biased) over N, H, W
//   scale_shift_relu:         y = relu(x * scale[c] + shift[c] (+ residual)); scale = gamma / sqrt(var + eps),
//                             shift = beta - mean * scale (per-channel, computed by the caller);
//                             the residual (a tensor like x) is ResNet's identity added before the ReLU
//   bn_relu_backward_reduce:  sum_g[c] = sum g, sum_gc[c] = sum g * (x - mean[c]), where
//                             g = grad_y where the ReLU passed (x * scale + shift > 0), else 0
//   bn_relu_backward_apply:   grad_x = k1[c] * g + k2[c] * (x - mean[c]) + k3[c]
// The ReLU test in the backward is the forward's own expression, so the mask is the one
// the forward applied; and the forward output can be recomputed bit-identically from
// (x, scale, shift) by scale_shift_relu, which is what lets a block drop its output.
#pragma once

#include <cmath>
#include <cstdint>

#ifndef SEGNET_HD
#if defined(__CUDACC__)
#define SEGNET_HD __host__ __device__ __forceinline__
#else
#define SEGNET_HD inline
#endif
#endif

namespace segnet {

// a * b + c rounded once, written out: left to the compilers, nvcc contracts x * scale + shift
// into an FFMA, the CPU build contracts it only where its ISA level has FMA, and the rounding
// (so a ReLU mask at u = 0, and a recomputed output) would differ between them. With it, CPU
// (any ISA level: an instruction, or libm's fma at the baseline) and CUDA agree bit for bit.
template <typename A>
SEGNET_HD A fused_multiply_add(A a, A b, A c) {
#ifdef __CUDA_ARCH__
  return ::fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

template <typename A>
SEGNET_HD A affine(A x, A scale, A shift) {
  return fused_multiply_add(x, scale, shift);
}

// relu(u) that propagates NaN, as torch.relu does.
template <typename A>
SEGNET_HD bool relu_passes(A u) {
  return !(u <= A(0));
}

template <typename A>
SEGNET_HD A affine_relu(A x, A scale, A shift, bool relu) {
  const A u = affine(x, scale, shift);
  return (relu && !relu_passes(u)) ? A(0) : u;
}

// relu(x * scale + shift + residual): the BN output plus the identity, rounded once.
template <typename A>
SEGNET_HD A affine_add_relu(A x, A scale, A shift, A residual, bool relu) {
  const A u = affine(x, scale, shift) + residual;
  return (relu && !relu_passes(u)) ? A(0) : u;
}

// The gradient g that reaches BN through the ReLU (grad_y where the ReLU passed).
template <typename A>
SEGNET_HD A relu_grad(A x, A grad_y, A scale, A shift, bool relu) {
  return (!relu || relu_passes(affine(x, scale, shift))) ? grad_y : A(0);
}

// BN+ReLU's input gradient at one element.
template <typename A>
SEGNET_HD A bn_relu_input_grad(A x, A grad_y, A scale, A shift, A mean, A k1, A k2, A k3, bool relu) {
  return fused_multiply_add(k1, relu_grad(x, grad_y, scale, shift, relu), fused_multiply_add(k2, x - mean, k3));
}

// Count, mean and sum of squared deviations of a set of values; two sets combine exactly
// (Chan et al.), so partial results of any chunking give the same, stable variance.
struct Moments {
  double n = 0, mean = 0, m2 = 0;

  // From sums of (x - pivot) and (x - pivot)^2 over n values.
  SEGNET_HD static Moments from_shifted(double n, double pivot, double s1, double s2) {
    Moments m;
    if (n > 0) {
      m.n = n;
      m.mean = pivot + s1 / n;
      m.m2 = s2 - s1 * s1 / n;
      if (m.m2 < 0) m.m2 = 0;
    }
    return m;
  }

  SEGNET_HD void combine(const Moments& o) {
    if (o.n == 0) return;
    if (n == 0) {
      *this = o;
      return;
    }
    const double total = n + o.n, delta = o.mean - mean;
    mean += delta * (o.n / total);
    m2 += o.m2 + delta * delta * (n * o.n / total);
    n = total;
  }

  SEGNET_HD double var() const { return n > 0 ? m2 / n : 0.0; }
};

}  // namespace segnet
