// A small JSON reader for manifest.json and a writer helper for the statistics line.
//
// The runtime reads one trusted-format file per bundle, so a full JSON library would be a build dependency on
// every target (NDK, Xcode) for ~150 lines of work; this parser accepts RFC 8259 JSON and throws
// cosmoes::Error with the byte offset on anything else.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "errors.h"

namespace cosmoes::json {

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
  int64_t as_int(const std::string& what) const;
  double as_number(const std::string& what) const;
  const std::string& as_string(const std::string& what) const;
  bool as_bool(const std::string& what) const;
};

Value parse(const std::string& text);

// JSON string literal with escapes, for writing.
std::string quote(const std::string& s);

}  // namespace cosmoes::json
