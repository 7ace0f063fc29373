// A torch-free program that runs the CUDA pooling kernels through the emulator on exactly
// sized heap buffers, for AddressSanitizer / UndefinedBehaviorSanitizer (out-of-bounds reads
// and writes, at partial border windows, partial warps and the last packed byte) and
// ThreadSanitizer (races between emulated threads). Built and run by test_sanitizers.py.
//   sanitize_main          pooling kernels on many shapes; prints "ok"
//   sanitize_main racy     the reduction without its barrier (ThreadSanitizer must object)
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda_emu.h"
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
  std::vector<float> x(4096, 1.f), out(1, 0.f);  // the reduction with its barrier: race-free
  auto kernel = selftest::block_sum<true>;
  SEGNET_LAUNCH(kernel, 2, 128, nullptr, x.data(), int64_t(x.size()), out.data());
  if (out[0] != 4096.f) ++failures;
  std::printf(failures ? "FAILED\n" : "ok\n");
  return failures ? 1 : 0;
}
