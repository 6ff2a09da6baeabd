// cosmoes::cached_attention: softmax(q kᵀ / √d, causal) v straight from the KV cache, one (head, token) row per task.
#include "attention.h"

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

float dot(const float* a, const float* b, int64_t n) {
  float lane[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lane[j] += a[i + j] * b[i + j];
  for (int j = 0; i < n; ++i, ++j) lane[j] += a[i] * b[i];
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
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
  thread_local std::vector<float> scores, row, acc;
  scores.resize(static_cast<size_t>(seen));
  row.resize(static_cast<size_t>(d));
  acc.assign(static_cast<size_t>(d), 0.f);
  const float* q = j.q + (h * j.T + t) * d;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  float mx = -INFINITY;
  for (int64_t l = 0; l < seen; ++l) {
    const float* kl = reinterpret_cast<const float*>(k + l * d * elem);
    if (j.half) widen(reinterpret_cast<const uint16_t*>(k + l * d * elem), row.data(), d), kl = row.data();
    scores[l] = dot(q, kl, d) * scale;
    mx = std::fmax(mx, scores[l]);
  }
  float sum = 0.f;
  for (int64_t l = 0; l < seen; ++l) {
    // exp in double, rounded once: libm's float exp may differ in the last bit between architectures
    scores[l] = static_cast<float>(std::exp(static_cast<double>(scores[l] - mx)));
    sum += scores[l];
  }
  for (int64_t l = 0; l < seen; ++l) {
    const float* vl = reinterpret_cast<const float*>(v + l * d * elem);
    if (j.half) widen(reinterpret_cast<const uint16_t*>(v + l * d * elem), row.data(), d), vl = row.data();
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
