// The emulator's tensor cores and asynchronous copies (sm_80+), included by cuda_emu.h:
//   - nvcuda::wmma: fragments, fill_fragment, load_matrix_sync, mma_sync, store_matrix_sync
//     (row and column major, 16x16x16 for half and bfloat16, 16x16x8 for precision::tf32,
//     float accumulators). A fragment holds the whole tile in every lane (a GPU spreads it
//     over the warp in an unspecified order, so a kernel may only touch fragment.x[] element
//     by element, as here). Every operation is warp-collective: all 32 lanes must execute
//     it (Launch::warp_collective). mma_sync multiplies in float with one rounding per
//     product-sum step; tf32 operands keep the 10 mantissa bits a tensor core reads
//     (truncated, as a GPU ignores the low bits where __float_to_tf32 was not called).
//     Each shared-memory read of load_matrix_sync and write of store_matrix_sync is counted
//     for bank conflicts (bank_traffic(): wavefronts against the conflict-free minimum),
//     modelled as a GPU's matrix loads (ldmatrix): a phase reads one 16-byte piece of each
//     of 8 consecutive fragment rows (row major) or columns (column major).
//   - cp.async through cuda_pipeline.h's primitives: __pipeline_memcpy_async (4, 8 or 16
//     bytes, the last `zfill` of them zeros), __pipeline_commit, __pipeline_wait_prior(n).
//     A copy happens only when a wait covers its group; until then its destination holds
//     0xff bytes (NaN, -1), so a kernel that reads a stage before waiting for it, or that
//     another thread reads without a __syncthreads after the wait, reads garbage. The source
//     is a global load for memory_traffic() (SEGNET_CP_ASYNC, kernels/launch.cuh).
#pragma once

#include <cmath>

namespace cuda_emu {

// Shared-memory wavefronts of the WMMA loads and stores, against the conflict-free minimum.
struct BankTraffic {
  uint64_t wavefronts = 0, ideal = 0;
};
inline BankTraffic& bank_traffic() {
  static BankTraffic t;
  return t;
}
inline std::mutex& bank_mutex() {
  static std::mutex m;
  return m;
}

// One warp access of shared memory as 16-byte pieces in lane order: a phase serves 8 of them
// (128 bytes); two pieces of a phase at different 16-byte words of the same 4-bank group
// conflict, and the phase takes as many wavefronts as the most such words in one group.
inline void count_banks(const std::vector<uintptr_t>& pieces) {
  uint64_t wavefronts = 0;
  for (size_t p = 0; p < pieces.size(); p += 8) {
    int worst = 1;
    for (int quad = 0; quad < 8; ++quad) {
      std::vector<uintptr_t> words;
      for (size_t i = p; i < std::min(pieces.size(), p + 8); ++i)
        if ((pieces[i] / 16) % 8 == uintptr_t(quad) && std::find(words.begin(), words.end(), pieces[i] / 16) == words.end())
          words.push_back(pieces[i] / 16);
      worst = std::max<int>(worst, int(words.size()));
    }
    wavefronts += worst;
  }
  std::lock_guard<std::mutex> lock(bank_mutex());
  bank_traffic().wavefronts += wavefronts;
  bank_traffic().ideal += (pieces.size() + 7) / 8;
}

inline float tf32_truncate(float v) {
  if (!std::isfinite(v)) return v;
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits &= 0xffffe000u;
  std::memcpy(&v, &bits, 4);
  return v;
}

}  // namespace cuda_emu

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <typename T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  using element_type = typename storage<T>::type;
  element_type x[num_elements];
  element_type& at(int r, int c) { return x[r * cols + c]; }
  const element_type& at(int r, int c) const { return x[r * cols + c]; }
};

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& v) {
  ::cuda_emu::tls.launch->warp_collective("fill_fragment");
  for (auto& e : f.x) e = static_cast<typename fragment<Use, M, N, K, T, Layout>::element_type>(v);
}

namespace detail {
// The 16-byte pieces a warp's access of a rows x cols tile at p touches, in the order a GPU's
// matrix loads (ldmatrix) serve them: 8 consecutive rows (row major) or columns (column
// major) at one 16-byte offset per phase.
template <typename E>
void note_banks(const E* p, unsigned ldm, int rows, int cols, bool col_major) {
  if (::cuda_emu::lane() != 0) return;
  std::vector<uintptr_t> pieces;
  const int lines = col_major ? cols : rows, length = col_major ? rows : cols;
  const int per_piece = std::max<int>(1, 16 / int(sizeof(E)));
  for (int first = 0; first < lines; first += 8)
    for (int e = 0; e < length; e += per_piece)
      for (int l = first; l < std::min(lines, first + 8); ++l)
        pieces.push_back(reinterpret_cast<uintptr_t>(p + size_t(l) * ldm + e));
  ::cuda_emu::count_banks(pieces);
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout, typename E>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const E* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load names its layout");
  using F = fragment<Use, M, N, K, T, Layout>;
  static_assert(sizeof(E) == sizeof(typename F::element_type), "load_matrix_sync from memory of another type");
  ::cuda_emu::tls.launch->warp_collective("load_matrix_sync");
  constexpr bool col = std::is_same_v<Layout, col_major>;
  if (ldm * sizeof(E) % 16) throw std::runtime_error("cuda_emu: load_matrix_sync with ldm not a multiple of 16 bytes");
  if (reinterpret_cast<uintptr_t>(p) % 32) throw std::runtime_error("cuda_emu: load_matrix_sync from an address not 256-bit aligned");
  detail::note_banks(p, ldm, F::rows, F::cols, col);
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) {
      const E v = col ? p[size_t(c) * ldm + r] : p[size_t(r) * ldm + c];
      std::memcpy(&f.at(r, c), &v, sizeof(E));
    }
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t layout) {
  ::cuda_emu::tls.launch->warp_collective("load_matrix_sync");
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.at(r, c) = layout == mem_col_major ? p[size_t(c) * ldm + r] : p[size_t(r) * ldm + c];
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  ::cuda_emu::tls.launch->warp_collective("store_matrix_sync");
  if (ldm * sizeof(float) % 16) throw std::runtime_error("cuda_emu: store_matrix_sync with ldm not a multiple of 16 bytes");
  if (reinterpret_cast<uintptr_t>(p) % 32) throw std::runtime_error("cuda_emu: store_matrix_sync to an address not 256-bit aligned");
  detail::note_banks(p, ldm, M, N, layout == mem_col_major);
  // every lane writes the whole tile; the warp's lanes agree, so the order does not matter
  ::cuda_emu::tls.launch->warp_collective("store_matrix_sync");
  if (::cuda_emu::lane() == 0)
    for (int r = 0; r < M; ++r)
      for (int c = 0; c < N; ++c) (layout == mem_col_major ? p[size_t(c) * ldm + r] : p[size_t(r) * ldm + c]) = f.at(r, c);
  ::cuda_emu::tls.launch->warp_collective("store_matrix_sync");
}

namespace detail {
template <typename E>
float operand(E v, bool tf32) {
  const float f = static_cast<float>(v);
  return tf32 ? ::cuda_emu::tf32_truncate(f) : f;
}
}  // namespace detail

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  ::cuda_emu::tls.launch->warp_collective("mma_sync");
  constexpr bool tf32 = std::is_same_v<T, precision::tf32>;
  static_assert(tf32 ? K == 8 : K == 16, "fragment shape: 16x16x16 for 16-bit types, 16x16x8 for tf32");
  fragment<accumulator, M, N, K, float> out;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.at(i, j);
      for (int k = 0; k < K; ++k) s = std::fma(detail::operand(a.at(i, k), tf32), detail::operand(b.at(k, j), tf32), s);
      out.at(i, j) = s;
    }
  d = out;
}

// Round to nearest, ties away from zero, to tf32's 10 mantissa bits (cvt.rna.tf32.f32).
inline float __float_to_tf32(float v) {
  if (!std::isfinite(v)) return v;
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = (bits + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &bits, 4);
  return v;
}

}  // namespace wmma
}  // namespace nvcuda

// ---- cp.async (cuda_pipeline.h's primitives) ----

inline void __pipeline_memcpy_async(void* dst, const void* src, size_t bytes, size_t zfill = 0) {
  if (bytes != 4 && bytes != 8 && bytes != 16) throw std::runtime_error("cuda_emu: cp.async of " + std::to_string(bytes) + " bytes (4, 8 or 16)");
  if (zfill > bytes) throw std::runtime_error("cuda_emu: cp.async zero-fills more bytes than it copies");
  if (reinterpret_cast<uintptr_t>(dst) % bytes || (zfill < bytes && reinterpret_cast<uintptr_t>(src) % bytes))
    throw std::runtime_error("cuda_emu: cp.async of " + std::to_string(bytes) + " bytes at a misaligned address");
  std::memset(dst, 0xff, bytes);  // not arrived yet
  ::cuda_emu::tls.open_copies.push_back({dst, src, bytes, zfill});
}

inline void __pipeline_commit() {
  ::cuda_emu::tls.committed_copies.push_back(std::move(::cuda_emu::tls.open_copies));
  ::cuda_emu::tls.open_copies.clear();
}

inline void __pipeline_wait_prior(size_t pending) {
  auto& groups = ::cuda_emu::tls.committed_copies;
  while (groups.size() > pending) {
    for (const auto& c : groups.front()) {
      std::memcpy(c.dst, c.src, c.bytes - c.zfill);
      std::memset(static_cast<char*>(c.dst) + (c.bytes - c.zfill), 0, c.zfill);
    }
    groups.erase(groups.begin());
  }
}

namespace cuda_emu {
// SEGNET_CP_ASYNC (kernels/launch.cuh): the copy, its source counted as a global load.
inline void cp_async(void* dst, const void* src, size_t bytes, size_t zfill, uint32_t site) {
  if (counting()) tls.launch->note_access(src, bytes - zfill, site, false, zfill < bytes);
  __pipeline_memcpy_async(dst, src, bytes, zfill);
}
}  // namespace cuda_emu
