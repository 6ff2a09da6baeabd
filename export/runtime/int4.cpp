// The int4 expert kernels: a scalar reference and AVX2 / AVX-VNNI / AVX-512-VNNI / NEON-dotprod versions of it, each
// compiled for its own instruction set (function target attributes) and picked at run time; see int4.h.
#include "int4.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
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
      r1 > w.rows || r0 > r1)
    throw Error("int4 linear: bad shape (rows " + std::to_string(w.rows) + ", cols " + std::to_string(w.cols) +
                ", group " + std::to_string(w.group) + ", rows " + std::to_string(r0) + ".." + std::to_string(r1) + ")");
}

// Σ of each group's activations, per token: the kernels multiply unsigned nibbles (q + 8) and subtract 8 Σa.
void group_sums(const int8_t* q, int64_t N, int64_t cols, int64_t group, std::vector<int32_t>& asum) {
  const int64_t G = cols / group;
  asum.assign(static_cast<size_t>(N * G), 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      int32_t s = 0;
      for (int64_t k = 0; k < group; ++k) s += q[n * cols + g * group + k];
      asum[n * G + g] = s;
    }
}

int32_t weight(const uint8_t* row, int64_t k) {
  const uint8_t b = row[(k / 32) * 16 + (k % 32) % 16];
  return static_cast<int32_t>((k % 32) < 16 ? (b & 0xF) : (b >> 4)) - 8;
}

void scalar_rows(const Matrix& w, const int8_t* q, const float* sa, int64_t N, float* y, int64_t r0, int64_t r1) {
  const int64_t G = w.cols / w.group;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.nibbles + r * (w.cols / 2);
    for (int64_t n = 0; n < N; ++n) {
      const int8_t* a = q + n * w.cols;
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        int32_t isum = 0;
        for (int64_t k = g * w.group; k < (g + 1) * w.group; ++k) isum += a[k] * weight(row, k);
        const float part = static_cast<float>(isum) * w.scales[g * w.rows + r];
        acc = acc + part;
      }
      y[n * w.rows + r] = acc * sa[n];
    }
  }
}

#if COSMOES_X86
// 8 rows at a time: per group, one int32 vector of partial sums per row, reduced to [s0..s7] by a hadd tree, then
// the fp32 accumulation of the 8 rows side by side (multiply, then add: the reference's order, no FMA).
#define COSMOES_X86_KERNEL(NAME, TARGET, DOT)                                                                   \
  __attribute__((target(TARGET))) void NAME(const Matrix& w, const int8_t* q, const float* sa, int64_t N,      \
                                            float* y, int64_t r0, int64_t r1, const int32_t* asum) {           \
    const int64_t G = w.cols / w.group, blocks = w.group / 32, stride = w.cols / 2;                              \
    const __m128i low = _mm_set1_epi8(0x0F);                                                                    \
    const __m256i ones = _mm256_set1_epi16(1);                                                                  \
    (void)ones;                                                                                                 \
    int64_t r = r0;                                                                                             \
    for (; r + 8 <= r1; r += 8) {                                                                               \
      const uint8_t* base = w.nibbles + r * stride;                                                             \
      for (int64_t n = 0; n < N; ++n) {                                                                         \
        const int8_t* a = q + n * w.cols;                                                                       \
        __m256 acc = _mm256_setzero_ps();                                                                       \
        for (int64_t g = 0; g < G; ++g) {                                                                       \
          __m256i s[8];                                                                                         \
          for (int i = 0; i < 8; ++i) s[i] = _mm256_setzero_si256();                                            \
          for (int64_t b = 0; b < blocks; ++b) {                                                                \
            const int64_t blk = g * blocks + b;                                                                 \
            const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + blk * 32));              \
            for (int i = 0; i < 8; ++i) {                                                                       \
              const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + i * stride + blk * 16)); \
              const __m256i wv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low),                  \
                                                  _mm_and_si128(raw, low));                                     \
              DOT(s[i], wv, av);                                                                                \
            }                                                                                                   \
          }                                                                                                     \
          const __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));   \
          const __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(s[4], s[5]), _mm256_hadd_epi32(s[6], s[7]));   \
          __m256i sum = _mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20),                               \
                                         _mm256_permute2x128_si256(h0, h1, 0x31));                              \
          sum = _mm256_sub_epi32(sum, _mm256_set1_epi32(8 * asum[n * G + g]));                                  \
          const __m256 part = _mm256_mul_ps(_mm256_cvtepi32_ps(sum), _mm256_loadu_ps(w.scales + g * w.rows + r)); \
          acc = _mm256_add_ps(acc, part);                                                                       \
        }                                                                                                       \
        _mm256_storeu_ps(y + n * w.rows + r, _mm256_mul_ps(acc, _mm256_set1_ps(sa[n])));                        \
      }                                                                                                         \
    }                                                                                                           \
    if (r < r1) scalar_rows(w, q, sa, N, y, r, r1);                                                             \
  }

#define COSMOES_DOT_AVX2(acc, wv, av) acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(wv, av), ones))
#define COSMOES_DOT_AVX512VNNI(acc, wv, av) acc = _mm256_dpbusd_epi32(acc, wv, av)
#define COSMOES_DOT_AVXVNNI(acc, wv, av) acc = _mm256_dpbusd_avx_epi32(acc, wv, av)

COSMOES_X86_KERNEL(avx2_rows, "avx2,fma", COSMOES_DOT_AVX2)
COSMOES_X86_KERNEL(avx512vnni_rows, "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni", COSMOES_DOT_AVX512VNNI)
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 || defined(__clang__) && __clang_major__ >= 12
#define COSMOES_HAVE_AVXVNNI 1
COSMOES_X86_KERNEL(avxvnni_rows, "avx2,fma,avxvnni", COSMOES_DOT_AVXVNNI)
#endif
#endif  // COSMOES_X86

#if COSMOES_ARM64
// One row at a time: signed nibbles (q) times signed int8 activations with sdot, a horizontal add per group.
__attribute__((target("arch=armv8.2-a+dotprod"))) void neondot_rows(const Matrix& w, const int8_t* q, const float* sa, int64_t N,
                                                      float* y, int64_t r0, int64_t r1, const int32_t*) {
  const int64_t G = w.cols / w.group, blocks = w.group / 32, stride = w.cols / 2;
  const uint8x16_t low = vdupq_n_u8(0x0F);
  const int8x16_t eight = vdupq_n_s8(8);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.nibbles + r * stride;
    for (int64_t n = 0; n < N; ++n) {
      const int8_t* a = q + n * w.cols;
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        int32x4_t s = vdupq_n_s32(0);
        for (int64_t b = 0; b < blocks; ++b) {
          const int64_t blk = g * blocks + b;
          const uint8x16_t raw = vld1q_u8(row + blk * 16);
          const int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(raw, low)), eight);
          const int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(raw, 4)), eight);
          s = vdotq_s32(s, lo, vld1q_s8(a + blk * 32));
          s = vdotq_s32(s, hi, vld1q_s8(a + blk * 32 + 16));
        }
        const float part = static_cast<float>(vaddvq_s32(s)) * w.scales[g * w.rows + r];
        acc = acc + part;
      }
      y[n * w.rows + r] = acc * sa[n];
    }
  }
}
#endif

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
  for (int64_t n = 0; n < N; ++n) {
    const float* row = x + n * in;
    float amax = 0.f;
    for (int64_t k = 0; k < in; ++k) amax = std::max(amax, std::fabs(row[k]));
    const float s = amax / 127.0f;
    sa[n] = s;
    int8_t* out = q + n * padded;
    for (int64_t k = 0; k < in; ++k) {
      const float v = s > 0.f ? std::nearbyint(row[k] / s) : 0.f;
      out[k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
    }
    std::fill(out + in, out + padded, int8_t{0});
  }
}

void linear(const Matrix& w, const int8_t* q, const float* sa, int64_t N, float* y, int64_t r0, int64_t r1) {
  check(w, N, r0, r1);
  if (N == 0 || r0 == r1) return;
  const Isa isa = active_isa();
  if (isa == Isa::Scalar) return scalar_rows(w, q, sa, N, y, r0, r1);
  thread_local std::vector<int32_t> asum;
  group_sums(q, N, w.cols, w.group, asum);
  switch (isa) {
#if COSMOES_X86
    case Isa::Avx2: return avx2_rows(w, q, sa, N, y, r0, r1, asum.data());
    case Isa::Avx512Vnni: return avx512vnni_rows(w, q, sa, N, y, r0, r1, asum.data());
#if COSMOES_HAVE_AVXVNNI
    case Isa::AvxVnni: return avxvnni_rows(w, q, sa, N, y, r0, r1, asum.data());
#endif
#endif
#if COSMOES_ARM64
    case Isa::NeonDot: return neondot_rows(w, q, sa, N, y, r0, r1, asum.data());
#endif
    default: return scalar_rows(w, q, sa, N, y, r0, r1);
  }
}

float silu(float v) {
  const double d = v;
  return static_cast<float>(d / (1.0 + std::exp(-d)));
}

}  // namespace cosmoes::int4
