// The runtime's spinning thread pool and the choice between it and ExecuTorch's for the project's kernels.
#include "pool.h"

#include <algorithm>

namespace cosmoes {
namespace {

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

using Clock = std::chrono::steady_clock;

thread_local SpinPool* t_pool = nullptr;

}  // namespace

SpinPool::SpinPool(int threads, std::chrono::microseconds spin) : spin_(spin) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { work(); });
}

SpinPool::~SpinPool() {
  {
    std::lock_guard<std::mutex> lock(sleep_mutex_);
    stop_.store(true);
    state_.fetch_add(uint64_t{1} << (2 * kBits));  // a new generation wakes every worker to see stop_
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

bool SpinPool::claim_and_run(uint64_t generation) {
  uint64_t s = state_.load(std::memory_order_acquire);
  for (;;) {
    const uint64_t n = (s >> kBits) & kMask, i = s & kMask;
    if (gen(s) != generation || i >= n) return false;
    if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
      fn_(ctx_, static_cast<int64_t>(i));
      done_.fetch_add(1, std::memory_order_release);
      return true;
    }
  }
}

void SpinPool::run(void* ctx, Fn fn, int64_t n) {
  std::unique_lock<std::mutex> only(run_mutex_, std::try_to_lock);
  if (!only.owns_lock() || workers_.empty() || n <= 1 || n > static_cast<int64_t>(kMask)) {
    for (int64_t i = 0; i < n; ++i) fn(ctx, i);
    return;
  }
  // Every item of the last job is done, so no worker reads ctx_ / fn_ now: a late one fails its claim first.
  ctx_ = ctx, fn_ = fn;
  done_.store(0, std::memory_order_relaxed);
  const uint64_t generation = (gen(state_.load(std::memory_order_relaxed)) + 1) & kGenMask;
  state_.store((generation << (2 * kBits)) | (static_cast<uint64_t>(n) << kBits), std::memory_order_seq_cst);
  if (sleeping_.load(std::memory_order_seq_cst) > 0) {
    { std::lock_guard<std::mutex> lock(sleep_mutex_); }
    wake_.notify_all();
  }
  while (claim_and_run(generation)) {
  }
  for (int spins = 0; done_.load(std::memory_order_acquire) < n; ++spins)
    spins < 4096 ? relax() : std::this_thread::yield();  // a worker preempted inside its item
}

void SpinPool::work() {
  uint64_t seen = 0;  // the generation at construction, not at this thread's start: a job may come first
  for (;;) {
    auto until = Clock::now() + spin_;
    uint64_t g;
    for (unsigned k = 1; (g = gen(state_.load(std::memory_order_acquire))) == seen; ++k) {
      relax();
      if (k % 256 == 0 && Clock::now() > until) {
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        sleeping_.fetch_add(1, std::memory_order_seq_cst);
        wake_.wait(lock, [&] { return gen(state_.load(std::memory_order_seq_cst)) != seen || stop_.load(); });
        sleeping_.fetch_sub(1, std::memory_order_seq_cst);
        until = Clock::now() + spin_;
      }
    }
    if (stop_.load()) return;
    seen = g;
    while (claim_and_run(g)) {
    }
  }
}

PoolScope::PoolScope(SpinPool* pool) : previous_(t_pool) { t_pool = pool; }

PoolScope::~PoolScope() { t_pool = previous_; }

bool pool_spins() { return t_pool != nullptr; }

int pool_threads() {
  if (t_pool) return t_pool->threads();
  auto* pool = executorch::extension::threadpool::get_threadpool();
  return pool ? std::max(1, static_cast<int>(pool->get_thread_count())) : 1;
}

void pool_parallel(void* ctx, void (*fn)(void*, int64_t), int64_t n) {
  if (t_pool) return t_pool->run(ctx, fn, n);
  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (!pool || n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(ctx, i);
    return;
  }
  pool->run([&](size_t i) { fn(ctx, static_cast<int64_t>(i)); }, static_cast<size_t>(n));
}

}  // namespace cosmoes
