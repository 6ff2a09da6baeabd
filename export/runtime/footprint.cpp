// Resident memory by kind: /proc/self/status and /proc/self/smaps readers and the per-kind load account.
#include "footprint.h"

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

namespace cosmoes {

double anon_rss_mb() {
#if defined(__APPLE__)
  return -1;
#else
  // smaps_rollup counts the pages themselves; /proc/self/status' RssAnon is a per-CPU-batched counter that can be a
  // few hundred KB off, as much as a small expert's packed weights
  for (const char* file : {"/proc/self/smaps_rollup", "/proc/self/status"}) {
    FILE* f = std::fopen(file, "r");
    if (!f) continue;
    char line[256];
    double mb = -1;
    long kb = 0;
    while (std::fgets(line, sizeof line, f))
      if (std::sscanf(line, "Anonymous: %ld kB", &kb) == 1 || std::sscanf(line, "RssAnon: %ld kB", &kb) == 1)
        mb = kb * 1024 / 1e6;
    std::fclose(f);
    if (mb >= 0) return mb;
  }
  return -1;
#endif
}

namespace {

std::string real_path_or_same(const std::string& path) {
  char buf[PATH_MAX];
  return ::realpath(path.c_str(), buf) ? std::string(buf) : path;
}

// The file of a /proc/self/maps or smaps header line ("start-end perms offset dev inode [path]"), "" for none.
std::string mapped_path(const char* line) {
  const char* slash = std::strchr(line, '/');
  if (!slash) return "";
  std::string path(slash);
  while (!path.empty() && (path.back() == '\n' || path.back() == ' ')) path.pop_back();
  return path;
}

}  // namespace

std::vector<double> mapped_file_rss_mb(const std::vector<std::string>& paths) {
  std::vector<double> out(paths.size(), -1);
#if !defined(__APPLE__)
  std::vector<std::string> real;
  for (const auto& p : paths) real.push_back(real_path_or_same(p));
  FILE* f = std::fopen("/proc/self/smaps", "r");
  if (!f) return out;
  for (auto& v : out) v = 0;
  char line[PATH_MAX + 256];
  int current = -1;  // index into paths of the mapping being read, -1 for any other mapping
  while (std::fgets(line, sizeof line, f)) {
    long kb = 0;
    if (std::sscanf(line, "Rss: %ld kB", &kb) == 1) {
      if (current >= 0) out[current] += kb * 1024 / 1e6;
      continue;
    }
    // a mapping's header: "start-end perms offset dev inode [path]"; field lines start with a capital letter
    if (!std::strchr(line, '-') || (line[0] >= 'A' && line[0] <= 'Z')) continue;
    current = -1;
    const std::string path = mapped_path(line);
    for (size_t i = 0; i < real.size() && !path.empty(); ++i)
      if (path == real[i]) current = static_cast<int>(i);
  }
  std::fclose(f);
#endif
  return out;
}

int64_t read_in_place_without_readahead(const std::string& path) {
  int64_t advised = 0;
#if defined(__linux__)
  const std::string real = real_path_or_same(path);
  FILE* f = std::fopen("/proc/self/maps", "r");
  if (!f) return 0;
  char line[PATH_MAX + 256];
  while (std::fgets(line, sizeof line, f)) {
    unsigned long start = 0, end = 0;
    if (std::sscanf(line, "%lx-%lx", &start, &end) != 2 || end <= start || mapped_path(line) != real) continue;
    if (::madvise(reinterpret_cast<void*>(start), end - start, MADV_RANDOM) == 0)
      advised += static_cast<int64_t>(end - start);
  }
  std::fclose(f);
#else
  (void)path;
#endif
  return advised;
}

void forget_cached_pages(const std::string& path) {
#if defined(__linux__)
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
#else
  (void)path;
#endif
}

void LoadAccount::add(const std::string& kind, double mb) {
  if (mb < 0) mb = 0;  // memory another thread or the allocator gave back meanwhile
  for (auto& [k, v] : by_kind_)
    if (k == kind) {
      v += mb;
      return;
    }
  by_kind_.emplace_back(kind, mb);
}

double LoadAccount::mb(const std::string& kind) const {
  for (const auto& [k, v] : by_kind_)
    if (k == kind) return v;
  return 0;
}

std::string method_kind(const std::string& method) {
  if (method == "embed") return "embedding";
  if (method == "head") return "head";
  if (method.size() > 4 && method.compare(method.size() - 4, 4, "_ffn") == 0) return "dense_ffn";
  return "attention";  // context (RoPE tables, causal bias) and layer_i
}

}  // namespace cosmoes
