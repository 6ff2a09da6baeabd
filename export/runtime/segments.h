// Experts as data (§3.4.2–3.4.3): the int4 segments of experts.bin mapped once and used in place by the project's
// kernels (int4.h). A resident expert is its segment's pages in this process: loading brings them in, eviction gives
// them back, and nothing is copied or re-packed (cosmoes/export/segments.py writes the file).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "bundle.h"
#include "int4.h"

namespace cosmoes {

using int4::ParallelFor;

// experts.bin mapped read-only (private), each segment its own mapping: only brought-in segments are resident. A
// segment is named by its offset in the file (the manifest's).
class SegmentMap {
 public:
  // cold: eviction also drops the segment's bytes from the page cache (posix_fadvise), so every load reads storage;
  // the cold figure next to the warm one, as a phone whose page cache is under pressure sees it.
  SegmentMap(const std::string& path, int64_t bytes, const std::vector<int64_t>& offsets, int64_t segment_bytes,
             bool cold = false);
  ~SegmentMap();
  SegmentMap(const SegmentMap&) = delete;
  SegmentMap& operator=(const SegmentMap&) = delete;

  const uint8_t* at(int64_t offset) const;
  // Makes the segment's pages resident: the whole range read in large requests (MADV_WILLNEED), then mapped in one
  // call (MADV_POPULATE_READ; a read of each page where the kernel has none), so a load costs the reading of its
  // bytes and the kernels never fault.
  void bring_in(int64_t offset) const;
  // Asks the kernel to start reading the segment into the page cache (MADV_WILLNEED): the reading goes on while the
  // caller computes, and a bring_in of it later finds its pages there. Not free: on cold pages the call allocates
  // them and submits the reads itself (~0.1 ms per 1 MB expert here; a thread of its own measured no better, as the
  // woken thread preempts the caller), ~8 us when they are cached.
  void prefetch(int64_t offset) const;
  // Cold only: drops the segment's bytes from the page cache (a prefetch that went unused must not make a later
  // load warm). Pages this process has mapped stay.
  void forget(int64_t offset) const;
  // Gives the segment's pages back (MADV_DONTNEED on its mapping; on Darwin, where that leaves them mapped, the
  // range mapped afresh): its RSS goes, the page cache keeps the bytes for a warm reload (unless cold).
  void give_back(int64_t offset) const;
  const std::string& path() const { return path_; }
  // Whether some segment starts inside a page (a bundle aligned below this system's page size: 4 KB-aligned on a
  // 16 KB-page phone): its first and last pages then hold a neighbour's bytes, which stay resident with it.
  bool pages_shared() const { return pages_shared_; }

 private:
  struct Slot {
    int64_t offset;      // the segment's, in the file
    int64_t file_start;  // its mapping's: the offset rounded down to a page
    size_t length;       // whole pages
    uint8_t* base;
  };
  void map_segments(int fd, const std::vector<int64_t>& offsets, int64_t segment_bytes);
  const Slot& slot(int64_t offset) const;

  std::string path_;
  std::vector<Slot> slots_;  // by offset
  uint8_t* reserved_ = nullptr;
  size_t reserved_size_ = 0;
  int fd_ = -1;  // kept open when cold (Linux, Android) and always on Darwin (see give_back)
  bool cold_ = false;
  bool pages_shared_ = false;
};

// Scratch of the expert FFN, reused across calls (no allocation per token once grown).
struct ExpertScratch {
  std::vector<int8_t> q;
  std::vector<float> sa, a, b, h, t;
};

// y_ND = the SwiGLU expert of `segment` applied to x_ND (N tokens of width dim), int8 activations x int4 weights;
// the same arithmetic as cosmoes/int4.py expert_ffn, so both runtimes pick the same tokens.
void run_expert(const std::vector<MatrixLayout>& layout, bool wd, const uint8_t* segment, const float* x_ND,
                int64_t N, float* y_ND, ExpertScratch& s, ParallelFor parallel, int64_t threads);

}  // namespace cosmoes
