// ExecuTorch's thread pool (the one its XNNPACK methods use) for the project's own kernels: no second set of threads.
#pragma once

#include <cstddef>
#include <cstdint>

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

// fn(ctx, i) for i in [0, n) over the pool's threads (inline, in order, without a pool).
inline void pool_parallel(void* ctx, void (*fn)(void*, int64_t), int64_t n) {
  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (!pool || n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(ctx, i);
    return;
  }
  pool->run([&](size_t i) { fn(ctx, static_cast<int64_t>(i)); }, static_cast<size_t>(n));
}

}  // namespace cosmoes
