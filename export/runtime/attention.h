// Attention over the used slots of a layer's static KV cache in one call: the kernel of the graph operator
// cosmoes::cached_attention (cosmoes/ops.py documents its maths; issue #21).
#pragma once

#include <cstdint>

namespace cosmoes {

// q (H, T, d) fp32 for positions L-T..L-1; k, v (H_kv, S, d) fp32 or fp16 (half = true) holding positions 0..L-1;
// out (T, H*d). Query head h reads kv head h / (H / H_kv). The sums run in a fixed order whatever the instruction set
// or thread count, so every build and runtime gives the same bits. Runs on ExecuTorch's thread pool.
void cached_attention(const float* q, const void* k, const void* v, bool half, int64_t H, int64_t H_kv, int64_t T,
                      int64_t d, int64_t S, int64_t L, float* out);

}  // namespace cosmoes
