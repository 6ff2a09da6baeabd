// Process memory (RSS now and peak; phys_footprint on Apple) and the machine's read bandwidths, for the bench stats.
#pragma once

#include <cstdint>
#include <string>

namespace cosmoes {

struct Memory {
  double rss_mb = 0;   // resident now (Linux/Android VmRSS; Apple phys_footprint)
  double peak_mb = 0;  // high-water mark (Linux/Android VmHWM; Apple ledger_phys_footprint_peak)
  // Linux/Android: rss_mb split into anonymous memory (packed weights, arenas, the heap) and pages of mapped files
  // (weights read in place, the runtime's libraries); -1 where the system does not say (Apple)
  double anon_mb = -1, file_mb = -1;
};

Memory process_memory();

// Sequential read bandwidth of RAM in GB/s: `threads` threads summing a buffer of `mb` MB (best of 3 passes).
double memory_read_gbps(int threads, int mb = 256);

// Read throughput of a file in MB/s through read(2) (whatever the page cache holds counts as read).
double file_read_mbps(const std::string& path, int64_t max_bytes);

}  // namespace cosmoes
