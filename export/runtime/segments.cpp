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

int64_t page_size() {
  static const int64_t page = static_cast<int64_t>(::sysconf(_SC_PAGESIZE));
  return page > 0 ? page : 4096;
}

}  // namespace

SegmentMap::SegmentMap(const std::string& path, int64_t bytes, bool cold)
    : path_(path), size_(static_cast<size_t>(bytes)) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error("cannot open the expert file " + path);
  struct stat st;
  if (::fstat(fd, &st) != 0 || st.st_size != bytes) {
    ::close(fd);
    throw Error("the expert file " + path + " changed size since its manifest was checked; re-export the bundle");
  }
  void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  if (cold && p != MAP_FAILED)
    fd_ = fd;
  else
    ::close(fd);
  if (p == MAP_FAILED) throw Error("cannot map the expert file " + path);
  base_ = static_cast<uint8_t*>(p);
  // an expert's pages, not a read-ahead window into the next expert's
  ::madvise(base_, size_, MADV_RANDOM);
}

SegmentMap::~SegmentMap() {
  if (base_) ::munmap(base_, size_);
  if (fd_ >= 0) ::close(fd_);
}

void SegmentMap::bring_in(int64_t offset, int64_t bytes) const {
  const int64_t page = page_size(), start = offset / page * page;
  // The mapping is MADV_RANDOM (no read-ahead into the next expert), so a cold segment would be read one 4 KB fault
  // at a time: 17-20 ms per 1 MB expert measured here, against 0.17 ms with the whole range asked for first
  // (docs/export.md). Warm, the request costs ~15 us.
  prefetch(offset, bytes);
  if (::madvise(base_ + start, static_cast<size_t>(offset + bytes - start), MADV_POPULATE_READ) == 0) return;
  volatile uint8_t sink = 0;
  for (int64_t at = start; at < offset + bytes; at += page) sink = sink + base_[at];
}

void SegmentMap::prefetch(int64_t offset, int64_t bytes) const {
  const int64_t page = page_size(), start = offset / page * page;
  ::madvise(base_ + start, static_cast<size_t>(offset + bytes - start), MADV_WILLNEED);
}

void SegmentMap::forget(int64_t offset, int64_t bytes) const {
  if (fd_ >= 0) ::posix_fadvise(fd_, offset, bytes, POSIX_FADV_DONTNEED);
}

void SegmentMap::give_back(int64_t offset, int64_t bytes) const {
  const int64_t page = page_size();
  const int64_t start = (offset + page - 1) / page * page, end = (offset + bytes) / page * page;
  if (end <= start) return;
  ::madvise(base_ + start, static_cast<size_t>(end - start), MADV_DONTNEED);
  if (fd_ >= 0) ::posix_fadvise(fd_, start, end - start, POSIX_FADV_DONTNEED);
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
