// The bundle's tokenizer in C++: pytorch/tokenizers' HFTokenizer (the library ExecuTorch's LLM runner uses) over
// the bundle's tokenizer.json, plus what a streaming front end needs around it: special tokens left out of the text,
// and bytes held back until they complete a UTF-8 character.
#pragma once

#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace cosmoes {

class Tokenizer {
 public:
  // `path`: a tokenizer.json, or a directory holding one. Throws cosmoes::Error naming the file.
  explicit Tokenizer(const std::string& path);
  ~Tokenizer();

  std::vector<int64_t> encode(const std::string& text, bool add_bos) const;
  // The bytes of one token (a piece of UTF-8, possibly partial); "" for a special token.
  std::string token_bytes(int64_t id) const;
  // Text of a whole sequence as Python's `tokenizer.decode(ids, skip_special_tokens=True)` gives it.
  std::string decode(const std::vector<int64_t>& ids) const;
  int64_t bos() const { return bos_; }
  int64_t eos() const { return eos_; }
  int64_t vocab_size() const { return vocab_size_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::set<int64_t> special_;
  int64_t bos_ = -1, eos_ = -1, vocab_size_ = 0;
};

// Turns token bytes into text pieces that never end inside a UTF-8 character. Invalid sequences become U+FFFD, one
// per maximal invalid subpart (as Python's and Rust's lossy decoders do), so the pieces joined equal the whole
// sequence's decoded text.
class Utf8Stream {
 public:
  // The text completed by `bytes` (may be "").
  std::string push(const std::string& bytes);
  // What is left at the end of the sequence (an unfinished character becomes U+FFFD).
  std::string finish();

 private:
  std::string pending_;
};

// Whether `text` is valid UTF-8 (prompts and options are checked before use).
bool is_utf8(const std::string& text);

}  // namespace cosmoes
