// The kernels of a layer's graph operators cosmoes::rms_norm, cosmoes::heads and cosmoes::fp32_linear (cosmoes/ops.py
// documents their maths): one call each where the exported graph had several XNNPACK partitions and portable kernels
// (issue #21).
#pragma once

#include <cstdint>

namespace cosmoes {

// rows x D fp32 -> out: weight * (x * rsqrt(mean(x²) + eps)); the mean summed in double in a fixed order.
void rms_norm(const float* x, const float* weight, double eps, int64_t rows, int64_t D, float* out);

// x (T, F) fp32, columns start .. start + H*d -> out (H, T, d); rotated by RoPE (rotate-half) when cos / sin (T, d)
// are given (d even), as x * cos + rotate_half(x) * sin.
void heads(const float* x, int64_t T, int64_t F, int64_t start, int64_t H, int64_t d, const float* cos,
           const float* sin, float* out);

// x (rows, in) fp32 times weight (out_features, in)ᵀ -> out (rows, out_features); each dot product summed in double in
// a fixed order (the products are exact there), rounded once to float. Routers: E x D, a few thousand products.
void fp32_linear(const float* x, const float* weight, int64_t rows, int64_t in, int64_t out_features, float* out);

}  // namespace cosmoes
