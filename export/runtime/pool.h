// Threads for the project's kernels: ExecuTorch's pool (the one its XNNPACK methods use), or the runtime's own
// spinning pool when every heavy operator of a bundle is the project's.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include <executorch/runtime/core/function_ref.h>

// The wheel ships libexecutorch_threadpool but not its header; these members are its stable public API
// (extension/threadpool/threadpool.h upstream), declared here so the runner can size the pool like the Python
// runtime's `_unsafe_reset_threadpool`.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(uint32_t num_threads);
  void run(executorch::runtime::FunctionRef<void(size_t)> fn, size_t range);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace cosmoes {

// A pool whose workers keep polling for a while after each job instead of sleeping at once. ExecuTorch's pool
// puts its workers to sleep on a futex between jobs, and a decode step hands it dozens of jobs of tens of
// microseconds each: waking a worker cost about what it saved (wearable-moe, 2 threads: 39 futex calls per
// token, decode 1.0-1.3x of 1 thread). Workers sleep after `spin` without work, so an idle runtime costs nothing.
class SpinPool {
 public:
  using Fn = void (*)(void* ctx, int64_t i);
  explicit SpinPool(int threads, std::chrono::microseconds spin = std::chrono::microseconds(1000));
  ~SpinPool();
  SpinPool(const SpinPool&) = delete;
  SpinPool& operator=(const SpinPool&) = delete;
  int threads() const { return static_cast<int>(workers_.size()) + 1; }
  // fn(ctx, i) for i in [0, n), the caller taking items too; returns when all are done. A second caller while one
  // runs (two runtimes on two threads) runs its items inline.
  void run(void* ctx, Fn fn, int64_t n);

 private:
  // state_ = generation (24 bits) | items (20) | next item (20): claiming an item is one compare-exchange that
  // also checks it belongs to the job the worker woke for, so a late worker never runs a stale or new job's item.
  static constexpr int kBits = 20;
  static constexpr uint64_t kMask = (uint64_t{1} << kBits) - 1;
  static constexpr uint64_t kGenMask = (uint64_t{1} << (64 - 2 * kBits)) - 1;
  static uint64_t gen(uint64_t s) { return s >> (2 * kBits); }
  bool claim_and_run(uint64_t generation);
  void work();

  std::vector<std::thread> workers_;
  std::chrono::microseconds spin_;
  std::atomic<uint64_t> state_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleeping_{0};
  std::atomic<bool> stop_{false};
  void* ctx_ = nullptr;
  Fn fn_ = nullptr;
  std::mutex sleep_mutex_, run_mutex_;
  std::condition_variable wake_;
};

// While a PoolScope lives, the project's kernels called on this thread run on `pool` (null: on ExecuTorch's). A
// runtime holds its own pool and opens a scope around each prefill and decode, so two runtimes on two threads (two
// C API sessions) never share, resize or free each other's pool.
class PoolScope {
 public:
  explicit PoolScope(SpinPool* pool);
  ~PoolScope();
  PoolScope(const PoolScope&) = delete;
  PoolScope& operator=(const PoolScope&) = delete;

 private:
  SpinPool* previous_;
};

// Threads the project's kernels share now, and whether handing them work is cheap (the spinning pool): the
// kernels split smaller work when it is.
int pool_threads();
bool pool_spins();

// fn(ctx, i) for i in [0, n) over the current pool's threads (inline, in order, without one).
void pool_parallel(void* ctx, void (*fn)(void*, int64_t), int64_t n);

}  // namespace cosmoes
