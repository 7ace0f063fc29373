// A program without torch's libraries (c10's header-only half types only) that runs the CUDA
// pooling kernels and the tensor-core convolution through the emulator on exactly sized heap
// buffers, for AddressSanitizer / UndefinedBehaviorSanitizer (out-of-bounds reads and writes,
// at partial border windows, partial warps, the last packed byte, partial convolution tiles
// and zero-filled cp.async copies) and ThreadSanitizer (races between emulated threads: the
// convolution's pipeline stages included). Built and run by test_sanitizers.py.
//   sanitize_main          pooling kernels on many shapes, the convolution on a few; prints "ok"
//   sanitize_main racy     the reduction without its barrier (ThreadSanitizer must object)
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda_emu.h"
#include "kernels/conv3x3.cuh"
#include "kernels/pool2x2.cuh"
#include "selftest_kernels.cuh"

using segnet::kernels::LaunchConfig;
using segnet::kernels::PoolDims;

namespace {

int failures = 0;

void check(bool ok, const char* what, const PoolDims& d, bool cl) {
  if (!ok && failures++ < 10) {
    std::printf("FAIL %s: N=%ld C=%ld H=%ld W=%ld cl=%d\n", what, long(d.N), long(d.C), long(d.H),
                long(d.W), int(cl));
  }
}

void run_shape(PoolDims d, bool channels_last, std::mt19937& rng) {
  const auto in = segnet::kernels::dense_strides(d.C, d.H, d.W, channels_last);
  const auto out = segnet::kernels::dense_strides(d.C, d.Ho, d.Wo, channels_last);
  const int64_t full = d.elements(), windows = d.windows();
  // exactly sized heap buffers: one element too far is a sanitizer report
  std::vector<float> x(full), values(windows), y(full), grad(windows);
  std::vector<uint8_t> packed(segnet::packed_bytes(windows));
  std::uniform_int_distribution<int> pick(0, 9);
  for (auto& v : x) {
    const int r = pick(rng);
    v = r == 9 ? NAN : float(r % 4);  // ties and NaN
  }
  const LaunchConfig cfg{48, 3};
  segnet::kernels::launch_max_pool2x2(x.data(), values.data(), packed.data(), d, channels_last, nullptr, cfg);
  segnet::kernels::launch_max_unpool2x2(values.data(), packed.data(), y.data(), d, channels_last, nullptr, cfg);
  segnet::kernels::launch_max_unpool2x2_backward(y.data(), packed.data(), grad.data(), d, channels_last,
                                                 nullptr, cfg);
  // unpooling puts each value back where it was taken, so gathering there gives the values
  // again, and every input element either equals the unpooled one or the latter is zero
  for (int64_t n = 0; n < d.N; ++n)
    for (int64_t c = 0; c < d.C; ++c)
      for (int64_t oh = 0; oh < d.Ho; ++oh)
        for (int64_t ow = 0; ow < d.Wo; ++ow) {
          const int64_t i = out.at(n, c, oh, ow);
          const bool same = std::memcmp(&grad[i], &values[i], sizeof(float)) == 0;
          check(same, "gather(unpool(pool)) != pool", d, channels_last);
          const uint8_t code = segnet::read_code(packed.data(), ((n * d.C + c) * d.Ho + oh) * d.Wo + ow);
          const int64_t h = 2 * oh + (code >> 1), w = 2 * ow + (code & 1);
          check(h < d.H && w < d.W, "code points outside the input", d, channels_last);
          check(std::memcmp(&x[in.at(n, c, h, w)], &values[i], sizeof(float)) == 0,
                "value is not the input at its code", d, channels_last);
        }
  const uint8_t spare = windows % 4 ? packed.back() >> (2 * (windows % 4)) : 0;
  check(spare == 0, "bits past the last window are not zero", d, channels_last);
}

// The convolution, eval and training epilogues, against a direct one in double (loosely: the
// point is the memory the kernel touches, the emulated-kernel tests check the numbers).
template <typename T>
void run_conv(segnet::kernels::Conv3x3Dims d, std::mt19937& rng) {
  using segnet::kernels::TileMoments;
  const int64_t P = d.pixels(), K = 9 * d.Cin;
  std::vector<T> x(P * d.Cin), w(d.Cout * K), y(P * d.Cout), z(P * d.Cout);
  std::vector<float> scale(d.Cout), shift(d.Cout), ones(d.Cout, 1.f), mean(d.Cout), var(d.Cout);
  std::vector<TileMoments> moments(segnet::kernels::conv3x3_moments(d));
  std::normal_distribution<float> normal;
  for (auto& v : x) v = T(normal(rng));
  for (auto& v : w) v = T(normal(rng));
  for (auto& v : scale) v = normal(rng);
  for (auto& v : shift) v = normal(rng);
  segnet::kernels::launch_conv3x3_scale_shift_relu(x.data(), w.data(), scale.data(), shift.data(), false, y.data(), d,
                                                   nullptr);
  segnet::kernels::launch_conv3x3_bn_stats(x.data(), w.data(), ones.data(), shift.data(), z.data(), d, moments.data(),
                                           mean.data(), var.data(), nullptr);
  const PoolDims shape{d.N, d.Cout, d.H, d.W, d.H, d.W};
  std::vector<double> sum(d.Cout, 0.0);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t n = p / (d.H * d.W), h = p / d.W % d.H, wc = p % d.W;
    for (int64_t co = 0; co < d.Cout; ++co) {
      double acc = 0, magnitude = 0;  // the sum and the sum of the products' magnitudes
      for (int tap = 0; tap < 9; ++tap) {
        const int64_t ih = h + tap / 3 - 1, iw = wc + tap % 3 - 1;
        if (ih < 0 || ih >= d.H || iw < 0 || iw >= d.W) continue;
        for (int64_t ci = 0; ci < d.Cin; ++ci) {
          const double product =
              double(float(x[((n * d.H + ih) * d.W + iw) * d.Cin + ci])) * double(float(w[co * K + tap * d.Cin + ci]));
          acc += product, magnitude += std::abs(product);
        }
      }
      const double want = acc * scale[co] + shift[co], tol = 0.01 * (1 + magnitude) * (1 + std::abs(scale[co]));
      check(std::abs(double(float(y[p * d.Cout + co])) - want) <= tol, "convolution", shape, true);
      check(std::abs(double(float(z[p * d.Cout + co])) - (acc + shift[co])) <= tol, "training z", shape, true);
      sum[co] += double(float(z[p * d.Cout + co]));
    }
  }
  for (int64_t co = 0; co < d.Cout; ++co)
    check(std::abs(mean[co] - sum[co] / P) <= 1e-3 * (1 + std::abs(mean[co])) && var[co] >= 0, "batch mean", shape, true);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "racy") {
    cuda_emu::schedule() = cuda_emu::Schedule::Free;
    std::vector<float> x(4096, 1.f), out(1, 0.f);
    auto kernel = selftest::block_sum<false>;
    SEGNET_LAUNCH(kernel, 2, 128, nullptr, x.data(), int64_t(x.size()), out.data());
    std::printf("racy sum %f\n", out[0]);
    return 0;
  }
  std::mt19937 rng(12345);
  for (bool cl : {false, true})
    for (bool ceil_mode : {false, true})
      for (int64_t H : {1, 2, 3, 5, 8})
        for (int64_t W : {1, 2, 7, 8, 16, 17}) {
          const int64_t Ho = segnet::pooled_extent(H, ceil_mode), Wo = segnet::pooled_extent(W, ceil_mode);
          if (Ho >= 1 && Wo >= 1) run_shape(PoolDims{2, 3, H, W, Ho, Wo}, cl, rng);
        }
  run_shape(PoolDims{1, 5, 37, 250, 19, 125}, true, rng);
  run_shape(PoolDims{1, 5, 37, 250, 18, 125}, false, rng);
  for (const auto& d : {segnet::kernels::Conv3x3Dims{1, 8, 5, 7, 5}, segnet::kernels::Conv3x3Dims{2, 16, 9, 8, 70}}) {
    run_conv<float>(d, rng);
    run_conv<c10::BFloat16>(d, rng);
  }
  std::vector<float> x(4096, 1.f), out(1, 0.f);  // the reduction with its barrier: race-free
  auto kernel = selftest::block_sum<true>;
  SEGNET_LAUNCH(kernel, 2, 128, nullptr, x.data(), int64_t(x.size()), out.data());
  if (out[0] != 4096.f) ++failures;
  std::printf(failures ? "FAILED\n" : "ok\n");
  return failures ? 1 : 0;
}
