// Resident memory by kind (embedding, attention, head, experts, KV cache, activations), anonymous and file-backed
// apart (issue #20): what a device must hold for a bundle, as `cosmoes bench` and the apps report it.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace cosmoes {

struct KindBytes {
  std::string kind;
  double anon_mb = 0, file_mb = 0;
};

// Anonymous resident memory of this process in MB (Linux/Android: /proc/self/smaps_rollup), -1 where the system
// does not say.
double anon_rss_mb();

// Resident pages of each file's mappings in this process, in MB (Linux/Android /proc/self/smaps), in the order of
// `paths` (compared after realpath); -1 each where the system does not say.
std::vector<double> mapped_file_rss_mb(const std::vector<std::string>& paths);

// Turns off read-ahead on this process' mappings of `path` (madvise MADV_RANDOM), so that looking up a row of a
// table read in place (the embedding) brings in its own page, not the kernel's read-ahead window around it (up to
// hundreds of KB per lookup). Returns the bytes advised; 0 where the system has no such mappings or call.
int64_t read_in_place_without_readahead(const std::string& path);

// Drops the page cache's copy of `path` (posix_fadvise DONTNEED), so that the pages a later mapping faults in come in
// one per row looked up. Hashing the file reads all of it, and the kernel caches such reads in large folios, each
// of which a fault maps whole: an embedding lookup then costs hundreds of KB of RSS instead of one page.
void forget_cached_pages(const std::string& path);

// Packed weights of the methods loaded so far, by kind: the rise of anonymous memory across each load_method.
class LoadAccount {
 public:
  // Runs `load` and charges the anonymous memory it added to `kind`.
  template <typename F>
  auto charge(const std::string& kind, F&& load) {
    double before = anon_rss_mb();
    auto result = load();
    add(kind, anon_rss_mb() - before);
    return result;
  }
  void add(const std::string& kind, double mb);
  double mb(const std::string& kind) const;

 private:
  std::vector<std::pair<std::string, double>> by_kind_;
};

// The kind of a backbone method's weights, as in the manifest's non_expert_bytes: embed -> embedding,
// context/layer_i -> attention, layer_i_ffn -> dense_ffn, head -> head.
std::string method_kind(const std::string& method);

}  // namespace cosmoes
