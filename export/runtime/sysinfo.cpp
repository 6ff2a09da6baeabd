// Memory and bandwidth probes for the statistics line (no ExecuTorch involved).
#include "sysinfo.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__APPLE__)
#include <mach/mach.h>
#endif

namespace cosmoes {
namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

Memory process_memory() {
  Memory m;
#if defined(__APPLE__)
  task_vm_info_data_t info;
  mach_msg_type_number_t count = TASK_VM_INFO_COUNT;
  if (task_info(mach_task_self(), TASK_VM_INFO, reinterpret_cast<task_info_t>(&info), &count) == KERN_SUCCESS) {
    m.rss_mb = info.phys_footprint / 1e6;
    m.peak_mb = info.ledger_phys_footprint_peak / 1e6;
  }
#else
  FILE* f = std::fopen("/proc/self/status", "r");
  if (!f) return m;
  char line[256];
  while (std::fgets(line, sizeof line, f)) {
    long kb = 0;
    if (std::sscanf(line, "VmRSS: %ld kB", &kb) == 1) m.rss_mb = kb * 1024 / 1e6;
    if (std::sscanf(line, "VmHWM: %ld kB", &kb) == 1) m.peak_mb = kb * 1024 / 1e6;
    if (std::sscanf(line, "RssAnon: %ld kB", &kb) == 1) m.anon_mb = kb * 1024 / 1e6;
    if (std::sscanf(line, "RssFile: %ld kB", &kb) == 1) m.file_mb = kb * 1024 / 1e6;
  }
  std::fclose(f);
#endif
  return m;
}

double memory_read_gbps(int threads, int mb) {
  threads = std::max(1, threads);
  const size_t n = static_cast<size_t>(mb) * (1 << 20) / sizeof(uint64_t);
  std::vector<uint64_t> buf(n);
  for (size_t i = 0; i < n; ++i) buf[i] = i;  // touch every page before timing
  double best = 0;
  for (int pass = 0; pass < 3; ++pass) {
    std::vector<uint64_t> sums(threads);
    std::vector<std::thread> pool;
    auto t0 = std::chrono::steady_clock::now();
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        size_t lo = n * t / threads, hi = n * (t + 1) / threads;
        uint64_t a = 0, b = 0, c = 0, d = 0;
        for (size_t i = lo; i + 4 <= hi; i += 4) a += buf[i], b += buf[i + 1], c += buf[i + 2], d += buf[i + 3];
        sums[t] = a + b + c + d;
      });
    for (auto& th : pool) th.join();
    double s = seconds_since(t0);
    volatile uint64_t sink = 0;
    for (uint64_t v : sums) sink = sink + v;  // keeps the loads from being optimised away
    best = std::max(best, n * sizeof(uint64_t) / s / 1e9);
  }
  return best;
}

double file_read_mbps(const std::string& path, int64_t max_bytes) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return 0;
  std::vector<char> buf(1 << 20);
  int64_t total = 0;
  auto t0 = std::chrono::steady_clock::now();
  ssize_t got;
  while (total < max_bytes && (got = ::read(fd, buf.data(), buf.size())) > 0) total += got;
  double s = seconds_since(t0);
  ::close(fd);
  return s > 0 ? total / s / 1e6 : 0;
}

}  // namespace cosmoes
