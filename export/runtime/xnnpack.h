// A validator of the XNNPACK delegate payloads of a .pte (see xnnpack.cpp for why), and the bounds-checked
// flatbuffer reader it shares with pte.cpp's operator-table check.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "errors.h"

namespace cosmoes {

// Bounds-checked reads of a little-endian flatbuffer; any offset past the end throws cosmoes::Error naming the file
// ("<path> is a corrupt ExecuTorch program: <context><why>").
class Flat {
 public:
  Flat(std::vector<uint8_t> bytes, std::string path, std::string context = "")
      : b_(std::move(bytes)), path_(std::move(path)), context_(std::move(context)) {}

  [[noreturn]] void fail(const std::string& why) const {
    throw Error(path_ + " is a corrupt ExecuTorch program: " + context_ + why);
  }
  uint64_t size() const { return b_.size(); }
  const std::string& path() const { return path_; }

  uint64_t read(uint64_t at, int n) const {
    if (at > b_.size() || n > static_cast<int>(b_.size() - at)) fail("an offset points past the data's end");
    uint64_t v = 0;
    for (int k = n - 1; k >= 0; --k) v = (v << 8) | b_[at + k];
    return v;
  }
  uint64_t root() const { return read(0, 4); }
  // The position of a table's field, 0 if the table leaves it out.
  uint64_t field(uint64_t table, int id) const {
    int64_t vtable = static_cast<int64_t>(table) - static_cast<int32_t>(read(table, 4));
    if (vtable < 0) fail("a table's vtable lies before the data");
    uint64_t slot = 4 + 2 * static_cast<uint64_t>(id);
    if (slot + 2 > read(vtable, 2)) return 0;
    uint64_t offset = read(vtable + slot, 2);
    return offset ? table + offset : 0;
  }
  // A scalar field of n bytes, or its default when the table leaves it out.
  uint64_t scalar(uint64_t table, int id, int n, uint64_t fallback = 0) const {
    uint64_t at = field(table, id);
    return at ? read(at, n) : fallback;
  }
  uint64_t follow(uint64_t at) const { return at + read(at, 4); }  // an offset field to what it points at
  // A table, vector or string field's target, 0 when the field is absent.
  uint64_t target(uint64_t table, int id) const {
    uint64_t at = field(table, id);
    return at ? follow(at) : 0;
  }
  uint64_t length(uint64_t vector) const { return read(vector, 4); }
  uint64_t element(uint64_t vector, uint64_t i) const { return follow(vector + 4 + 4 * i); }  // of tables/strings
  uint64_t item(uint64_t vector, uint64_t i, int n) const { return read(vector + 4 + n * i, n); }  // of scalars
  // A string field's C-string length (ExecuTorch reads it with c_str()), or -1 when the field is absent.
  int64_t c_length(uint64_t table, int id) const {
    uint64_t at = field(table, id);
    if (!at) return -1;
    uint64_t s = follow(at), n = length(s);
    uint64_t k = 0;
    while (k < n && read(s + 4 + k, 1) != 0) ++k;
    return static_cast<int64_t>(k);
  }
  uint64_t stored_length(uint64_t table, int id) const {
    uint64_t at = field(table, id);
    return at ? length(follow(at)) : 0;
  }
  // A string field's first `limit` bytes up to its first NUL (for messages and lookups).
  std::string string(uint64_t table, int id, int64_t limit = 80) const {
    int64_t n = c_length(table, id);
    std::string out;
    for (int64_t k = 0; k < n && k < limit; ++k) out += static_cast<char>(read(follow(field(table, id)) + 4 + k, 1));
    return out;
  }
  std::vector<uint8_t> slice(uint64_t at, uint64_t n) const {
    if (at > b_.size() || n > b_.size() - at) fail("an offset points past the data's end");
    return std::vector<uint8_t>(b_.begin() + at, b_.begin() + at + n);
  }
  // A string's stored bytes, NULs included (how ExecuTorch's named-data lookup compares keys).
  std::string bytes(uint64_t string_at) const {
    std::string out;
    for (uint64_t k = 0, n = length(string_at); k < n; ++k) out += static_cast<char>(read(string_at + 4 + k, 1));
    return out;
  }
  // Tables may share vectors: bound the walk, not just the bytes.
  void visit() {
    if (++visits_ > (uint64_t{1} << 24)) fail("its tables are too large to check");
  }

 private:
  std::vector<uint8_t> b_;
  std::string path_, context_;
  uint64_t visits_ = 0;
};

// Checks every XNNPACK delegate payload of the program whose flatbuffer is `program` (read from `path`, which the
// payloads in segments are read from) and throws cosmoes::Error, naming the file, method and value, when the graph
// asks XNNPACK to read constant data the payload or the program's named data does not hold, to plan tensors larger
// than this machine's memory, or to use ids, shapes or quantization parameters it would trust unchecked.
void check_xnnpack_delegates(Flat& program, const std::string& path);

}  // namespace cosmoes
