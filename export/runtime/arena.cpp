// LazyArena: planned buffers as anonymous mappings, resident only once touched (see arena.h).
#include "arena.h"

#include <sys/mman.h>
#include <unistd.h>

#include <executorch/runtime/core/hierarchical_allocator.h>
#include <executorch/runtime/core/span.h>

#include "errors.h"

namespace cosmoes {

using executorch::runtime::HierarchicalAllocator;
using executorch::runtime::Span;

struct LazyArena::Planned {
  std::vector<Span<uint8_t>> spans;
  std::unique_ptr<HierarchicalAllocator> allocator;
};

LazyArena::LazyArena(const std::vector<int64_t>& sizes) : planned_(std::make_unique<Planned>()) {
  for (int64_t size : sizes) {
    Buffer b;
    b.size = size;
    if (size > 0) {
      // NORESERVE: no swap or commit charge is taken for pages never written (most of a long context's KV cache)
      void* p = ::mmap(nullptr, static_cast<size_t>(size), PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) {
        unmap_all();
        throw Error("cannot reserve " + std::to_string(size / 1000000) + " MB of address space for the model's "
                    "activation buffers");
      }
      b.data = static_cast<uint8_t*>(p);
    }
    buffers_.push_back(b);
    planned_->spans.emplace_back(b.data, static_cast<size_t>(b.size));
  }
  planned_->allocator = std::make_unique<HierarchicalAllocator>(
      Span<Span<uint8_t>>(planned_->spans.data(), planned_->spans.size()));
}

LazyArena::~LazyArena() { unmap_all(); }

void LazyArena::unmap_all() {
  for (auto& b : buffers_)
    if (b.data) ::munmap(b.data, static_cast<size_t>(b.size));
  buffers_.clear();
}

HierarchicalAllocator* LazyArena::planned() { return planned_->allocator.get(); }

int64_t LazyArena::reserved_bytes() const {
  int64_t total = 0;
  for (const auto& b : buffers_) total += b.size;
  return total;
}

int64_t LazyArena::resident_bytes() const {
  int64_t total = 0;
  for (size_t id = 0; id < buffers_.size(); ++id) total += resident_bytes(id);
  return total;
}

int64_t LazyArena::resident_bytes(size_t id) const {
  if (id >= buffers_.size() || !buffers_[id].data) return 0;
  const Buffer& b = buffers_[id];
  const int64_t page = ::sysconf(_SC_PAGE_SIZE);
  std::vector<unsigned char> in_core(static_cast<size_t>((b.size + page - 1) / page), 0);
  if (::mincore(b.data, static_cast<size_t>(b.size), in_core.data()) != 0) return 0;
  int64_t total = 0;
  for (unsigned char c : in_core) total += (c & 1) ? page : 0;
  return total;
}

}  // namespace cosmoes
