// cosmoes::rms_norm and cosmoes::heads: plain loops the compiler vectorises; -ffp-contract=off keeps every product and
// sum rounded as the torch reference rounds it (heads gives its bits; rms_norm's mean is summed in double instead).
#include "layer_ops.h"

#include <cmath>

namespace cosmoes {

void rms_norm(const float* x, const float* weight, double eps, int64_t rows, int64_t D, float* out) {
  constexpr int kLanes = 4;
  for (int64_t r = 0; r < rows; ++r, x += D, out += D) {
    double lane[kLanes] = {0, 0, 0, 0};
    int64_t i = 0;
    for (; i + kLanes <= D; i += kLanes)
      for (int j = 0; j < kLanes; ++j) lane[j] += static_cast<double>(x[i + j]) * x[i + j];  // exact products
    for (int j = 0; i < D; ++i, ++j) lane[j] += static_cast<double>(x[i]) * x[i];
    const double mean = ((lane[0] + lane[1]) + (lane[2] + lane[3])) / static_cast<double>(D);
    const float scale = static_cast<float>(1.0 / std::sqrt(mean + eps));
    for (i = 0; i < D; ++i) out[i] = weight[i] * (x[i] * scale);
  }
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
