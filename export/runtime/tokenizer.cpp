// The bundle's tokenizer (pytorch/tokenizers' HFTokenizer) and the UTF-8 streaming around it; see tokenizer.h.
//
// Only this file includes the library's headers: they pull in nlohmann/json and re2 declarations, which the rest
// of the runtime (and every app that links libcosmoes) need not see.
#include "tokenizer.h"

#include <sys/stat.h>

#include <pytorch/tokenizers/hf_tokenizer.h>

#include "errors.h"

namespace cosmoes {

struct Tokenizer::Impl {
  tokenizers::HFTokenizer hf;
};

namespace {

std::string json_path(const std::string& path) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) throw Error("tokenizer not found: " + path);
  if (S_ISDIR(st.st_mode)) return path + "/tokenizer.json";
  return path;
}

}  // namespace

Tokenizer::Tokenizer(const std::string& path) : impl_(new Impl) {
  const std::string file = json_path(path);
  struct stat st {};
  if (stat(file.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) throw Error("no tokenizer.json at " + file);
  if (impl_->hf.load(file) != tokenizers::Error::Ok)
    throw Error(file + " is not a tokenizer.json this runtime can read (a Hugging Face BPE tokenizer)");
  bos_ = static_cast<int64_t>(impl_->hf.bos_tok());
  eos_ = static_cast<int64_t>(impl_->hf.eos_tok());
  vocab_size_ = impl_->hf.vocab_size();
  if (vocab_size_ < 1) throw Error(file + " has an empty vocabulary");
  // Special tokens (begin/end of text, padding, ...) are the ids whose text disappears when specials are skipped
  // (every other token decodes to at least one byte). One pass: ~5 ms per 1000 ids here.
  std::vector<uint64_t> one(1);
  for (int64_t id = 0; id < vocab_size_; ++id) {
    one[0] = static_cast<uint64_t>(id);
    auto skipped = impl_->hf.decode(one, true);
    if (skipped.ok() && skipped.get().empty()) special_.insert(id);
  }
}

Tokenizer::~Tokenizer() = default;

std::vector<int64_t> Tokenizer::encode(const std::string& text, bool add_bos) const {
  if (!is_utf8(text)) throw Error("the text is not valid UTF-8");
  auto ids = impl_->hf.encode(text, add_bos ? 1 : 0, 0);
  if (!ids.ok()) throw Error("the tokenizer could not encode the text");
  return std::vector<int64_t>(ids.get().begin(), ids.get().end());
}

std::string Tokenizer::token_bytes(int64_t id) const {
  if (id < 0 || id >= vocab_size_) throw Error("token id " + std::to_string(id) + " is outside the vocabulary");
  if (special_.count(id)) return "";
  // The streaming decode (previous id, id) gives the token's raw bytes, a partial character included. The previous
  // id only matters after begin-of-text, where some decoders strip a leading space: the byte-level decoder of
  // cosmoes' tokenizers keeps it, as Python's decode does, so no real previous id is needed.
  auto piece = impl_->hf.decode(static_cast<uint64_t>(eos_), static_cast<uint64_t>(id));
  if (!piece.ok()) throw Error("the tokenizer could not decode token " + std::to_string(id));
  return piece.get();
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids) const {
  Utf8Stream stream;
  std::string text;
  for (int64_t id : ids) text += stream.push(token_bytes(id));
  return text + stream.finish();
}

namespace {

const char kReplacement[] = "\xEF\xBF\xBD";  // U+FFFD

// The length of the UTF-8 character a lead byte starts (0: not a lead byte) and the range its second byte must be
// in (RFC 3629's table: no overlong forms, no surrogates, nothing past U+10FFFF).
int sequence(unsigned char b, unsigned char& lo, unsigned char& hi) {
  lo = 0x80, hi = 0xBF;
  if (b < 0x80) return 1;
  if (b >= 0xC2 && b <= 0xDF) return 2;
  if (b == 0xE0) return lo = 0xA0, 3;
  if (b == 0xED) return hi = 0x9F, 3;
  if (b >= 0xE1 && b <= 0xEF) return 3;
  if (b == 0xF0) return lo = 0x90, 4;
  if (b == 0xF4) return hi = 0x8F, 4;
  if (b >= 0xF1 && b <= 0xF3) return 4;
  return 0;
}

// Appends the valid text of `in` to `out` (U+FFFD for each maximal invalid subpart); returns how many bytes were
// used. Unless `final`, an unfinished character at the end is left for the next call.
size_t scan(const std::string& in, bool final, std::string& out) {
  size_t i = 0;
  while (i < in.size()) {
    unsigned char lo, hi;
    int n = sequence(static_cast<unsigned char>(in[i]), lo, hi);
    if (n == 0) {
      out += kReplacement, ++i;
      continue;
    }
    int k = 1;
    for (; k < n && i + k < in.size(); ++k) {
      unsigned char c = static_cast<unsigned char>(in[i + k]);
      if (c < (k == 1 ? lo : 0x80) || c > (k == 1 ? hi : 0xBF)) break;
    }
    if (k == n) {
      out.append(in, i, n), i += n;
    } else if (i + k == in.size() && !final) {
      break;  // a character still in progress
    } else {
      out += kReplacement, i += k;
    }
  }
  return i;
}

}  // namespace

std::string Utf8Stream::push(const std::string& bytes) {
  pending_ += bytes;
  std::string out;
  pending_.erase(0, scan(pending_, false, out));
  return out;
}

std::string Utf8Stream::finish() {
  std::string out;
  scan(pending_, true, out);
  pending_.clear();
  return out;
}

bool is_utf8(const std::string& text) {
  std::string out;
  scan(text, true, out);
  return out == text;  // nothing was replaced
}

}  // namespace cosmoes
