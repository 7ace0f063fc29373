// Runs CUDA kernels on the CPU, so the tests can check what nvcc only compiles.
//
// Include this before a kernel header (csrc/kernels/*.cuh) in a host build (C++20).
// A launch runs the grid's blocks one after another; within a block, every CUDA
// thread is a std::thread of its own (kept from one launch to the next), so the kernel code
// runs truly concurrently:
//   - threadIdx / blockIdx / blockDim / gridDim are thread_local;
//   - __syncthreads() is a std::barrier over the block's live threads (a thread that
//     returns stops counting, as on the GPU);
//   - __shared__ is `static`: one copy, and since blocks run one at a time, one per block;
//   - warp shuffles exchange through per-warp slots between two per-warp barriers;
//     a partial warp counts only its live lanes; a source lane outside the width
//     segment returns the caller's own value, as CUDA does, and one past the last
//     live lane of a partial warp (undefined on a GPU) raises an error;
//   - atomics are std::atomic_ref operations.
// Schedules make races reproducible: under WarpsForward a warp starts only once the
// warp before it is waiting at a __syncthreads() or has finished (WarpsReverse: the
// warp after it), so a read of shared memory that lacks its barrier reads a value not
// yet written, every time, under one of the two orders. Free lets all threads run at once.
// Blocks run one after another, in the order block_order() says (forward, reverse or
// shuffled). A launch a GPU would refuse (empty grid, more than 1024 threads per block,
// grid y or z above 65535) is an error. Every launch is recorded (recording()), beside the
// guards and launch checks of the CUDA runtime shim (shim/), so that tests can run the
// launchers of csrc/cuda/ themselves; kernels::device_time_ms runs the work and returns
// times a test queued (fake_timer()).
// Global memory traffic (memory_traffic()): kernels load and store global memory through
// SEGNET_LOAD / SEGNET_STORE (kernels/launch.cuh; plain accesses under nvcc). While counting
// is on, the emulator records per warp and per access site the distinct 32-byte sectors its
// active lanes touch, as a GPU's L1 splits a warp's request: the k-th execution of a site by
// each lane of a warp is one warp instruction (lanes that skip it are inactive for it).
// __shared__ variables live in one section, poisoned (0xff bytes: NaN, -1) before every
// block, so a kernel that reads shared memory it did not write in that block reads garbage.
// A shuffle's or __syncwarp's mask must name exactly the warp's present lanes (those that
// exist and have not returned), or the launch fails.
// Limits: all present lanes of a warp must take part in a shuffle; no dynamic
// shared memory; one emulated launch at a time per process.
#pragma once

#define SEGNET_CUDA_EMULATION 1

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cctype>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <functional>
#include <latch>
#include <memory>
#include <mutex>
#include <random>
#include <semaphore>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <unistd.h>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Every __shared__ variable in one section (its bounds: __start_/__stop_cuda_emu_shared), so
// that a block can start from poisoned shared memory.
#define __shared__ __attribute__((section("cuda_emu_shared"))) static
extern "C" __attribute__((weak)) char __start_cuda_emu_shared[], __stop_cuda_emu_shared[];  // null without any

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

namespace cuda_emu {

constexpr int kWarpSize = 32;
enum class Schedule { Free, WarpsForward, WarpsReverse };

inline Schedule& schedule() {
  static Schedule s = Schedule::Free;
  return s;
}

// The order blocks run in: a kernel must not depend on it (a GPU runs them in any order).
enum class BlockOrder { Forward, Reverse, Shuffled };

inline BlockOrder& block_order() {
  static BlockOrder o = BlockOrder::Forward;
  return o;
}

inline std::vector<unsigned> block_sequence(unsigned blocks) {
  std::vector<unsigned> order(blocks);
  for (unsigned b = 0; b < blocks; ++b) order[b] = b;
  if (block_order() == BlockOrder::Reverse) std::reverse(order.begin(), order.end());
  if (block_order() == BlockOrder::Shuffled) std::shuffle(order.begin(), order.end(), std::mt19937(blocks));
  return order;
}

// Global memory traffic of the launches while counting() is on: warp-level requests and the
// 32-byte sectors they touch (distinct per warp instruction).
struct Traffic {
  uint64_t load_requests = 0, load_sectors = 0, store_requests = 0, store_sectors = 0;
};
inline bool& counting() {
  static bool on = false;
  return on;
}
inline Traffic& traffic() {
  static Traffic t;
  return t;
}

// One lane's access: the site's k-th execution by this lane, and a sector it touches
// (none when the lane is inactive: a predicated-off access still counts as executed).
struct Access {
  uint32_t site, occurrence;
  uint64_t sector;
  bool store, active;
  auto key() const { return std::tuple(store, site, occurrence, sector); }
};

class Launch;

// A cp.async copy of this thread not yet waited for (cuda_emu_wmma.h): `bytes - zfill` bytes
// from src, then zeros, to dst.
struct AsyncCopy {
  void* dst;
  const void* src;
  size_t bytes, zfill;
};

struct ThreadState {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  Launch* launch = nullptr;
  unsigned linear = 0;     // thread index within the block
  bool released = false;   // has let the next warp in the schedule start
  std::vector<AsyncCopy> open_copies;                     // issued since the last commit
  std::vector<std::vector<AsyncCopy>> committed_copies;  // committed groups, oldest first
};

inline thread_local ThreadState tls;

// The threads that run launches, one per CUDA thread of a block: started as a launch first
// needs them and kept for the next one. (Starting 256 threads for every launch cost more than
// the kernels on small inputs: about 60 us a thread, several times that under the sanitizers.)
class Workers {
 public:
  // Never destroyed: at exit its threads wait for work that will not come. A forked child,
  // which has none of its parent's threads, starts its own.
  static Workers& get() {
    static std::mutex mutex;
    static Workers* workers = nullptr;
    static pid_t owner = 0;
    std::lock_guard<std::mutex> lock(mutex);
    if (workers == nullptr || owner != getpid()) {
      workers = new Workers;
      owner = getpid();
    }
    return *workers;
  }

  // Runs job(t) for every t < n, each on its own thread, all at once; returns when all are done.
  void run(unsigned n, const std::function<void(unsigned)>& job) {
    std::lock_guard<std::mutex> one_at_a_time(launch_);
    std::unique_lock<std::mutex> lock(mutex_);
    while (go_.size() < n) {
      go_.push_back(std::make_unique<std::binary_semaphore>(0));
      std::thread(&Workers::serve, this, unsigned(go_.size() - 1)).detach();
    }
    job_ = &job;
    running_ = n;
    for (unsigned t = 0; t < n; ++t) go_[t]->release();
    done_.wait(lock, [this] { return running_ == 0; });
  }

 private:
  void serve(unsigned t) {
    std::binary_semaphore* go;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      go = go_[t].get();
    }
    for (;;) {
      go->acquire();
      (*job_)(t);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--running_ == 0) done_.notify_one();
    }
  }

  std::mutex launch_, mutex_;
  std::condition_variable done_;
  std::vector<std::unique_ptr<std::binary_semaphore>> go_;  // per worker: work is there
  const std::function<void(unsigned)>* job_ = nullptr;
  unsigned running_ = 0;
};

class Launch {
 public:
  struct ResetBlock {
    Launch* launch;
    void operator()() noexcept { launch->reset_block(); }
  };

  Launch(dim3 grid, dim3 block)
      : grid_(grid), block_(block), threads_(block.x * block.y * block.z),
        warps_((threads_ + kWarpSize - 1) / kWarpSize), slots_(threads_),
        accesses_(threads_), occurrences_(threads_), block_end_(threads_, ResetBlock{this}) {
    reset_block();
  }

  unsigned threads() const { return threads_; }

  void syncthreads() {
    release_next_warp();
    sync_->arrive_and_wait();
  }

  // Exchange through per-warp slots: write, barrier, read the source lane, barrier.
  // A source lane beyond the last thread of a partial warp does not exist: on a GPU the
  // result is undefined, here it is an error. So is a mask other than the lanes present.
  template <typename T>
  T shuffle(unsigned mask, T value, int src_lane_in_warp, bool valid) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 8 bytes");
    const unsigned warp = tls.linear / kWarpSize;
    if (valid && warp * kWarpSize + src_lane_in_warp >= threads_) {
      throw std::runtime_error("cuda_emu: shuffle reads lane " + std::to_string(src_lane_in_warp) +
                               " of a partial warp that has only " +
                               std::to_string(live_lanes(warp)) + " lanes");
    }
    std::memcpy(&slots_[tls.linear], &value, sizeof(T));
    warp_sync_[warp]->arrive_and_wait();
    check_mask("shuffle", mask, warp);
    T out = value;
    const unsigned src = warp * kWarpSize + src_lane_in_warp;
    if (valid && src < threads_) std::memcpy(&out, &slots_[src], sizeof(T));
    warp_sync_[warp]->arrive_and_wait();
    return out;
  }

  // A warp-wide operation that every lane of a full warp executes together (the WMMA
  // operations, cuda_emu_wmma.h): a lane missing from it, or a partial warp, is an error.
  void warp_collective(const char* what) {
    const unsigned warp = tls.linear / kWarpSize;
    warp_sync_[warp]->arrive_and_wait();
    const unsigned present = present_lanes(warp);
    warp_sync_[warp]->arrive_and_wait();
    if (present != ~0u) {
      char text[160];
      std::snprintf(text, sizeof text, "cuda_emu: %s in warp %u, whose present lanes are 0x%08x (it needs all 32)",
                    what, warp, present);
      throw std::runtime_error(text);
    }
  }

  void syncwarp(unsigned mask) {
    const unsigned warp = tls.linear / kWarpSize;
    warp_sync_[warp]->arrive_and_wait();
    check_mask("__syncwarp", mask, warp);
    warp_sync_[warp]->arrive_and_wait();  // no lane returns before every lane has checked
  }

  // A global access of `bytes` at p by this lane from access site `site` (see counting()).
  void note_access(const void* p, size_t bytes, uint32_t site, bool store, bool active) {
    auto& seen = occurrences_[tls.linear];
    auto it = std::find_if(seen.begin(), seen.end(), [&](const auto& e) { return e.first == site; });
    if (it == seen.end()) it = seen.insert(seen.end(), {site, 0u});
    const uint32_t k = it->second++;
    auto& log = accesses_[tls.linear];
    const uint64_t first = reinterpret_cast<uintptr_t>(p) / 32;
    const uint64_t last = (reinterpret_cast<uintptr_t>(p) + std::max<size_t>(bytes, 1) - 1) / 32;
    if (!active) {
      log.push_back({site, k, 0, store, false});
      return;
    }
    for (uint64_t sector = first; sector <= last; ++sector) log.push_back({site, k, sector, store, true});
  }

  unsigned live_lanes(unsigned warp) const {
    return std::min<unsigned>(kWarpSize, threads_ - warp * kWarpSize);
  }

  // The lanes of a warp that exist and have not returned. Read between two warp barriers,
  // where every lane still running waits, so no lane can return meanwhile.
  unsigned present_lanes(unsigned warp) const {
    const unsigned live = live_lanes(warp);
    return (live == kWarpSize ? ~0u : (1u << live) - 1) & ~exited_[warp].load();
  }

  // A warp-synchronous intrinsic's mask must name exactly the lanes that execute it: on a
  // GPU a lane named but absent (past a partial warp's end, or returned) hangs it or makes it
  // undefined, and one that takes part unnamed is undefined. Here all present lanes take part.
  void check_mask(const char* what, unsigned mask, unsigned warp) const {
    const unsigned present = present_lanes(warp);
    if (mask != present) {
      char text[160];
      std::snprintf(text, sizeof text, "cuda_emu: %s with mask 0x%08x in warp %u, whose present lanes are 0x%08x",
                    what, mask, warp, present);
      throw std::runtime_error(text);
    }
  }

  void run(const std::function<void()>& body) {
    Workers::get().run(threads_, [this, &body](unsigned t) { thread_main(t, body); });
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void thread_main(unsigned t, const std::function<void()>& body) {
    tls = ThreadState{};
    tls.launch = this;
    tls.linear = t;
    tls.block_dim = block_;
    tls.grid_dim = grid_;
    tls.thread_idx = dim3(t % block_.x, (t / block_.x) % block_.y, t / (block_.x * block_.y));
    for (const unsigned b : block_sequence(grid_.x * grid_.y * grid_.z)) {
      tls.block_idx = dim3(b % grid_.x, (b / grid_.x) % grid_.y, b / (grid_.x * grid_.y));
      tls.released = false;
      tls.open_copies.clear();
      tls.committed_copies.clear();
      wait_for_turn();
      try {
        body();
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (!error_) error_ = std::current_exception();
      }
      release_next_warp();
      sync_->arrive_and_drop();
      exited_[t / kWarpSize].fetch_or(1u << (t % kWarpSize));
      warp_sync_[t / kWarpSize]->arrive_and_drop();
      block_end_.arrive_and_wait();
    }
  }

  // The warp that waits for this one under the current schedule, or -1.
  int next_warp(unsigned warp) const {
    if (schedule() == Schedule::WarpsForward) return warp + 1 < warps_ ? int(warp + 1) : -1;
    if (schedule() == Schedule::WarpsReverse) return warp > 0 ? int(warp - 1) : -1;
    return -1;
  }

  void wait_for_turn() {
    const unsigned warp = tls.linear / kWarpSize;
    if (gates_[warp]) gates_[warp]->wait();
  }

  void release_next_warp() {
    if (tls.released) return;
    tls.released = true;
    const int next = next_warp(tls.linear / kWarpSize);
    if (next >= 0) gates_[next]->count_down();
  }

  // Adds the finished block's accesses to traffic(): per warp, the distinct (site, k, sector)
  // triples are its sectors; the distinct (site, k) pairs with an active lane its requests.
  void count_block_traffic() {
    std::vector<Access> warp;
    for (unsigned w = 0; w < warps_; ++w) {
      warp.clear();
      for (unsigned t = w * kWarpSize; t < std::min(threads_, (w + 1) * kWarpSize); ++t) {
        for (const Access& a : accesses_[t])
          if (a.active) warp.push_back(a);
        accesses_[t].clear();
      }
      std::sort(warp.begin(), warp.end(), [](const Access& a, const Access& b) { return a.key() < b.key(); });
      Traffic& total = traffic();
      for (size_t i = 0; i < warp.size(); ++i) {
        const Access& a = warp[i];
        const bool new_sector = i == 0 || warp[i - 1].key() != a.key();
        const bool new_request = i == 0 || warp[i - 1].store != a.store || warp[i - 1].site != a.site ||
                                 warp[i - 1].occurrence != a.occurrence;
        (a.store ? total.store_sectors : total.load_sectors) += new_sector;
        (a.store ? total.store_requests : total.load_requests) += new_request;
      }
    }
    for (auto& seen : occurrences_) seen.clear();
  }

  // Byte by byte and uninstrumented: under AddressSanitizer the section also holds the
  // redzones between variables, which a checked memset would report.
  __attribute__((no_sanitize_address)) static void poison_shared() {
    for (volatile char* p = __start_cuda_emu_shared; p < __stop_cuda_emu_shared; ++p) *p = char(0xff);
  }

  // Runs once between blocks, while every thread waits at block_end_.
  void reset_block() {
    if (counting()) count_block_traffic();
    poison_shared();
    sync_ = std::make_unique<std::barrier<>>(threads_);
    warp_sync_.clear();
    for (unsigned w = 0; w < warps_; ++w) exited_[w].store(0);
    gates_.clear();
    gates_.resize(warps_);
    for (unsigned w = 0; w < warps_; ++w) {
      warp_sync_.push_back(std::make_unique<std::barrier<>>(live_lanes(w)));
    }
    for (unsigned w = 0; w < warps_; ++w) {
      const int next = next_warp(w);
      if (next >= 0) gates_[next] = std::make_unique<std::latch>(live_lanes(w));
    }
  }

  dim3 grid_, block_;
  unsigned threads_, warps_;
  std::vector<uint64_t> slots_;
  std::vector<std::vector<Access>> accesses_;                        // per thread, this block
  std::vector<std::vector<std::pair<uint32_t, uint32_t>>> occurrences_;  // per thread: site -> executions
  std::unique_ptr<std::barrier<>> sync_;
  std::vector<std::unique_ptr<std::barrier<>>> warp_sync_;
  std::unique_ptr<std::atomic<unsigned>[]> exited_{new std::atomic<unsigned>[warps_]};  // per warp: lanes returned
  std::vector<std::unique_ptr<std::latch>> gates_;
  std::barrier<ResetBlock> block_end_;
  std::mutex error_mutex_;
  std::exception_ptr error_;
};

// What a GPU refuses to launch: checked here before any thread runs.
inline void check_launch(dim3 grid, dim3 block) {
  const auto text = [](dim3 d) {
    return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
  };
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0) {
    throw std::runtime_error("cuda_emu: launch with an empty grid " + text(grid) + " or block " + text(block) +
                             " (a GPU reports an invalid configuration)");
  }
  if (threads > 1024 || block.z > 64) {
    throw std::runtime_error("cuda_emu: block " + text(block) + " has more than 1024 threads or z > 64");
  }
  if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    throw std::runtime_error("cuda_emu: grid " + text(grid) + " exceeds (2^31 - 1, 65535, 65535)");
  }
}

// Every launch and host-side event of the CUDA runtime shim (shim/c10/cuda/*.h), in order,
// so tests can check what the launchers in csrc/cuda/ did: "guard <device>",
// "<launcher> <grid> <block>", "launch check".
inline std::vector<std::string>& recording() {
  static std::vector<std::string> events;
  return events;
}
inline std::mutex& recording_mutex() {
  static std::mutex m;
  return m;
}
inline void record(std::string event) {
  std::lock_guard<std::mutex> lock(recording_mutex());
  recording().push_back(std::move(event));
}

// The name of the function a __PRETTY_FUNCTION__ text describes (also from inside a lambda
// of it): the identifier before the first parenthesis and its template arguments, if any.
inline std::string function_name(const std::string& pretty) {
  size_t end = pretty.find('(');
  if (end == std::string::npos) return pretty;
  for (int depth = 0; end > 0 && (pretty[end - 1] == '>' || depth > 0); --end) {
    depth += pretty[end - 1] == '>' ? 1 : pretty[end - 1] == '<' ? -1 : 0;
    if (depth == 0 && pretty[end - 1] == '<') {
      --end;
      break;
    }
  }
  size_t begin = end;
  while (begin > 0 && (std::isalnum(static_cast<unsigned char>(pretty[begin - 1])) || pretty[begin - 1] == '_')) --begin;
  return pretty.substr(begin, end - begin);
}

// Runs `body` (a call of the kernel) as a grid x block launch; returns when all threads are
// done. A block above the kernel's __launch_bounds__ is an error. `launcher` (the
// __PRETTY_FUNCTION__ of the function that launches) names it in the
// recording.
template <typename F>
void launch(const char* launcher, dim3 grid, dim3 block, unsigned launch_bounds, F&& body) {
  check_launch(grid, block);
  if (block.x * block.y * block.z > launch_bounds) {
    throw std::runtime_error("cuda_emu: " + function_name(launcher) + " launches " +
                             std::to_string(block.x * block.y * block.z) + " threads per block, above the kernel's "
                             "__launch_bounds__(" + std::to_string(launch_bounds) + ") (a GPU refuses the launch)");
  }
  record(function_name(launcher) + " " + std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" + std::to_string(grid.z) + " " +
         std::to_string(block.x) + "x" + std::to_string(block.y) + "x" + std::to_string(block.z));
  Launch(grid, block).run(std::function<void()>(body));
}

// The device timer of the emulation (kernels::device_time_ms): runs the work, then returns
// the next of the times a test queued, in milliseconds, and counts the calls.
class FakeTimer {
 public:
  void queue(std::vector<double> ms) {
    std::lock_guard<std::mutex> lock(mutex_);
    queued_ = std::move(ms);
    next_ = 0;
    calls_ = 0;
  }
  double time(const std::function<void()>& work) {
    work();
    std::lock_guard<std::mutex> lock(mutex_);
    ++calls_;
    if (next_ >= queued_.size()) throw std::runtime_error("cuda_emu: a timing was asked for, but no time is queued");
    return queued_[next_++];
  }
  int calls() {
    std::lock_guard<std::mutex> lock(mutex_);
    return calls_;
  }

 private:
  std::mutex mutex_;
  std::vector<double> queued_;
  size_t next_ = 0;
  int calls_ = 0;
};

inline FakeTimer& fake_timer() {
  static FakeTimer timer;
  return timer;
}

inline unsigned lane() { return tls.linear % kWarpSize; }

// The global accesses behind SEGNET_LOAD / SEGNET_STORE (kernels/launch.cuh).
template <typename T>
T global_load(const T* p, uint32_t site) {
  if (counting()) tls.launch->note_access(p, sizeof(T), site, false, true);
  return *p;
}
template <typename T>
T global_load_if(bool active, const T* p, T otherwise, uint32_t site) {
  if (counting()) tls.launch->note_access(p, sizeof(T), site, false, active);
  return active ? *p : otherwise;
}
template <typename T, typename V>
void global_store(bool active, T* p, V&& value, uint32_t site) {
  if (counting()) tls.launch->note_access(p, sizeof(T), site, true, active);
  if (active) *p = std::forward<V>(value);
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::tls.thread_idx)
#define blockIdx (::cuda_emu::tls.block_idx)
#define blockDim (::cuda_emu::tls.block_dim)
#define gridDim (::cuda_emu::tls.grid_dim)
#define warpSize (::cuda_emu::kWarpSize)

inline void __syncthreads() { ::cuda_emu::tls.launch->syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::cuda_emu::tls.launch->syncwarp(mask); }

// Lanes are grouped in segments of `width` (a power of two <= 32), as in CUDA.
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int base = int(::cuda_emu::lane()) & ~(width - 1);
  return ::cuda_emu::tls.launch->shuffle(mask, v, base + (src & (width - 1)), true);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::cuda_emu::lane(), src = lane + int(delta);
  return ::cuda_emu::tls.launch->shuffle(mask, v, src, (src & ~(width - 1)) == (lane & ~(width - 1)));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::cuda_emu::lane(), src = lane - int(delta);
  return ::cuda_emu::tls.launch->shuffle(mask, v, src, src >= 0 && (src & ~(width - 1)) == (lane & ~(width - 1)));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::cuda_emu::lane(), src = lane ^ lane_mask;
  return ::cuda_emu::tls.launch->shuffle(mask, v, src, (src & ~(width - 1)) == (lane & ~(width - 1)));
}

template <typename T>
T __ldg(const T* p) { return *p; }

#include "cuda_emu_wmma.h"

template <typename T>
T atomicAdd(T* address, T value) { return std::atomic_ref<T>(*address).fetch_add(value); }
template <typename T>
T atomicSub(T* address, T value) { return std::atomic_ref<T>(*address).fetch_sub(value); }
template <typename T>
T atomicOr(T* address, T value) { return std::atomic_ref<T>(*address).fetch_or(value); }
template <typename T>
T atomicAnd(T* address, T value) { return std::atomic_ref<T>(*address).fetch_and(value); }
template <typename T>
T atomicExch(T* address, T value) { return std::atomic_ref<T>(*address).exchange(value); }
template <typename T>
T atomicCAS(T* address, T expected, T desired) {
  std::atomic_ref<T>(*address).compare_exchange_strong(expected, desired);
  return expected;
}
template <typename T>
T atomicMax(T* address, T value) {
  std::atomic_ref<T> a(*address);
  T old = a.load();
  while (old < value && !a.compare_exchange_weak(old, value)) {}
  return old;
}
template <typename T>
T atomicMin(T* address, T value) {
  std::atomic_ref<T> a(*address);
  T old = a.load();
  while (value < old && !a.compare_exchange_weak(old, value)) {}
  return old;
}
