// SHA-256 (FIPS 180-4): a corrupt .pte can abort ExecuTorch's loader, so files are hashed before they are opened.
#include "sha256.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <algorithm>
#include <cstring>
#include <future>
#include <vector>

#include "errors.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#if defined(__linux__)
#include <sys/auxv.h>
#endif
#endif

namespace cosmoes {
namespace {

constexpr uint32_t kRound[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

void compress_portable(uint32_t st[8], const uint8_t* p, size_t blocks) {
  for (; blocks; --blocks, p += 64) {
    uint32_t w[64];
    for (int t = 0; t < 16; ++t)
      w[t] = (uint32_t(p[4 * t]) << 24) | (uint32_t(p[4 * t + 1]) << 16) | (uint32_t(p[4 * t + 2]) << 8) | p[4 * t + 3];
    for (int t = 16; t < 64; ++t) {
      uint32_t s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
      uint32_t s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
      w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    uint32_t a = st[0], b = st[1], c = st[2], d = st[3], e = st[4], f = st[5], g = st[6], h = st[7];
    for (int t = 0; t < 64; ++t) {
      uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + kRound[t] + w[t];
      uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    st[0] += a, st[1] += b, st[2] += c, st[3] += d, st[4] += e, st[5] += f, st[6] += g, st[7] += h;
  }
}

// The CPU's own SHA-256 instructions where it has them (x86 SHA extensions, Armv8 SHA2): several times the
// portable code's speed, which is most of the time a bundle takes to open (every byte is hashed before use).
#if defined(__x86_64__)
__attribute__((target("sha,sse4.1,ssse3"))) void compress_x86(uint32_t h[8], const uint8_t* p, size_t blocks) {
  const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
  // the instructions keep the state as (A, B, E, F) and (C, D, G, H)
  __m128i tmp = _mm_shuffle_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)), 0xB1);
  __m128i s1 = _mm_shuffle_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + 4)), 0x1B);
  __m128i s0 = _mm_alignr_epi8(tmp, s1, 8);
  s1 = _mm_blend_epi16(s1, tmp, 0xF0);
  for (; blocks; --blocks, p += 64) {
    const __m128i save0 = s0, save1 = s1;
    __m128i w[4];
    for (int i = 0; i < 16; ++i) {  // four rounds per step; w[i % 4] holds schedule words 4i..4i+3
      __m128i& m = w[i % 4];
      if (i < 4) {
        m = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * i)), bswap);
      } else {
        m = _mm_sha256msg1_epu32(m, w[(i + 1) % 4]);
        m = _mm_add_epi32(m, _mm_alignr_epi8(w[(i + 3) % 4], w[(i + 2) % 4], 4));
        m = _mm_sha256msg2_epu32(m, w[(i + 3) % 4]);
      }
      __m128i wk = _mm_add_epi32(m, _mm_loadu_si128(reinterpret_cast<const __m128i*>(kRound + 4 * i)));
      s1 = _mm_sha256rnds2_epu32(s1, s0, wk);
      s0 = _mm_sha256rnds2_epu32(s0, s1, _mm_shuffle_epi32(wk, 0x0E));
    }
    s0 = _mm_add_epi32(s0, save0);
    s1 = _mm_add_epi32(s1, save1);
  }
  tmp = _mm_shuffle_epi32(s0, 0x1B);
  s1 = _mm_shuffle_epi32(s1, 0xB1);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(h), _mm_blend_epi16(tmp, s1, 0xF0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(h + 4), _mm_alignr_epi8(s1, tmp, 8));
}

bool have_sha_instructions() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_SSE4_1) || !(c & bit_SSSE3)) return false;
  return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & (1u << 29));
}
#elif defined(__aarch64__) && (defined(__ARM_FEATURE_SHA2) || !defined(__clang__))
// GCC declares the intrinsics for a function with +crypto; clang (before 15 at least) only when the whole file is
// built for a CPU with SHA2, as for every Apple arm64 target: an NDK build for plain armv8-a keeps the portable code.
#define COSMOES_ARM_SHA 1
#if defined(__ARM_FEATURE_SHA2)
#define COSMOES_SHA2_TARGET
#else
#define COSMOES_SHA2_TARGET __attribute__((target("+crypto")))
#endif
COSMOES_SHA2_TARGET void compress_arm(uint32_t h[8], const uint8_t* p, size_t blocks) {
  uint32x4_t s0 = vld1q_u32(h), s1 = vld1q_u32(h + 4);
  for (; blocks; --blocks, p += 64) {
    const uint32x4_t save0 = s0, save1 = s1;
    uint32x4_t w[4];
    for (int i = 0; i < 4; ++i) w[i] = vreinterpretq_u32_u8(vrev32q_u8(vld1q_u8(p + 16 * i)));
    for (int i = 0; i < 16; ++i) {  // four rounds per step; w[i % 4] holds schedule words 4i..4i+3
      const uint32x4_t wk = vaddq_u32(w[i % 4], vld1q_u32(kRound + 4 * i));
      if (i < 12)  // the words four steps on
        w[i % 4] = vsha256su1q_u32(vsha256su0q_u32(w[i % 4], w[(i + 1) % 4]), w[(i + 2) % 4], w[(i + 3) % 4]);
      const uint32x4_t before = s0;
      s0 = vsha256hq_u32(s0, s1, wk);
      s1 = vsha256h2q_u32(s1, before, wk);
    }
    s0 = vaddq_u32(s0, save0);
    s1 = vaddq_u32(s1, save1);
  }
  vst1q_u32(h, s0);
  vst1q_u32(h + 4, s1);
}

bool have_sha_instructions() {
#if defined(__APPLE__)
  return true;  // every arm64 Apple CPU has the Armv8 SHA2 instructions
#elif defined(__linux__)
  return (getauxval(AT_HWCAP) & (1ul << 6)) != 0;  // HWCAP_SHA2
#else
  return false;
#endif
}
#else
[[maybe_unused]] bool have_sha_instructions() { return false; }
#endif

using Compress = void (*)(uint32_t*, const uint8_t*, size_t);

// COSMOES_SHA=portable keeps the portable code, cpu (or unset) takes the CPU's instructions where it has them (the
// tests check both against Python's hashlib); anything else is an error, not a silent default.
Compress pick_compress() {
  const char* forced = std::getenv("COSMOES_SHA");
  const std::string choice = forced ? forced : "";
  if (choice == "portable") return compress_portable;
  if (!choice.empty() && choice != "cpu")
    throw Error("COSMOES_SHA=" + choice.substr(0, 40) + " is not a choice: portable, or cpu (the default)");
#if defined(__x86_64__)
  if (have_sha_instructions()) return compress_x86;
#elif defined(COSMOES_ARM_SHA)
  if (have_sha_instructions()) return compress_arm;
#endif
  return compress_portable;
}

// Chosen on first use, so that a bad COSMOES_SHA is an error where a bundle is opened, not at program start.
Compress chosen_compress() {
  static const Compress chosen = pick_compress();
  return chosen;
}

void compress_blocks(uint32_t* h, const uint8_t* p, size_t blocks) { chosen_compress()(h, p, blocks); }

class Sha256 {
 public:
  void update(const uint8_t* p, size_t n) {
    total_ += n;
    if (fill_) {
      size_t take = std::min(n, sizeof block_ - fill_);
      std::memcpy(block_ + fill_, p, take);
      fill_ += take, p += take, n -= take;
      if (fill_ < sizeof block_) return;
      compress_blocks(h_, block_, 1);
      fill_ = 0;
    }
    compress_blocks(h_, p, n / 64);
    p += n / 64 * 64, n %= 64;
    std::memcpy(block_, p, n);
    fill_ = n;
  }

  std::string hex() {
    uint64_t bits = total_ * 8;
    uint8_t pad[72] = {0x80};
    size_t pad_len = (fill_ < 56 ? 56 - fill_ : 120 - fill_);
    update(pad, pad_len);
    uint8_t len[8];
    for (int k = 0; k < 8; ++k) len[k] = static_cast<uint8_t>(bits >> (56 - 8 * k));
    update(len, 8);
    char out[65];
    for (int k = 0; k < 8; ++k) std::snprintf(out + 8 * k, 9, "%08x", h_[k]);
    return std::string(out, 64);
  }

 private:
  uint32_t h_[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                    0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  uint8_t block_[64];
  size_t fill_ = 0;
  uint64_t total_ = 0;
};

}  // namespace

std::string sha256_file(const std::string& path) { return sha256_file_and_ranges(path, {}, nullptr); }

std::string sha256_file_and_ranges(const std::string& path, const std::vector<Range>& ranges,
                                   std::vector<std::string>* range_digests) {
  chosen_compress();  // a bad COSMOES_SHA throws here, before a file is open
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw Error("cannot read " + path);
  // one read of the file feeds the whole-file hash and the hash of whichever range the bytes fall in
  std::vector<size_t> order(ranges.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return ranges[a].offset < ranges[b].offset; });
  std::vector<Sha256> parts(ranges.size());
  Sha256 s;
  std::vector<uint8_t> buf(1 << 20);
  size_t n, next = 0;
  int64_t at = 0;
  while ((n = std::fread(buf.data(), 1, buf.size(), f)) > 0) {
    const int64_t end = at + static_cast<int64_t>(n);
    auto ranges_of_block = [&, at, end] {
      for (size_t k = next; k < order.size() && ranges[order[k]].offset < end; ++k) {
        const Range& r = ranges[order[k]];
        const int64_t lo = std::max(at, r.offset), hi = std::min(end, r.offset + r.bytes);
        if (hi > lo) parts[order[k]].update(buf.data() + (lo - at), static_cast<size_t>(hi - lo));
        if (r.offset + r.bytes <= end && k == next) ++next;  // ranges do not overlap: done with it
      }
    };
    // The segments' digests on a second thread while this one takes the file's: every expert byte is hashed
    // twice, and on a phone-size bundle that was 15 s of one core when a bundle opens.
    const bool beside = next < order.size() && ranges[order[next]].offset < end;
    std::future<void> ranges_done;
    if (beside) ranges_done = std::async(std::launch::async, ranges_of_block);
    s.update(buf.data(), n);
    if (beside) ranges_done.get();
    at = end;
  }
  bool failed = std::ferror(f);
  std::fclose(f);
  if (failed) throw Error("error reading " + path);
  if (range_digests) {
    range_digests->clear();
    for (auto& p : parts) range_digests->push_back(p.hex());
  }
  return s.hex();
}

}  // namespace cosmoes
