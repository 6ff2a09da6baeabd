// Memory-planned buffers (KV caches, activations) that cost memory only as they are used (issue #20).
//
// ExecuTorch's Module allocates each shared arena as a zero-filled std::vector: every page of a 2,048-position KV
// cache is resident from load, before the first token. Here each buffer is an anonymous private mapping instead:
// the kernel hands out zero pages on first touch, so resident memory grows with the positions actually filled and
// the activations of the chunk actually run, and mincore() says how much of it is resident.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace executorch::runtime {
class HierarchicalAllocator;
}

namespace cosmoes {

class LazyArena {
 public:
  // One mapping per planned buffer id, of the given sizes in bytes (0 = unused id). Throws cosmoes::Error if the
  // address space cannot be reserved.
  explicit LazyArena(const std::vector<int64_t>& sizes);
  ~LazyArena();
  LazyArena(const LazyArena&) = delete;
  LazyArena& operator=(const LazyArena&) = delete;

  // The planned memory every method of one program loads with, so they all see the same KV caches.
  executorch::runtime::HierarchicalAllocator* planned();
  int64_t reserved_bytes() const;
  int64_t resident_bytes() const;  // pages touched so far (mincore)
  int64_t resident_bytes(size_t id) const;  // of one buffer id (0 for an unused or unknown id)

 private:
  struct Buffer {
    uint8_t* data = nullptr;
    int64_t size = 0;
  };
  std::vector<Buffer> buffers_;
  struct Planned;
  std::unique_ptr<Planned> planned_;
  void unmap_all();
};

}  // namespace cosmoes
