// cosmoes::rms_norm, cosmoes::heads and cosmoes::fp32_linear: plain loops the compiler vectorises; -ffp-contract=off
// keeps every product and sum rounded as the torch reference rounds it (heads gives its bits; rms_norm's mean and
// fp32_linear's dot products are summed in double instead).
#include "layer_ops.h"

#include <cmath>

namespace cosmoes {

namespace {

// 16 partial sums: enough independent adds in flight that their latency does not bound the loop (4 held a router
// to about one product per cycle; it runs over every prompt token of every layer, twice with the one foretold)
constexpr int kLanes = 16;

// Σ a[i] * b[i] in double, kLanes partial sums in a fixed order.
double dot(const float* a, const float* b, int64_t n) {
  double lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lane[j] += static_cast<double>(a[i + j]) * b[i + j];  // exact products
  for (int j = 0; i < n; ++i, ++j) lane[j] += static_cast<double>(a[i]) * b[i];
  for (int width = kLanes / 2; width > 0; width /= 2)  // pairwise, the same tree every call
    for (int j = 0; j < width; ++j) lane[j] += lane[j + width];
  return lane[0];
}

}  // namespace

void rms_norm(const float* x, const float* weight, double eps, int64_t rows, int64_t D, float* out) {
  for (int64_t r = 0; r < rows; ++r, x += D, out += D) {
    const double mean = dot(x, x, D) / static_cast<double>(D);
    const float scale = static_cast<float>(1.0 / std::sqrt(mean + eps));
    for (int64_t i = 0; i < D; ++i) out[i] = weight[i] * (x[i] * scale);
  }
}

void fp32_linear(const float* x, const float* weight, int64_t rows, int64_t in, int64_t out_features, float* out) {
  for (int64_t r = 0; r < rows; ++r, x += in, out += out_features)
    for (int64_t o = 0; o < out_features; ++o) out[o] = static_cast<float>(dot(x, weight + o * in, in));
}

void heads(const float* x, int64_t T, int64_t F, int64_t start, int64_t H, int64_t d, const float* cos,
           const float* sin, float* out) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t = 0; t < T; ++t) {
      const float* in = x + t * F + start + h * d;
      float* o = out + (h * T + t) * d;
      if (!cos) {
        for (int64_t i = 0; i < d; ++i) o[i] = in[i];
        continue;
      }
      const float *c = cos + t * d, *s = sin + t * d;
      for (int64_t i = 0; i < half; ++i) o[i] = in[i] * c[i] + -in[i + half] * s[i];
      for (int64_t i = half; i < d; ++i) o[i] = in[i] * c[i] + in[i - half] * s[i];
    }
}

}  // namespace cosmoes
