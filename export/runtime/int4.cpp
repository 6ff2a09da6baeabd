// The int4 expert kernels: a scalar reference and AVX2 / AVX-VNNI / AVX-512-VNNI / NEON-dotprod versions of it, each
// compiled for its own instruction set (function target attributes) and picked at run time; see int4.h. Every SIMD
// kernel is one panel of 16 rows times a tile of up to 4 tokens: a GEMV for decode, a small-M GEMM for prefill;
// silu_mul is the SwiGLU gate in SIMD double lanes.
#include "int4.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define COSMOES_X86 1
#elif defined(__aarch64__)
#include <arm_neon.h>
#if defined(__linux__)
#include <sys/auxv.h>
#endif
#define COSMOES_ARM64 1
#endif

#include "errors.h"

namespace cosmoes::int4 {

namespace {

void check(const Matrix& w, int64_t N, int64_t r0, int64_t r1) {
  if (w.group <= 0 || w.group % 32 || w.cols <= 0 || w.cols % w.group || w.rows <= 0 || N < 0 || r0 < 0 ||
      r1 > w.rows || r0 > r1 || r0 % kPanel)
    throw Error("int4 linear: bad shape (rows " + std::to_string(w.rows) + ", cols " + std::to_string(w.cols) +
                ", group " + std::to_string(w.group) + ", rows " + std::to_string(r0) + ".." + std::to_string(r1) + ")");
}

// The signed value of row r, column k (the layout of int4.h).
int32_t weight(const Matrix& w, int64_t r, int64_t k) {
  const uint8_t b = w.nibbles[(r / kPanel) * kPanel * (w.cols / 2) + (k / 8) * (kPanel * 4) + (r % kPanel) * 4 + k % 4];
  return static_cast<int32_t>((k % 8) < 4 ? (b & 0xF) : (b >> 4)) - 8;
}

void scalar_rows(const Matrix& w, const int8_t* q, const float* sa, int64_t N, float* y, int64_t r0, int64_t r1) {
  const int64_t G = w.cols / w.group, srows = stored_rows(w.rows);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t n = 0; n < N; ++n) {
      const int8_t* a = q + n * w.cols;
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        int32_t isum = 0;
        for (int64_t k = g * w.group; k < (g + 1) * w.group; ++k) isum += a[k] * weight(w, r, k);
        const float part = static_cast<float>(isum) * w.scales[g * srows + r];
        acc = acc + part;
      }
      y[n * w.rows + r] = acc * sa[n];
    }
}

// What every SIMD kernel shares: a panel of 16 rows times a tile of MT tokens (MT <= kTile), written to 16 floats
// per token at out + t * ostride. The weights of a panel are unpacked once per 8 columns and used for all MT tokens,
// so prefill reads each weight once per tile, not once per token.
struct PanelArgs {
  const uint8_t* panel;   // the panel's nibbles
  const float* scales;    // scales of its first row in group 0 (row stride srows)
  int64_t srows, G, chunks;  // chunks of 8 columns per group
  const int8_t* a;        // the tile's first token; token t at a + t * cols
  int64_t cols;
  const int32_t* asum;    // the tile's first token's group sums; token t at asum + t * G
  const float* sa;
  float* out;
  int64_t ostride;
};

// (AVX-512 tiles of 8 tokens measured no faster than 4 on Zen 4: dpbusd throughput, not the unpacking, bounds them.)
constexpr int kTile = 4;

int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#if COSMOES_X86
// Bytes ahead of the weight stream to prefetch: a layer's projections are ~100 kB streams, too short for the hardware
// prefetcher to ramp up, and it stops at every 4 kB page (prefetches past the end of the matrix never fault).
// Into L2: L1 has too few fill buffers to hold that many lines in flight. Measured on the Xeon host (wearable-moe
// decode): 1 kB into L1 -6 % of the kernels' time, 2 kB into L2 -10 %, 4 kB into L2 -7 %.
constexpr int64_t kPrefetch = 2048;
// A panel's scales are one line per group, a row of the scale matrix apart: those of the panel two ahead.
constexpr int64_t kScalePrefetch = 2 * kPanel;

// 16 rows in one zmm: lane i is row i, and a 4-byte broadcast of the activations makes dpbusd add row i's four
// products to lane i, so no horizontal sums are needed.
template <int MT>
__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni"))) void avx512vnni_panel(const PanelArgs& p) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm512_setzero_ps();
  const uint8_t* at = p.panel;
  for (int64_t g = 0; g < p.G; ++g) {
    // low and high nibbles into separate sums: 2 * MT independent dpbusd chains hide its latency. The nibbles'
    // zero point (stored as q + 8) starts the low sum at -8 * the group's activation sum (exact in int32).
    __m512i s[MT][2];
    for (int t = 0; t < MT; ++t) {
      s[t][0] = _mm512_set1_epi32(-8 * p.asum[t * p.G + g]);
      s[t][1] = _mm512_setzero_si512();
    }
    // groups are whole multiples of 32 columns: blocks of 4 chunks, unrolled so the sums stay in registers
    for (int64_t c = 0, k = g * p.chunks * 8; c < p.chunks; c += 4, k += 32, at += 256) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        _mm_prefetch(reinterpret_cast<const char*>(at + kPrefetch + 64 * u), _MM_HINT_T1);
        const __m512i v = _mm512_loadu_si512(at + 64 * u);
        const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int t = 0; t < MT; ++t) {
          const int8_t* a = p.a + t * p.cols + k + 8 * u;
          s[t][0] = _mm512_dpbusd_epi32(s[t][0], lo, _mm512_set1_epi32(load4(a)));
          s[t][1] = _mm512_dpbusd_epi32(s[t][1], hi, _mm512_set1_epi32(load4(a + 4)));
        }
      }
    }
    _mm_prefetch(reinterpret_cast<const char*>(p.scales + g * p.srows + kScalePrefetch), _MM_HINT_T1);
    const __m512 sc = _mm512_loadu_ps(p.scales + g * p.srows);
    for (int t = 0; t < MT; ++t)
      acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s[t][0], s[t][1])), sc));
  }
  for (int t = 0; t < MT; ++t) _mm512_storeu_ps(p.out + t * p.ostride, _mm512_mul_ps(acc[t], _mm512_set1_ps(p.sa[t])));
}

// 8 rows per ymm (the panel's two halves side by side). AVX2 has no dpbusd: maddubs gives int16 pair sums (at most
// 2 * 15 * 127 per pair, so the low- and high-nibble halves add in int16 without saturating), madd by 1 the int32.
#define COSMOES_X86_PANEL(NAME, TARGET, DOT2)                                                                   \
  template <int MT>                                                                                             \
  __attribute__((target(TARGET))) void NAME(const PanelArgs& p) {                                               \
    const __m256i low = _mm256_set1_epi8(0x0F);                                                                 \
    const __m256i ones = _mm256_set1_epi16(1);                                                                  \
    (void)ones;                                                                                                 \
    __m256 acc[MT][2];                                                                                          \
    for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();                                   \
    const uint8_t* at = p.panel;                                                                                \
    for (int64_t g = 0; g < p.G; ++g) {                                                                         \
      __m256i s[MT][2]; /* starting at the zero point's share, as in avx512vnni_panel */                       \
      for (int t = 0; t < MT; ++t) s[t][0] = s[t][1] = _mm256_set1_epi32(-8 * p.asum[t * p.G + g]);            \
      for (int64_t c = 0, k = g * p.chunks * 8; c < p.chunks; c += 4, k += 32, at += 256) {                    \
        _Pragma("GCC unroll 4") for (int u = 0; u < 4; ++u) {                                                   \
          _mm_prefetch(reinterpret_cast<const char*>(at + kPrefetch + 64 * u), _MM_HINT_T1);                   \
          for (int h = 0; h < 2; ++h) {                                                                         \
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at + 64 * u + 32 * h));       \
            const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);   \
            for (int t = 0; t < MT; ++t) {                                                                      \
              const int8_t* a = p.a + t * p.cols + k + 8 * u;                                                   \
              DOT2(s[t][h], lo, _mm256_set1_epi32(load4(a)), hi, _mm256_set1_epi32(load4(a + 4)));              \
            }                                                                                                   \
          }                                                                                                     \
        }                                                                                                       \
      }                                                                                                         \
      _mm_prefetch(reinterpret_cast<const char*>(p.scales + g * p.srows + kScalePrefetch), _MM_HINT_T1);       \
      for (int h = 0; h < 2; ++h) {                                                                             \
        const __m256 sc = _mm256_loadu_ps(p.scales + g * p.srows + 8 * h);                                      \
        for (int t = 0; t < MT; ++t)                                                                            \
          acc[t][h] = _mm256_add_ps(acc[t][h], _mm256_mul_ps(_mm256_cvtepi32_ps(s[t][h]), sc));                 \
      }                                                                                                         \
    }                                                                                                           \
    for (int t = 0; t < MT; ++t)                                                                                \
      for (int h = 0; h < 2; ++h)                                                                               \
        _mm256_storeu_ps(p.out + t * p.ostride + 8 * h, _mm256_mul_ps(acc[t][h], _mm256_set1_ps(p.sa[t])));     \
  }

#define COSMOES_DOT2_AVX2(acc, lo, alo, hi, ahi) \
  acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, alo), _mm256_maddubs_epi16(hi, ahi)), ones))
#define COSMOES_DOT2_AVXVNNI(acc, lo, alo, hi, ahi) \
  acc = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(acc, lo, alo), hi, ahi)

COSMOES_X86_PANEL(avx2_panel, "avx2,fma", COSMOES_DOT2_AVX2)
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 || defined(__clang__) && __clang_major__ >= 12
#define COSMOES_HAVE_AVXVNNI 1
COSMOES_X86_PANEL(avxvnni_panel, "avx2,fma,avxvnni", COSMOES_DOT2_AVXVNNI)
#endif
#endif  // COSMOES_X86

#if COSMOES_ARM64
// 4 rows per q register, signed nibbles (q = nibble - 8) times signed int8 activations: sdot by lane adds row i's
// four products to lane i, with the activations' 4 bytes picked by lane index (no broadcast, no group sums).
template <int MT>
__attribute__((target("arch=armv8.2-a+dotprod"))) void neondot_panel(const PanelArgs& p) {
  const uint8x16_t low = vdupq_n_u8(0x0F);
  const int8x16_t eight = vdupq_n_s8(8);
  for (int quarter = 0; quarter < 4; quarter += 2) {  // 8 rows at a time keeps MT x 2 int and float sums in registers
    float32x4_t acc[MT][2];
    for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = vdupq_n_f32(0.f);
    const uint8_t* at = p.panel + 16 * quarter;
    for (int64_t g = 0; g < p.G; ++g) {
      int32x4_t s[MT][2];
      for (int t = 0; t < MT; ++t) s[t][0] = s[t][1] = vdupq_n_s32(0);
      for (int64_t c = 0, k = g * p.chunks * 8; c < p.chunks; ++c, k += 8, at += 64) {
        int8x16_t lo[2], hi[2];
        for (int h = 0; h < 2; ++h) {
          const uint8x16_t v = vld1q_u8(at + 16 * h);
          lo[h] = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, low)), eight);
          hi[h] = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), eight);
        }
        for (int t = 0; t < MT; ++t) {
          const int8x8_t a = vld1_s8(p.a + t * p.cols + k);
          for (int h = 0; h < 2; ++h) {
            s[t][h] = vdotq_lane_s32(s[t][h], lo[h], a, 0);
            s[t][h] = vdotq_lane_s32(s[t][h], hi[h], a, 1);
          }
        }
      }
      for (int h = 0; h < 2; ++h) {
        const float32x4_t sc = vld1q_f32(p.scales + g * p.srows + 4 * (quarter + h));
        for (int t = 0; t < MT; ++t) acc[t][h] = vaddq_f32(acc[t][h], vmulq_f32(vcvtq_f32_s32(s[t][h]), sc));
      }
    }
    for (int t = 0; t < MT; ++t)
      for (int h = 0; h < 2; ++h)
        vst1q_f32(p.out + t * p.ostride + 4 * (quarter + h), vmulq_f32(acc[t][h], vdupq_n_f32(p.sa[t])));
  }
}
#endif

// Activation quantisation: per token s = max|x| / 127 and q = round-half-even(x / s) clamped to +-127. Each SIMD
// family supplies the max and a rounded prefix; `quantize_rows` does the rest with the scalar formula, so every
// family keeps the reference's bits (true division, round-half-even). At 16 tokens x 1280 columns the scalar loop (a
// libm nearbyint per value) took longer than the int4 products themselves.
int8_t quantize_one(float v, float s) {
  return static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(v / s))));
}

// amax(row, in) -> max |row[k]|; round(row, in, s, out) -> how many leading values it wrote (out[k], k < that)
template <typename Amax, typename Round>
void quantize_rows(const float* x, int64_t N, int64_t in, int64_t padded, int8_t* q, float* sa, Amax amax,
                   Round round) {
  for (int64_t n = 0; n < N; ++n) {
    const float* row = x + n * in;
    const float s = amax(row, in) / 127.0f;
    sa[n] = s;
    int8_t* out = q + n * padded;
    int64_t k = 0;
    if (s > 0.f)
      for (k = round(row, in, s, out); k < in; ++k) out[k] = quantize_one(row[k], s);
    std::fill(out + k, out + padded, int8_t{0});
  }
}

float amax_scalar(const float* row, int64_t k, int64_t in, float m) {
  for (; k < in; ++k) m = std::max(m, std::fabs(row[k]));
  return m;
}

#if COSMOES_X86
__attribute__((target("avx2,fma"))) float amax_avx2(const float* row, int64_t in) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= in; k += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(row + k)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float amax = 0.f;
  for (float v : lanes) amax = std::max(amax, v);
  return amax_scalar(row, k, in, amax);
}

__attribute__((target("avx2,fma"))) int64_t round_avx2(const float* row, int64_t in, float s, int8_t* out) {
  const __m256 hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f), sv = _mm256_set1_ps(s);
  int64_t k = 0;
  for (; k + 8 <= in; k += 8) {
    __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(row + k), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i i = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, v)));
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + k), _mm_packs_epi16(w, w));
  }
  return k;
}

// Σ of each group's activations, per token: dpbusd multiplies unsigned by signed bytes, so the x86 kernels take the
// nibbles as stored (q + 8) and subtract 8 Σa (the NEON kernels subtract the 8 from the nibbles instead).
__attribute__((target("avx2,fma"))) void group_sums_avx2(const int8_t* q, int64_t N, int64_t cols, int64_t group,
                                                         int32_t* asum) {
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  const int64_t G = cols / group;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      __m256i s = _mm256_setzero_si256();
      for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + n * cols + k));
        s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, v), ones16));
      }
      alignas(32) int32_t lanes[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), s);
      int32_t total = 0;
      for (int32_t v : lanes) total += v;
      asum[n * G + g] = total;
    }
}
#endif

#if COSMOES_ARM64
__attribute__((target("arch=armv8.2-a+dotprod"))) float amax_neon(const float* row, int64_t in) {
  float32x4_t m = vdupq_n_f32(0.f);
  int64_t k = 0;
  for (; k + 4 <= in; k += 4) m = vmaxq_f32(m, vabsq_f32(vld1q_f32(row + k)));
  return amax_scalar(row, k, in, std::max(0.f, vmaxvq_f32(m)));
}

__attribute__((target("arch=armv8.2-a+dotprod"))) int64_t round_neon(const float* row, int64_t in, float s,
                                                                     int8_t* out) {
  const float32x4_t hi = vdupq_n_f32(127.f), lo = vdupq_n_f32(-127.f), sv = vdupq_n_f32(s);
  int64_t k = 0;
  for (; k + 8 <= in; k += 8) {
    int32x4_t i[2];
    for (int h = 0; h < 2; ++h)
      i[h] = vcvtq_s32_f32(vminq_f32(hi, vmaxq_f32(lo, vrndnq_f32(vdivq_f32(vld1q_f32(row + k + 4 * h), sv)))));
    vst1_s8(out + k, vmovn_s16(vcombine_s16(vmovn_s32(i[0]), vmovn_s32(i[1]))));
  }
  return k;
}
#endif

// silu(a) * b over n values, silu in double and rounded once to float as the scalar reference does, but with e^x
// computed in SIMD lanes (glibc's exp was a call per value, more time than the expert's products in prefill).
// e^x: x = n ln2 + r (Cody-Waite, ln2 in two parts), e^r by its Taylor series to degree 13 (truncation < 5e-18,
// so the double is within an ulp of the exact value and the float rounding agrees with the reference's). x is
// clamped to [-708, 709]: below, 1 + e^x rounds to 1 exactly as it would unclamped, and 2^n stays normal; above
// (v < -709) the reference's d / (1 + inf) is d * 0 (-0, or NaN for -inf), which the kernels write directly.
constexpr double kExpLo = -708.0, kExpHi = 709.0, kLog2e = 1.4426950408889634, kLn2Hi = 0x1.62e42fefa39efp-1,
                 kLn2Lo = 0x1.abc9e3b39803fp-56, kShifter = 0x1.8p52;
constexpr double kInvFact[14] = {1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040,
                                 1.0 / 40320, 1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600,
                                 1.0 / 6227020800};

void silu_mul_scalar(const float* a, const float* b, float* h, int64_t from, int64_t n) {
  for (int64_t i = from; i < n; ++i) h[i] = silu(a[i]) * b[i];
}

#if COSMOES_X86
__attribute__((target("avx512f"))) void silu_mul_avx512(const float* a, const float* b, float* h, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m512d d = _mm512_cvtps_pd(_mm256_loadu_ps(a + i)), neg = _mm512_sub_pd(_mm512_setzero_pd(), d);
    // min/max with the constant first keep a NaN
    const __m512d x = _mm512_max_pd(_mm512_set1_pd(kExpLo), _mm512_min_pd(_mm512_set1_pd(kExpHi), neg));
    const __m512d t = _mm512_fmadd_pd(x, _mm512_set1_pd(kLog2e), _mm512_set1_pd(kShifter));
    const __m512d k = _mm512_sub_pd(t, _mm512_set1_pd(kShifter));
    __m512d r = _mm512_fnmadd_pd(k, _mm512_set1_pd(kLn2Hi), x);
    r = _mm512_fnmadd_pd(k, _mm512_set1_pd(kLn2Lo), r);
    __m512d p = _mm512_set1_pd(kInvFact[13]);
    for (int c = 12; c >= 0; --c) p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(kInvFact[c]));
    const __m512i bits = _mm512_sub_epi64(_mm512_castpd_si512(t), _mm512_castpd_si512(_mm512_set1_pd(kShifter)));
    const __m512d scale = _mm512_castsi512_pd(_mm512_slli_epi64(_mm512_add_epi64(bits, _mm512_set1_epi64(1023)), 52));
    __m512d s = _mm512_div_pd(d, _mm512_add_pd(_mm512_set1_pd(1.0), _mm512_mul_pd(p, scale)));
    s = _mm512_mask_mul_pd(s, _mm512_cmp_pd_mask(neg, _mm512_set1_pd(kExpHi), _CMP_GT_OQ), d, _mm512_setzero_pd());
    _mm256_storeu_ps(h + i, _mm256_mul_ps(_mm512_cvtpd_ps(s), _mm256_loadu_ps(b + i)));
  }
  silu_mul_scalar(a, b, h, i, n);
}

__attribute__((target("avx2,fma"))) void silu_mul_avx2(const float* a, const float* b, float* h, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m256d d = _mm256_cvtps_pd(_mm_loadu_ps(a + i)), neg = _mm256_sub_pd(_mm256_setzero_pd(), d);
    const __m256d x = _mm256_max_pd(_mm256_set1_pd(kExpLo), _mm256_min_pd(_mm256_set1_pd(kExpHi), neg));
    const __m256d t = _mm256_fmadd_pd(x, _mm256_set1_pd(kLog2e), _mm256_set1_pd(kShifter));
    const __m256d k = _mm256_sub_pd(t, _mm256_set1_pd(kShifter));
    __m256d r = _mm256_fnmadd_pd(k, _mm256_set1_pd(kLn2Hi), x);
    r = _mm256_fnmadd_pd(k, _mm256_set1_pd(kLn2Lo), r);
    __m256d p = _mm256_set1_pd(kInvFact[13]);
    for (int c = 12; c >= 0; --c) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(kInvFact[c]));
    const __m256i bits = _mm256_sub_epi64(_mm256_castpd_si256(t), _mm256_castpd_si256(_mm256_set1_pd(kShifter)));
    const __m256d scale =
        _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_add_epi64(bits, _mm256_set1_epi64x(1023)), 52));
    const __m256d s = _mm256_div_pd(d, _mm256_add_pd(_mm256_set1_pd(1.0), _mm256_mul_pd(p, scale)));
    const __m256d over = _mm256_cmp_pd(neg, _mm256_set1_pd(kExpHi), _CMP_GT_OQ);
    const __m256d out = _mm256_blendv_pd(s, _mm256_mul_pd(d, _mm256_setzero_pd()), over);
    _mm_storeu_ps(h + i, _mm_mul_ps(_mm256_cvtpd_ps(out), _mm_loadu_ps(b + i)));
  }
  silu_mul_scalar(a, b, h, i, n);
}
#endif

#if COSMOES_ARM64
void silu_mul_neon(const float* a, const float* b, float* h, int64_t n) {
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    const float64x2_t d = vcvt_f64_f32(vld1_f32(a + i)), neg = vnegq_f64(d);
    // fmaxnm/fminnm would drop a NaN: compare-and-select keeps it
    float64x2_t x = vbslq_f64(vcgtq_f64(neg, vdupq_n_f64(kExpHi)), vdupq_n_f64(kExpHi), neg);
    x = vbslq_f64(vcltq_f64(x, vdupq_n_f64(kExpLo)), vdupq_n_f64(kExpLo), x);
    const float64x2_t t = vfmaq_f64(vdupq_n_f64(kShifter), x, vdupq_n_f64(kLog2e));
    const float64x2_t k = vsubq_f64(t, vdupq_n_f64(kShifter));
    float64x2_t r = vfmsq_f64(x, k, vdupq_n_f64(kLn2Hi));
    r = vfmsq_f64(r, k, vdupq_n_f64(kLn2Lo));
    float64x2_t p = vdupq_n_f64(kInvFact[13]);
    for (int c = 12; c >= 0; --c) p = vfmaq_f64(vdupq_n_f64(kInvFact[c]), p, r);
    const int64x2_t bits = vsubq_s64(vreinterpretq_s64_f64(t), vreinterpretq_s64_f64(vdupq_n_f64(kShifter)));
    const float64x2_t scale = vreinterpretq_f64_s64(vshlq_n_s64(vaddq_s64(bits, vdupq_n_s64(1023)), 52));
    const float64x2_t s = vdivq_f64(d, vaddq_f64(vdupq_n_f64(1.0), vmulq_f64(p, scale)));
    const float64x2_t out = vbslq_f64(vcgtq_f64(neg, vdupq_n_f64(kExpHi)), vmulq_f64(d, vdupq_n_f64(0.0)), s);
    vst1_f32(h + i, vmul_f32(vcvt_f32_f64(out), vld1_f32(b + i)));
  }
  silu_mul_scalar(a, b, h, i, n);
}
#endif

using PanelFn = void (*)(const PanelArgs&);
struct PanelKernel {
  PanelFn tile[kTile];  // tile[m - 1] handles m tokens
};

#define COSMOES_PANEL_KERNEL(NAME) PanelKernel{{NAME<1>, NAME<2>, NAME<3>, NAME<4>}}

// Rows [r0, r1) (r0 a panel start): panel by panel, tokens in tiles of kTile; a last panel with fewer than 16 real
// rows is computed into scratch and its real rows copied.
void panel_rows(const PanelKernel& kern, const Matrix& w, const int8_t* q, const float* sa, int64_t N, float* y,
                int64_t r0, int64_t r1, const int32_t* asum) {
  const int64_t G = w.cols / w.group, srows = stored_rows(w.rows), panel_bytes = kPanel * w.cols / 2;
  float tail[kTile * kPanel];
  for (int64_t r = r0; r < r1; r += kPanel) {
    const bool whole = r + kPanel <= w.rows;
    for (int64_t n = 0; n < N; n += kTile) {
      const int64_t m = std::min<int64_t>(kTile, N - n);
      PanelArgs p{w.nibbles + (r / kPanel) * panel_bytes, w.scales + r, srows, G, w.group / 8, q + n * w.cols,
                  w.cols, asum + n * G, sa + n, whole ? y + n * w.rows + r : tail, whole ? w.rows : kPanel};
      kern.tile[m - 1](p);
      if (!whole)
        for (int64_t t = 0; t < m; ++t)
          for (int64_t i = 0; i < std::min(r1, w.rows) - r; ++i) y[(n + t) * w.rows + r + i] = tail[t * kPanel + i];
    }
  }
}

bool cpu_has(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return true;
#if COSMOES_X86
    case Isa::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::Avx512Vnni:
      return cpu_has(Isa::Avx2) && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw");
#if COSMOES_HAVE_AVXVNNI
    case Isa::AvxVnni: {
      // CPUID.(7,1):EAX bit 4; clang 14 has the target but not __builtin_cpu_supports("avxvnni")
      unsigned a = 0, b = 0, c = 0, d = 0;
      return cpu_has(Isa::Avx2) && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 4));
    }
#endif
#endif
#if COSMOES_ARM64 && defined(__linux__)
    case Isa::NeonDot: return (getauxval(AT_HWCAP) & (1UL << 20)) != 0;  // HWCAP_ASIMDDP
#endif
    default: return false;
  }
}

// Best first within each architecture's families.
constexpr Isa kOrder[] = {Isa::Avx512Vnni, Isa::AvxVnni, Isa::Avx2, Isa::NeonDot, Isa::Scalar};

Isa choose() {
  const char* cap = std::getenv("COSMOES_ISA");
  if (!cap || !*cap) {
    for (Isa isa : kOrder)
      if (cpu_has(isa)) return isa;
    return Isa::Scalar;
  }
  const std::string want = cap;
  for (Isa isa : kOrder) {
    if (want != isa_name(isa)) continue;
    if (!cpu_has(isa))
      throw Error("COSMOES_ISA=" + want + " asks for kernels this CPU cannot run; it has: " + isas_available());
    // a cap: the best family at or below it (avxvnni on a CPU with avx512vnni is avxvnni itself)
    return isa;
  }
  throw Error("COSMOES_ISA=" + want + " is not a kernel family; use one of: avx512vnni, avxvnni, avx2, neondot, scalar");
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::NeonDot: return "neondot";
    case Isa::Avx2: return "avx2";
    case Isa::AvxVnni: return "avxvnni";
    case Isa::Avx512Vnni: return "avx512vnni";
  }
  return "scalar";
}

std::string isas_available() {
  std::string out;
  for (Isa isa : kOrder)
    if (cpu_has(isa)) out += (out.empty() ? "" : " ") + std::string(isa_name(isa));
  return out;
}

Isa active_isa() {
  static const Isa isa = choose();
  return isa;
}

void quantize(const float* x, int64_t N, int64_t in, int64_t padded, int8_t* q, float* sa) {
  if (in <= 0 || padded < in) throw Error("int4 quantize: bad width " + std::to_string(in));
  switch (active_isa()) {
#if COSMOES_X86
    case Isa::Avx2:
    case Isa::AvxVnni:
    case Isa::Avx512Vnni: return quantize_rows(x, N, in, padded, q, sa, amax_avx2, round_avx2);
#endif
#if COSMOES_ARM64
    case Isa::NeonDot: return quantize_rows(x, N, in, padded, q, sa, amax_neon, round_neon);
#endif
    default: break;
  }
  quantize_rows(x, N, in, padded, q, sa, [](const float* row, int64_t in_) { return amax_scalar(row, 0, in_, 0.f); },
                [](const float*, int64_t, float, int8_t*) { return int64_t{0}; });
}

void linear(const Matrix& w, const int8_t* q, const float* sa, int64_t N, float* y, int64_t r0, int64_t r1) {
  check(w, N, r0, r1);
  if (N == 0 || r0 == r1) return;
  const Isa isa = active_isa();
  if (isa == Isa::Scalar) return scalar_rows(w, q, sa, N, y, r0, r1);
  thread_local std::vector<int32_t> asum;
  asum.resize(static_cast<size_t>(N * (w.cols / w.group)));
#if COSMOES_X86
  group_sums_avx2(q, N, w.cols, w.group, asum.data());
#endif
  switch (isa) {
#if COSMOES_X86
    case Isa::Avx2: {
      static const PanelKernel k = COSMOES_PANEL_KERNEL(avx2_panel);
      return panel_rows(k, w, q, sa, N, y, r0, r1, asum.data());
    }
    case Isa::Avx512Vnni: {
      static const PanelKernel k = COSMOES_PANEL_KERNEL(avx512vnni_panel);
      return panel_rows(k, w, q, sa, N, y, r0, r1, asum.data());
    }
#if COSMOES_HAVE_AVXVNNI
    case Isa::AvxVnni: {
      static const PanelKernel k = COSMOES_PANEL_KERNEL(avxvnni_panel);
      return panel_rows(k, w, q, sa, N, y, r0, r1, asum.data());
    }
#endif
#endif
#if COSMOES_ARM64
    case Isa::NeonDot: {
      static const PanelKernel k = COSMOES_PANEL_KERNEL(neondot_panel);
      return panel_rows(k, w, q, sa, N, y, r0, r1, asum.data());
    }
#endif
    default: return scalar_rows(w, q, sa, N, y, r0, r1);
  }
}

namespace {

struct LinearJob {
  const Matrix* w;
  const int8_t* q;
  const float* sa;
  int64_t N, rows_per_chunk;
  float* y;
};

void linear_chunk(void* ctx, int64_t chunk) {
  auto& j = *static_cast<LinearJob*>(ctx);
  const int64_t r0 = chunk * j.rows_per_chunk, r1 = std::min(j.w->rows, r0 + j.rows_per_chunk);
  if (r0 < r1) linear(*j.w, j.q, j.sa, j.N, j.y, r0, r1);
}

}  // namespace

void linear_parallel(const Matrix& w, const int8_t* q, const float* sa, int64_t N, float* y, ParallelFor parallel,
                     int64_t threads) {
  const int64_t per_thread = (w.rows + std::max<int64_t>(1, threads) - 1) / std::max<int64_t>(1, threads);
  LinearJob job{&w, q, sa, N, std::max<int64_t>(kPanel, (per_thread + kPanel - 1) / kPanel * kPanel), y};
  const int64_t chunks = (w.rows + job.rows_per_chunk - 1) / job.rows_per_chunk;
  if (chunks <= 1 || !parallel)
    linear_chunk(&job, 0);
  else
    parallel(&job, linear_chunk, chunks);
}

float silu(float v) {
  const double d = v;
  return static_cast<float>(d / (1.0 + std::exp(-d)));
}

void silu_mul(const float* a, const float* b, float* h, int64_t n) {
  switch (active_isa()) {
#if COSMOES_X86
    case Isa::Avx512Vnni: return silu_mul_avx512(a, b, h, n);
    case Isa::Avx2:
    case Isa::AvxVnni: return silu_mul_avx2(a, b, h, n);
#endif
#if COSMOES_ARM64
    case Isa::NeonDot: return silu_mul_neon(a, b, h, n);
#endif
    default: return silu_mul_scalar(a, b, h, 0, n);
  }
}

}  // namespace cosmoes::int4
