// cosmoes::cached_attention: softmax(q kᵀ / √d, causal) v straight from the KV cache, one (head, token) row per task.
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "pool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace cosmoes {
namespace {

constexpr int kLanes = 8;
// key rows scored together (independent sums), and how far ahead of them keys are prefetched
constexpr int kRows = 4, kPrefetchRows = 8;
// multiply-adds (per K and V) below which attention runs on one thread: ExecuTorch's pool wakes its workers per
// job, the runtime's spinning pool is a few hundred nanoseconds away (measured on a wearable layer)
constexpr int64_t kParallelWork = 1 << 19, kSpinParallelWork = 1 << 13;

// fp16 -> fp32 for n values; exact, so any instruction set gives the same floats.
#if defined(__aarch64__)
void widen(const uint16_t* src, float* dst, int64_t n) {
  const __fp16* h = reinterpret_cast<const __fp16*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(h[i]);
}
#else
float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
  else if (!man) bits = sign;
  else {  // subnormal: normalise
    int e = -1;
    uint32_t m = man;
    do { ++e; m <<= 1; } while (!(m & 0x400u));
    bits = sign | ((112 - e) << 23) | ((m & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
#if defined(__x86_64__)
__attribute__((target("f16c,avx"))) void widen_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = half_bits_to_float(src[i]);
}
bool have_f16c() {
  static const bool yes = __builtin_cpu_supports("avx") && [] {
    unsigned a, b, c, d;
    __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    return (c >> 29) & 1u;
  }();
  return yes;
}
#endif
void widen(const uint16_t* src, float* dst, int64_t n) {
#if defined(__x86_64__)
  if (have_f16c()) return widen_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = half_bits_to_float(src[i]);
}
#endif

// 8 lanes as a vector type (two SSE registers on baseline x86-64, two NEON registers on arm64); with
// -ffp-contract=off its multiply and add stay two roundings, so every build sums the same bits as lane-wise scalars.
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

float reduce(const Lanes& l) { return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7])); }

// Dot products of a with rows b[0..R): lane j sums elements j, j + 8, ... in order, the tail goes to lanes 0..;
// R rows side by side are R independent chains, so a row's sum no longer waits on the adder's latency.
template <int R>
void dots(const float* a, const float* const* b, int64_t n, float* out) {
  Lanes lane[R];
  for (int r = 0; r < R; ++r) lane[r] = Lanes{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    Lanes x, y;  // memcpy: unaligned loads (and no vector passed by value, whose ABI differs between x86 builds)
    __builtin_memcpy(&x, a + i, sizeof x);
    for (int r = 0; r < R; ++r) {
      __builtin_memcpy(&y, b[r] + i, sizeof y);
      lane[r] += x * y;
    }
  }
  for (int j = 0; i < n; ++i, ++j)
    for (int r = 0; r < R; ++r) lane[r][j] += a[i] * b[r][i];
  for (int r = 0; r < R; ++r) out[r] = reduce(lane[r]);
}

struct Job {
  const float* q;
  const uint8_t *k, *v;
  bool half;
  int64_t H, group, T, d, S, L;
  float* out;
};

// One query row: head h = i / T, token t = i % T, which sees positions 0..L-T+t.
void attend_row(void* ctx, int64_t i) {
  const Job& j = *static_cast<const Job*>(ctx);
  const int64_t h = i / j.T, t = i % j.T, kvh = h / j.group, seen = j.L - j.T + t + 1, d = j.d;
  const size_t elem = j.half ? 2 : 4, head_bytes = static_cast<size_t>(j.S * d) * elem;
  const uint8_t* k = j.k + kvh * head_bytes;
  const uint8_t* v = j.v + kvh * head_bytes;
  thread_local std::vector<float> scores, rows, acc;  // rows: kRows fp16 rows widened
  scores.resize(static_cast<size_t>(seen));
  if (j.half) rows.resize(static_cast<size_t>(kRows * d));
  acc.assign(static_cast<size_t>(d), 0.f);
  const float* q = j.q + (h * j.T + t) * d;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  // row r of a block of kRows positions starting at l: in place, or widened from fp16
  auto row = [&](const uint8_t* cache, int64_t l, int r) {
    const uint8_t* p = cache + (l + r) * d * elem;
    if (!j.half) return reinterpret_cast<const float*>(p);
    widen(reinterpret_cast<const uint16_t*>(p), rows.data() + r * d, d);
    return static_cast<const float*>(rows.data() + r * d);
  };
  const float* kr[kRows];
  int64_t l = 0;
  for (; l + kRows <= seen; l += kRows) {
    // Rows come from memory, not cache (a decode step reads every layer's cache once): the keys kPrefetchRows ahead
    // and this block's values (read after the softmax) are requested now; measured -1/3 of attend_row's time.
    const uint8_t* ahead = k + std::min<int64_t>(l + kPrefetchRows, seen - 1) * d * elem;
    for (int64_t b = 0; b < kRows * d * static_cast<int64_t>(elem); b += 64) {
      __builtin_prefetch(ahead + b, 0, 3);
      __builtin_prefetch(v + l * d * elem + b, 0, 2);
    }
    for (int r = 0; r < kRows; ++r) kr[r] = row(k, l, r);
    dots<kRows>(q, kr, d, &scores[l]);
  }
  for (; l < seen; ++l) {
    kr[0] = row(k, l, 0);
    dots<1>(q, kr, d, &scores[l]);
  }
  float mx = -INFINITY;
  for (l = 0; l < seen; ++l) {
    scores[l] *= scale;
    mx = std::fmax(mx, scores[l]);
  }
  float sum = 0.f;
  for (l = 0; l < seen; ++l) {
    // exp in double, rounded once: libm's float exp may differ in the last bit between architectures
    scores[l] = static_cast<float>(std::exp(static_cast<double>(scores[l] - mx)));
    sum += scores[l];
  }
  // four value rows per pass over acc, added in position order as one row at a time would
  static_assert(kRows == 4, "the value pass adds four rows");
  const float* vr[kRows];
  for (l = 0; l + kRows <= seen; l += kRows) {
    for (int r = 0; r < kRows; ++r) vr[r] = row(v, l, r);
    const float p0 = scores[l], p1 = scores[l + 1], p2 = scores[l + 2], p3 = scores[l + 3];
    for (int64_t c = 0; c < d; ++c)
      acc[c] = (((acc[c] + p0 * vr[0][c]) + p1 * vr[1][c]) + p2 * vr[2][c]) + p3 * vr[3][c];
  }
  for (; l < seen; ++l) {
    const float* vl = row(v, l, 0);
    const float p = scores[l];
    for (int64_t c = 0; c < d; ++c) acc[c] += p * vl[c];
  }
  float* out = j.out + t * j.H * d + h * d;
  for (int64_t c = 0; c < d; ++c) out[c] = acc[c] / sum;
}

}  // namespace

void cached_attention(const float* q, const void* k, const void* v, bool half, int64_t H, int64_t H_kv, int64_t T,
                      int64_t d, int64_t S, int64_t L, float* out) {
  Job job{q, static_cast<const uint8_t*>(k), static_cast<const uint8_t*>(v), half, H, H / H_kv, T, d, S, L, out};
  // A decode step's rows are a few microseconds each: on one thread unless there is enough to share (waking the
  // pool costs more than it saves below that, measured on a wearable layer)
  if (H * T < 2 || H * T * L * d < (pool_spins() ? kSpinParallelWork : kParallelWork)) {
    for (int64_t i = 0; i < H * T; ++i) attend_row(&job, i);
    return;
  }
  pool_parallel(&job, attend_row, H * T);
}

}  // namespace cosmoes
