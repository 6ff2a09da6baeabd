// A small JSON reader for manifest.json and a writer helper for the statistics line.
//
// The runtime reads one small file per bundle, so a full JSON library would be a build dependency on every target
// (NDK, Xcode) for ~200 lines of work; this parser accepts RFC 8259 JSON in UTF-8 and throws cosmoes::Error with
// the byte offset on anything else. A bundle may come from anywhere, so the parser also bounds what a hostile
// file can cost: its size, its nesting (recursion depth) and its number of values (memory).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "errors.h"

namespace cosmoes::json {

constexpr size_t kMaxBytes = 16u << 20;   // 16 MiB: a 1024-layer x 64-expert manifest is ~10 MB pretty-printed
constexpr int kMaxDepth = 64;             // manifest.json nests 4 deep; the recursion stays far from the stack limit
constexpr size_t kMaxValues = 1u << 20;   // ~1M values (~200 MB at worst); a 65536-expert manifest has ~400K
constexpr double kMaxExactInt = 9007199254740992.0;  // 2^53: larger doubles are not exact integers

class Value {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  Type type = Type::Null;
  bool boolean = false;
  double number = 0.0;
  std::string string;
  std::vector<Value> array;
  std::map<std::string, Value> object;

  bool is_null() const { return type == Type::Null; }
  bool has(const std::string& key) const {
    return type == Type::Object && object.count(key) > 0;
  }
  // Accessors throw cosmoes::Error naming the key, so a malformed manifest is one clear line.
  const Value& at(const std::string& key) const;
  int64_t as_int(const std::string& what) const;  // an integer within +-2^53, else throws
  double as_number(const std::string& what) const;
  const std::string& as_string(const std::string& what) const;
  bool as_bool(const std::string& what) const;
};

Value parse(const std::string& text);

// A value as an error message shows it: numbers and short strings literally, containers by kind.
std::string describe(const Value& v);

// JSON string literal with escapes, for writing.
std::string quote(const std::string& s);

}  // namespace cosmoes::json
