// The mapped expert file and the expert FFN over a segment (int4 kernels); see segments.h.
#include "segments.h"

#include <algorithm>
#include <cmath>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "errors.h"

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  // Linux 5.14; older kernels answer EINVAL and the pages are read one by one
#endif

namespace cosmoes {

namespace {

// Drops a file range from the page cache (cold runs). Darwin has no posix_fadvise: there a cold run's evicted
// experts stay cached, and only the first load of each reads storage.
void drop_from_cache(int fd, int64_t offset, size_t length) {
#if defined(POSIX_FADV_DONTNEED)
  if (fd >= 0) ::posix_fadvise(fd, static_cast<off_t>(offset), static_cast<off_t>(length), POSIX_FADV_DONTNEED);
#else
  (void)fd, (void)offset, (void)length;
#endif
}

int64_t page_size() {
  static const int64_t page = static_cast<int64_t>(::sysconf(_SC_PAGESIZE));
  return page > 0 ? page : 4096;
}

}  // namespace

SegmentMap::SegmentMap(const std::string& path, int64_t bytes, const std::vector<int64_t>& offsets,
                       int64_t segment_bytes, bool cold)
    : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error("cannot open the expert file " + path);
  struct stat st;
  if (::fstat(fd, &st) != 0 || st.st_size != bytes) {
    ::close(fd);
    throw Error("the expert file " + path + " changed size since its manifest was checked; re-export the bundle");
  }
  try {
    map_segments(fd, offsets, segment_bytes);
  } catch (...) {  // no destructor runs for a half-built object: give back what was mapped
    if (reserved_) ::munmap(reserved_, reserved_size_);
    ::close(fd);
    throw;
  }
#if defined(__APPLE__)
  const bool keep_fd = true;  // give_back maps a segment afresh
#else
  const bool keep_fd = cold;
#endif
  if (keep_fd)
    fd_ = fd;
  else
    ::close(fd);
  cold_ = cold;
}

// Each segment its own mapping, a page of reserved address space between two: the kernel cannot merge them, so a
// fault (which maps a whole large folio of the page cache where it fits in the mapping) or fault-around never maps a
// neighbouring expert's pages, whatever folio sizes the page cache holds.
void SegmentMap::map_segments(int fd, const std::vector<int64_t>& offsets, int64_t segment_bytes) {
  const int64_t page = page_size();
  std::vector<int64_t> sorted(offsets);
  std::sort(sorted.begin(), sorted.end());
  size_t total = 0;
  for (int64_t offset : sorted) {
    const int64_t start = offset / page * page, end = (offset + segment_bytes + page - 1) / page * page;
    pages_shared_ = pages_shared_ || start != offset;
    slots_.push_back({offset, start, static_cast<size_t>(end - start), nullptr});
    total += static_cast<size_t>(end - start + page);
  }
  void* r = ::mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (r == MAP_FAILED) throw Error("cannot reserve address space for the expert file " + path_);
  reserved_ = static_cast<uint8_t*>(r);
  reserved_size_ = total;
  uint8_t* at = reserved_;
  for (Slot& s : slots_) {
    void* p = ::mmap(at, s.length, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, static_cast<off_t>(s.file_start));
    if (p == MAP_FAILED) throw Error("cannot map the expert file " + path_);
    s.base = static_cast<uint8_t*>(p);
    // an expert's pages, not a read-ahead window beyond them
    ::madvise(s.base, s.length, MADV_RANDOM);
    at += s.length + page;
  }
}

SegmentMap::~SegmentMap() {
  if (reserved_) ::munmap(reserved_, reserved_size_);
  if (fd_ >= 0) ::close(fd_);
}

const SegmentMap::Slot& SegmentMap::slot(int64_t offset) const {
  auto it = std::lower_bound(slots_.begin(), slots_.end(), offset,
                             [](const Slot& s, int64_t o) { return s.offset < o; });
  if (it == slots_.end() || it->offset != offset)
    throw Error("no expert segment at offset " + std::to_string(offset) + " of " + path_);
  return *it;
}

const uint8_t* SegmentMap::at(int64_t offset) const {
  const Slot& s = slot(offset);
  return s.base + (offset - s.file_start);
}

void SegmentMap::bring_in(int64_t offset) const {
  const Slot& s = slot(offset);
  // The mapping is MADV_RANDOM (no read-ahead), so a cold segment would be read one 4 KB fault at a time: 17-20 ms
  // per 1 MB expert measured here, against 0.17 ms with the whole range asked for first (docs/export.md). Warm, the
  // request costs ~15 us.
  prefetch(offset);
  if (::madvise(s.base, s.length, MADV_POPULATE_READ) == 0) return;
  volatile uint8_t sink = 0;
  for (size_t at = 0; at < s.length; at += static_cast<size_t>(page_size())) sink = sink + s.base[at];
}

void SegmentMap::prefetch(int64_t offset) const {
  const Slot& s = slot(offset);
  ::madvise(s.base, s.length, MADV_WILLNEED);
}

void SegmentMap::forget(int64_t offset) const {
  const Slot& s = slot(offset);
  if (cold_) drop_from_cache(fd_, s.file_start, s.length);
}

void SegmentMap::give_back(int64_t offset) const {
  const Slot& s = slot(offset);
#if defined(__APPLE__)
  // Darwin's MADV_DONTNEED only lowers the pages' priority ("reads from this address range will not incur a page
  // fault"): they stay mapped and resident. Mapping the range afresh drops them from this process, and the file's
  // cached pages stay for a warm reload. Should that fail, the old mapping stands and the pages are only deprioritised.
  void* p = ::mmap(s.base, s.length, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd_, static_cast<off_t>(s.file_start));
  if (p == MAP_FAILED) ::madvise(s.base, s.length, MADV_DONTNEED);
  else ::madvise(s.base, s.length, MADV_RANDOM);
#else
  ::madvise(s.base, s.length, MADV_DONTNEED);
#endif
  if (cold_) drop_from_cache(fd_, s.file_start, s.length);
}

namespace {

// One linear over fp32 input rows: quantise them (per token, int8), then the int4 matrix's rows over the pool.
void apply(const MatrixLayout& l, const uint8_t* segment, const float* x, int64_t N, float* out, ExpertScratch& s,
           ParallelFor parallel, int64_t threads) {
  s.q.resize(static_cast<size_t>(N * l.padded));
  s.sa.resize(static_cast<size_t>(N));
  int4::quantize(x, N, l.in, l.padded, s.q.data(), s.sa.data());
  int4::linear_parallel({segment + l.nibbles_at, reinterpret_cast<const float*>(segment + l.scales_at), l.rows,
                         l.padded, l.group},
                        s.q.data(), s.sa.data(), N, out, parallel, threads);
}

}  // namespace

void run_expert(const std::vector<MatrixLayout>& layout, bool wd, const uint8_t* segment, const float* x_ND,
                int64_t N, float* y_ND, ExpertScratch& s, ParallelFor parallel, int64_t threads) {
  threads = std::max<int64_t>(1, threads);
  auto lin = [&](const MatrixLayout& l, const float* in, std::vector<float>& out) {
    out.resize(static_cast<size_t>(N * l.rows));
    apply(l, segment, in, N, out.data(), s, parallel, threads);
  };
  // w1 and w3 (each down then up when weight-decomposed), then silu(y1) * y3, then w2
  std::vector<float>& t = s.t;
  auto project = [&](size_t first, std::vector<float>& out) {
    if (!wd) return lin(layout[first], x_ND, out);
    lin(layout[first], x_ND, t);
    lin(layout[first + 1], t.data(), out);
  };
  project(0, s.a);
  project(wd ? 2 : 1, s.b);
  s.h.resize(s.a.size());
  int4::silu_mul(s.a.data(), s.b.data(), s.h.data(), static_cast<int64_t>(s.a.size()));
  const MatrixLayout& last = layout.back();
  if (wd) {
    lin(layout[4], s.h.data(), t);
    apply(last, segment, t.data(), N, y_ND, s, parallel, threads);
  } else {
    apply(last, segment, s.h.data(), N, y_ND, s, parallel, threads);
  }
}

}  // namespace cosmoes
