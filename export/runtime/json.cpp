// Recursive-descent JSON parser (RFC 8259) and string quoting; see json.h for why it exists.
#include "json.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace cosmoes::json {
namespace {

class Parser {
 public:
  explicit Parser(const std::string& text) : s_(text) {}

  Value document() {
    if (s_.size() > kMaxBytes)
      throw Error("JSON text of " + std::to_string(s_.size()) + " bytes exceeds the limit of " +
                  std::to_string(kMaxBytes));
    Value v = value(0);
    skip_ws();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  const std::string& s_;
  size_t i_ = 0;
  size_t values_ = 0;  // values parsed so far, against kMaxValues

  [[noreturn]] void fail(const std::string& why) const {
    throw Error("invalid JSON at byte " + std::to_string(i_) + ": " + why);
  }
  void skip_ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
  }
  char peek() {
    skip_ws();
    if (i_ >= s_.size()) fail("unexpected end");
    return s_[i_];
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++i_;
  }
  bool literal(const char* word) {
    size_t n = std::char_traits<char>::length(word);
    if (s_.compare(i_, n, word) != 0) return false;
    i_ += n;
    return true;
  }

  Value value(int depth) {
    if (depth > kMaxDepth) fail("nested deeper than " + std::to_string(kMaxDepth) + " levels");
    if (++values_ > kMaxValues) fail("more than " + std::to_string(kMaxValues) + " values");
    Value v;
    char c = peek();
    if (c == '{') {
      v.type = Value::Type::Object;
      ++i_;
      if (peek() == '}') return ++i_, v;
      while (true) {
        if (peek() != '"') fail("expected a key");
        std::string key = string();
        expect(':');
        // which of two values would count differs between readers; cosmoes' Python reader refuses them too
        if (v.object.count(key)) fail("duplicate key " + quote(key));
        v.object[key] = value(depth + 1);
        if (peek() == ',') { ++i_; continue; }
        expect('}');
        return v;
      }
    }
    if (c == '[') {
      v.type = Value::Type::Array;
      ++i_;
      if (peek() == ']') return ++i_, v;
      while (true) {
        v.array.push_back(value(depth + 1));
        if (peek() == ',') { ++i_; continue; }
        expect(']');
        return v;
      }
    }
    if (c == '"') {
      v.type = Value::Type::String;
      v.string = string();
      return v;
    }
    if (literal("true")) { v.type = Value::Type::Bool; v.boolean = true; return v; }
    if (literal("false")) { v.type = Value::Type::Bool; return v; }
    if (literal("null")) return v;
    v.type = Value::Type::Number;
    v.number = number();
    return v;
  }

  bool digit_at(size_t k) const { return k < s_.size() && s_[k] >= '0' && s_[k] <= '9'; }
  size_t digits(size_t k) const {
    while (digit_at(k)) ++k;
    return k;
  }

  // RFC 8259's number grammar, checked before strtod sees it: strtod alone also takes "inf", "nan", hex and "+1".
  double number() {
    size_t k = i_;
    if (k < s_.size() && s_[k] == '-') ++k;
    if (!digit_at(k)) fail("expected a value");
    k = s_[k] == '0' ? k + 1 : digits(k);
    if (k < s_.size() && s_[k] == '.') {
      if (!digit_at(k + 1)) fail("expected a digit after '.'");
      k = digits(k + 1);
    }
    if (k < s_.size() && (s_[k] == 'e' || s_[k] == 'E')) {
      ++k;
      if (k < s_.size() && (s_[k] == '+' || s_[k] == '-')) ++k;
      if (!digit_at(k)) fail("expected a digit in the exponent");
      k = digits(k);
    }
    std::string text = s_.substr(i_, k - i_);  // strtod stops at a NUL byte, which a std::string may hold
    double d = std::strtod(text.c_str(), nullptr);
    if (!std::isfinite(d)) fail("number out of range");
    i_ = k;
    return d;
  }

  unsigned hex4() {
    if (i_ + 4 > s_.size()) fail("short \\u escape");
    unsigned code = 0;
    for (int k = 0; k < 4; ++k) {
      char h = s_[i_++];
      code <<= 4;
      if (h >= '0' && h <= '9') code |= h - '0';
      else if (h >= 'a' && h <= 'f') code |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') code |= h - 'A' + 10;
      else fail("bad \\u escape");
    }
    return code;
  }

  static void utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  // \uXXXX, or a surrogate pair of two: a lone or reversed surrogate is not a character, so it is refused.
  unsigned escaped_code_point() {
    unsigned cp = hex4();
    if (cp >= 0xDC00 && cp < 0xE000) fail("lone low surrogate in \\u escape");
    if (cp < 0xD800 || cp >= 0xDC00) return cp;
    if (s_.compare(i_, 2, "\\u") != 0) fail("lone high surrogate in \\u escape");
    i_ += 2;
    unsigned low = hex4();
    if (low < 0xDC00 || low >= 0xE000) fail("high surrogate without its low half in \\u escape");
    return 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
  }

  // One multi-byte UTF-8 character copied as is; overlong forms, surrogates and code points past U+10FFFF are not
  // UTF-8 (RFC 3629), so they are refused rather than passed on to file names and messages.
  void utf8_sequence(std::string& out) {
    const auto byte = [&](size_t k) { return k < s_.size() ? static_cast<unsigned char>(s_[k]) : 0u; };
    unsigned lead = byte(i_), n = lead >= 0xF0 ? 3 : lead >= 0xE0 ? 2 : lead >= 0xC0 ? 1 : 0;
    if (n == 0 || lead > 0xF4) fail("invalid UTF-8");
    unsigned cp = lead & (0x3F >> n);
    for (unsigned k = 1; k <= n; ++k) {
      if ((byte(i_ + k) & 0xC0) != 0x80) fail("invalid UTF-8");
      cp = (cp << 6) | (byte(i_ + k) & 0x3F);
    }
    static const unsigned kMin[] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp < 0xE000)) fail("invalid UTF-8");
    out.append(s_, i_, n + 1);
    i_ += n + 1;
  }

  std::string string() {
    expect('"');
    std::string out;
    while (true) {
      if (i_ >= s_.size()) fail("unterminated string");
      unsigned char c = static_cast<unsigned char>(s_[i_]);
      if (c == '"') return ++i_, out;
      if (c < 0x20) fail("control character in a string");
      if (c >= 0x80) { utf8_sequence(out); continue; }
      ++i_;
      if (c != '\\') { out += static_cast<char>(c); continue; }
      if (i_ >= s_.size()) fail("unterminated escape");
      char e = s_[i_++];
      switch (e) {
        case '"': case '\\': case '/': out += e; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': utf8(out, escaped_code_point()); break;
        default: fail("bad escape");
      }
    }
  }
};

const char* type_name(Value::Type t) {
  switch (t) {
    case Value::Type::Null: return "null";
    case Value::Type::Bool: return "a boolean";
    case Value::Type::Number: return "a number";
    case Value::Type::String: return "a string";
    case Value::Type::Array: return "an array";
    case Value::Type::Object: return "an object";
  }
  return "?";
}

}  // namespace

const Value& Value::at(const std::string& key) const {
  if (type != Type::Object) throw Error("expected an object holding '" + key + "'");
  auto it = object.find(key);
  if (it == object.end()) throw Error("missing key '" + key + "'");
  return it->second;
}

double Value::as_number(const std::string& what) const {
  if (type != Type::Number) throw Error("'" + what + "' should be a number, found " + type_name(type));
  return number;
}

int64_t Value::as_int(const std::string& what) const {
  double d = as_number(what);
  if (d != std::floor(d)) throw Error("'" + what + "' should be an integer");
  // casting a double outside int64's range is undefined behaviour, and past 2^53 it is no longer exact anyway
  if (std::fabs(d) > kMaxExactInt) throw Error("'" + what + "' is out of range");
  return static_cast<int64_t>(d);
}

const std::string& Value::as_string(const std::string& what) const {
  if (type != Type::String) throw Error("'" + what + "' should be a string, found " + type_name(type));
  return string;
}

bool Value::as_bool(const std::string& what) const {
  if (type != Type::Bool) throw Error("'" + what + "' should be a boolean, found " + type_name(type));
  return boolean;
}

Value parse(const std::string& text) { return Parser(text).document(); }

std::string describe(const Value& v) {
  if (v.type == Value::Type::Bool) return v.boolean ? "true" : "false";
  if (v.type == Value::Type::Number) {
    char buf[32];
    if (v.number == std::floor(v.number) && std::fabs(v.number) <= kMaxExactInt)
      std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(v.number));
    else
      std::snprintf(buf, sizeof buf, "%.17g", v.number);
    return buf;
  }
  if (v.type == Value::Type::String)
    return v.string.size() <= 80 ? quote(v.string) : quote(v.string.substr(0, 77)) + "...";
  return type_name(v.type);
}

std::string quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

}  // namespace cosmoes::json
