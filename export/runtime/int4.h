// int8-dynamic-activation x int4-grouped-weight linears for the experts used in place (§3.4.2), with kernels per
// instruction set chosen at run time; every kernel gives the scalar reference's bits (cosmoes/int4.py documents
// the format and the fixed fp32 order), so the native and the Python runtime pick the same tokens.
#pragma once

#include <cstdint>
#include <string>

namespace cosmoes::int4 {

// Rows are stored in panels of 16 (the last one padded with zero rows whose scale is 0).
constexpr int64_t kPanel = 16;
inline int64_t stored_rows(int64_t rows) { return (rows + kPanel - 1) / kPanel * kPanel; }

// An out x cols int4 matrix (cols padded to a multiple of group, group a multiple of 32), as cosmoes/int4.py packs
// it: per panel of 16 rows (8 * cols bytes), per chunk of 8 columns, 64 bytes = 4 per row, byte j of a row holding
// column j low and column j + 4 high, stored as q + 8; scales fp32 [cols/group][stored_rows(rows)].
struct Matrix {
  const uint8_t* nibbles;
  const float* scales;
  int64_t rows, cols, group;
};

// Per token: sa = amax / 127 over the `in` real columns, q = round(x / sa) in [-127, 127]; columns in..padded-1 are 0.
void quantize(const float* x, int64_t N, int64_t in, int64_t padded, int8_t* q, float* sa);

// Rows [row_begin, row_end) of y (N x w.rows) for all N tokens of q (N x w.cols): a caller splits rows across
// threads at panel boundaries (row_begin a multiple of kPanel). A panel's weights are unpacked once per tile of up
// to 4 tokens (decode is the N = 1 case).
void linear(const Matrix& w, const int8_t* q, const float* sa, int64_t N, float* y, int64_t row_begin,
            int64_t row_end);

// Runs `fn(ctx, chunk)` for chunk in [0, n), spread over a thread pool (the runtime's: pool.h).
using ParallelFor = void (*)(void* ctx, void (*fn)(void* ctx, int64_t chunk), int64_t n);

// All rows of y (N x w.rows), split evenly over `threads` in whole panels and run through `parallel` (inline when
// that makes one chunk or parallel is null).
void linear_parallel(const Matrix& w, const int8_t* q, const float* sa, int64_t N, float* y, ParallelFor parallel,
                     int64_t threads);

// v / (1 + e^-v) in double, rounded once to float (as cosmoes.int4.silu).
float silu(float v);
// h = silu(a) * b over n values, silu as above (the same bits) in the active family's SIMD lanes.
void silu_mul(const float* a, const float* b, float* h, int64_t n);

enum class Isa { Scalar, NeonDot, Avx2, AvxVnni, Avx512Vnni };
// The kernel family in use: the best this CPU has, capped by the environment variable COSMOES_ISA (scalar, avx2,
// avxvnni, avx512vnni, neondot). Throws cosmoes::Error, one line, for an unknown value or one the CPU lacks.
Isa active_isa();
const char* isa_name(Isa isa);
// What this CPU offers, best first, e.g. "avx512vnni avxvnni avx2 scalar".
std::string isas_available();

}  // namespace cosmoes::int4
