// The emulator's own test of its tensor cores (cuda_emu_wmma.h), through the fragment types
// the convolution uses (kernels/conv3x3.cuh, which needs torch's half types: so apart from
// selftest_kernels.cuh, which the torch-free sanitizer program builds too).
#pragma once

#include "kernels/conv3x3.cuh"

namespace selftest {

// c (16 x 16, row major with leading dimension 20, float) = a (16 x K, row major) @ b (K x 16: row major, or column
// major when b_col_major), one warp, WMMA fragments loaded with leading dimensions lda / ldb
// straight from memory: 16x16x16 in 16-bit types, TF32 16x16x8 (rounded by
// __float_to_tf32) in float.
template <typename T>
__global__ void wmma_product(const T* a, int lda, const T* b, int ldb, bool b_col_major, int K, float* c) {
  namespace wmma = nvcuda::wmma;
  using F = typename segnet::kernels::TensorCore<T>::fragment_type;
  constexpr int kDepth = segnet::kernels::TensorCore<T>::kDepth;
  wmma::fragment<wmma::accumulator, 16, 16, kDepth, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  for (int k = 0; k < K; k += kDepth) {
    wmma::fragment<wmma::matrix_a, 16, 16, kDepth, F, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, a + k, lda);
    auto multiply = [&](auto& fb) {
      if constexpr (std::is_same_v<T, float>) {
        for (int e = 0; e < fa.num_elements; ++e) fa.x[e] = wmma::__float_to_tf32(fa.x[e]);
        for (int e = 0; e < fb.num_elements; ++e) fb.x[e] = wmma::__float_to_tf32(fb.x[e]);
      }
      wmma::mma_sync(acc, fa, fb, acc);
    };
    if (b_col_major) {
      wmma::fragment<wmma::matrix_b, 16, 16, kDepth, F, wmma::col_major> fb;
      wmma::load_matrix_sync(fb, b + k, ldb);
      multiply(fb);
    } else {
      wmma::fragment<wmma::matrix_b, 16, 16, kDepth, F, wmma::row_major> fb;
      wmma::load_matrix_sync(fb, b + int64_t(k) * ldb, ldb);
      multiply(fb);
    }
  }
  wmma::store_matrix_sync(c, acc, 20, wmma::mem_row_major);
}

}  // namespace selftest
