// cosmoes_pool_check: the runtime's spinning pool on its own, for the tests (every item of every job runs exactly
// once: workers awake or asleep, jobs of every size, two callers at once, pools made and dropped) and to time a
// job hand-off against ExecuTorch's pool.
//   cosmoes_pool_check stress THREADS JOBS     prints "ok" or the first miscount
//   cosmoes_pool_check latency THREADS JOBS    microseconds per job of THREADS empty items, both pools
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "pool.h"

namespace {

struct Counts {
  std::vector<std::atomic<int>> hits;
  explicit Counts(size_t n) : hits(n) {}
};

void hit(void* ctx, int64_t i) { static_cast<Counts*>(ctx)->hits[static_cast<size_t>(i)].fetch_add(1); }

// JOBS jobs of 1..300 items; every 16th after a pause longer than the spin, so the workers are woken from sleep.
bool jobs(cosmoes::SpinPool& pool, int count, unsigned seed) {
  std::mt19937 rng(seed);
  for (int j = 0; j < count; ++j) {
    const int64_t n = 1 + static_cast<int64_t>(rng() % 300);
    Counts c(static_cast<size_t>(n));
    if (j % 16 == 15) std::this_thread::sleep_for(std::chrono::microseconds(1500));
    pool.run(&c, hit, n);
    for (int64_t i = 0; i < n; ++i)
      if (c.hits[static_cast<size_t>(i)].load() != 1) {
        std::printf("job %d: item %lld of %lld ran %d times\n", j, static_cast<long long>(i),
                    static_cast<long long>(n), c.hits[static_cast<size_t>(i)].load());
        return false;
      }
  }
  return true;
}

int stress(int threads, int count) {
  {
    cosmoes::SpinPool pool(threads);
    if (!jobs(pool, count, 1)) return 1;
    bool ok[2] = {true, true};  // two callers share one pool: one gets it, the other runs inline
    std::thread other([&] { ok[1] = jobs(pool, count, 2); });
    ok[0] = jobs(pool, count, 3);
    other.join();
    if (!ok[0] || !ok[1]) return 1;
  }
  for (int i = 0; i < 20; ++i) {  // made, used once or not at all, dropped (workers asleep or spinning)
    cosmoes::SpinPool pool(threads);
    if (i % 2 && !jobs(pool, 3, static_cast<unsigned>(i))) return 1;
  }
  {
    cosmoes::SpinPool pool(threads);
    cosmoes::PoolScope scope(&pool);
    Counts c(7);
    cosmoes::pool_parallel(&c, hit, 7);
    for (auto& h : c.hits)
      if (h.load() != 1) return std::printf("pool_parallel: an item ran %d times\n", h.load()), 1;
  }
  if (cosmoes::pool_spins()) return std::printf("a scope outlived its end\n"), 1;
  std::printf("ok\n");
  return 0;
}

double per_job_us(int threads, int count) {
  Counts c(static_cast<size_t>(threads));
  auto t0 = std::chrono::steady_clock::now();
  for (int j = 0; j < count; ++j) cosmoes::pool_parallel(&c, [](void*, int64_t) {}, threads);
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / count;
}

int latency(int threads, int count) {
  auto* et = executorch::extension::threadpool::get_threadpool();
  if (et) et->_unsafe_reset_threadpool(static_cast<uint32_t>(threads));
  const double et_us = per_job_us(threads, count);
  cosmoes::SpinPool pool(threads);
  cosmoes::PoolScope scope(&pool);
  const double spin_us = per_job_us(threads, count);
  std::printf("threads %d  executorch pool %.2f us/job  spinning pool %.2f us/job\n", threads, et_us, spin_us);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4 || (std::string(argv[1]) != "stress" && std::string(argv[1]) != "latency")) {
    std::fprintf(stderr, "usage: cosmoes_pool_check stress|latency THREADS JOBS\n");
    return 2;
  }
  const int threads = std::atoi(argv[2]), count = std::atoi(argv[3]);
  if (threads < 1 || threads > 64 || count < 1) {
    std::fprintf(stderr, "error: THREADS must be 1..64 and JOBS >= 1\n");
    return 2;
  }
  return std::string(argv[1]) == "stress" ? stress(threads, count) : latency(threads, count);
}
