// The boxed ExecuTorch kernels of the project's graph operators. Every argument is checked against the others before
// a byte is read, and any inconsistency fails the call (the runtime reports it as one line), never a crash.
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <vector>

#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/operator_registry.h>

#include "attention.h"
#include "int4.h"
#include "layer_ops.h"
#include "pool.h"

namespace cosmoes {
namespace {

namespace et = executorch::runtime;
using executorch::aten::ScalarType;
using executorch::aten::SizesType;
using executorch::aten::Tensor;

constexpr const char* kCachedAttention = "cosmoes::cached_attention.out";
constexpr const char* kInt4Linear = "cosmoes::int4_linear.out";
constexpr const char* kRmsNorm = "cosmoes::rms_norm.out";
constexpr const char* kHeads = "cosmoes::heads.out";
constexpr const char* kFp32Linear = "cosmoes::fp32_linear.out";
// weight bytes x tokens below which a linear stays on one thread, with ExecuTorch's pool (which wakes its workers
// per job) and with the runtime's spinning pool
constexpr int64_t kParallelBytes = 1 << 20, kSpinParallelBytes = 1 << 16;
constexpr int64_t kFp32ParallelProducts = 1 << 16;  // an fp32_linear's multiply-adds from which its rows are split

bool tensors(et::Span<et::EValue*> stack, std::initializer_list<size_t> at) {
  return std::all_of(at.begin(), at.end(), [&](size_t i) { return i < stack.size() && stack[i]->isTensor(); });
}

bool ints(et::Span<et::EValue*> stack, std::initializer_list<size_t> at) {
  return std::all_of(at.begin(), at.end(), [&](size_t i) { return i < stack.size() && stack[i]->isInt(); });
}

// Resizes out to x's sizes with the last dimension `last` (a linear's output); false if ExecuTorch refuses.
bool resize_as_linear(Tensor& out, const Tensor& x, int64_t last) {
  SizesType sizes[8];
  for (int i = 0; i + 1 < x.dim(); ++i) sizes[i] = x.size(i);
  sizes[x.dim() - 1] = static_cast<SizesType>(last);
  return et::resize_tensor(out, {sizes, static_cast<size_t>(x.dim())}) == et::Error::Ok;
}

// (q, k_cache, v_cache, L, out) and the return slot.
void cached_attention_out(et::KernelRuntimeContext& ctx, et::Span<et::EValue*> stack) {
  if (!tensors(stack, {0, 1, 2, 4}) || !ints(stack, {3})) return ctx.fail(et::Error::InvalidArgument);
  const Tensor& q = stack[0]->toTensor();
  const Tensor& k = stack[1]->toTensor();
  const Tensor& v = stack[2]->toTensor();
  const int64_t L = stack[3]->toInt();
  Tensor& out = stack[4]->toTensor();
  const bool half = k.scalar_type() == ScalarType::Half;
  if (q.dim() != 4 || k.dim() != 3 || v.dim() != 3 || q.size(0) != 1 || q.scalar_type() != ScalarType::Float ||
      out.scalar_type() != ScalarType::Float || (!half && k.scalar_type() != ScalarType::Float) ||
      v.scalar_type() != k.scalar_type())
    return ctx.fail(et::Error::InvalidArgument);
  const int64_t H = q.size(1), T = q.size(2), d = q.size(3), H_kv = k.size(0), S = k.size(1);
  for (int i = 0; i < 3; ++i)
    if (v.size(i) != k.size(i)) return ctx.fail(et::Error::InvalidArgument);
  if (H_kv < 1 || H % H_kv || k.size(2) != d || T < 1 || L < T || L > S) return ctx.fail(et::Error::InvalidArgument);
  const SizesType sizes[3] = {1, static_cast<SizesType>(T), static_cast<SizesType>(H * d)};
  if (et::resize_tensor(out, {sizes, 3}) != et::Error::Ok) return ctx.fail(et::Error::InvalidArgument);
  cached_attention(q.const_data_ptr<float>(), k.const_data_ptr(), v.const_data_ptr(), half, H, H_kv, T, d, S, L,
                   out.mutable_data_ptr<float>());
  if (stack.size() > 5) *stack[5] = *stack[4];
}

// (x, nibbles, scales, in_features, out_features, group, out) and the return slot: x (..., in) -> out (..., out).
void int4_linear_out(et::KernelRuntimeContext& ctx, et::Span<et::EValue*> stack) {
  if (!tensors(stack, {0, 1, 2, 6}) || !ints(stack, {3, 4, 5})) return ctx.fail(et::Error::InvalidArgument);
  const Tensor& x = stack[0]->toTensor();
  const Tensor& nibbles = stack[1]->toTensor();
  const Tensor& scales = stack[2]->toTensor();
  const int64_t in = stack[3]->toInt(), rows = stack[4]->toInt(), group = stack[5]->toInt();
  Tensor& out = stack[6]->toTensor();
  if (x.scalar_type() != ScalarType::Float || out.scalar_type() != ScalarType::Float ||
      nibbles.scalar_type() != ScalarType::Byte || scales.scalar_type() != ScalarType::Float || x.dim() < 1 ||
      x.dim() > 8 || group < 32 || group % 32 || in < 1 || rows < 1 || x.size(x.dim() - 1) != in)
    return ctx.fail(et::Error::InvalidArgument);
  const int64_t padded = (in + group - 1) / group * group, stored = int4::stored_rows(rows);
  if (nibbles.numel() != stored * padded / 2 || scales.numel() != (padded / group) * stored)
    return ctx.fail(et::Error::InvalidArgument);
  if (!resize_as_linear(out, x, rows)) return ctx.fail(et::Error::InvalidArgument);
  const int64_t N = x.numel() / in;
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> sa;
  q.resize(static_cast<size_t>(N * padded));
  sa.resize(static_cast<size_t>(N));
  int4::quantize(x.const_data_ptr<float>(), N, in, padded, q.data(), sa.data());
  // a small matrix on one thread: waking ExecuTorch's pool costs more than its share (a 448 x 448 projection: 80 ->
  // 190 us per layer with 2 threads, measured)
  const bool big = stored * padded / 2 * N >= (pool_spins() ? kSpinParallelBytes : kParallelBytes);
  const int64_t threads = big ? pool_threads() : 1;
  int4::linear_parallel({nibbles.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(), rows, padded, group},
                        q.data(), sa.data(), N, out.mutable_data_ptr<float>(), pool_parallel, threads);
  if (stack.size() > 7) *stack[7] = *stack[6];
}

// (x, weight, eps, out) and the return slot: x (..., D) -> out (..., D).
void rms_norm_out(et::KernelRuntimeContext& ctx, et::Span<et::EValue*> stack) {
  if (!tensors(stack, {0, 1, 3}) || !stack[2]->isDouble()) return ctx.fail(et::Error::InvalidArgument);
  const Tensor& x = stack[0]->toTensor();
  const Tensor& w = stack[1]->toTensor();
  const double eps = stack[2]->toDouble();
  Tensor& out = stack[3]->toTensor();
  if (x.scalar_type() != ScalarType::Float || w.scalar_type() != ScalarType::Float ||
      out.scalar_type() != ScalarType::Float || x.dim() < 1 || w.dim() != 1 || x.size(x.dim() - 1) != w.size(0) ||
      w.size(0) < 1 || !(eps >= 0) || !std::isfinite(eps))
    return ctx.fail(et::Error::InvalidArgument);
  if (et::resize_tensor(out, x.sizes()) != et::Error::Ok) return ctx.fail(et::Error::InvalidArgument);
  const int64_t D = w.size(0);
  rms_norm(x.const_data_ptr<float>(), w.const_data_ptr<float>(), eps, x.numel() / D, D, out.mutable_data_ptr<float>());
  if (stack.size() > 4) *stack[4] = *stack[3];
}

// (x, weight, out) and the return slot: x (..., in) -> out (..., out_features), weight (out_features, in).
void fp32_linear_out(et::KernelRuntimeContext& ctx, et::Span<et::EValue*> stack) {
  if (!tensors(stack, {0, 1, 2})) return ctx.fail(et::Error::InvalidArgument);
  const Tensor& x = stack[0]->toTensor();
  const Tensor& w = stack[1]->toTensor();
  Tensor& out = stack[2]->toTensor();
  if (x.scalar_type() != ScalarType::Float || w.scalar_type() != ScalarType::Float ||
      out.scalar_type() != ScalarType::Float || x.dim() < 1 || x.dim() > 8 || w.dim() != 2 || w.size(1) < 1 ||
      w.size(0) < 1 || x.size(x.dim() - 1) != w.size(1))
    return ctx.fail(et::Error::InvalidArgument);
  if (!resize_as_linear(out, x, w.size(0))) return ctx.fail(et::Error::InvalidArgument);
  struct Job {
    const float *x, *w;
    float* out;
    int64_t rows, in, out_features, per;
  } job{x.const_data_ptr<float>(), w.const_data_ptr<float>(), out.mutable_data_ptr<float>(), x.numel() / w.size(1),
        w.size(1), w.size(0), 0};
  // a prompt's rows over the pool (a router over 64 tokens is ~0.1 ms a layer on one thread); a token's on this one
  const int64_t threads = job.rows * job.in * job.out_features >= kFp32ParallelProducts ? pool_threads() : 1;
  job.per = (job.rows + threads - 1) / threads;
  pool_parallel(&job, [](void* ctx, int64_t part) {
    const Job& j = *static_cast<const Job*>(ctx);
    const int64_t first = part * j.per, rows = std::min(j.per, j.rows - first);
    if (rows > 0) fp32_linear(j.x + first * j.in, j.w, rows, j.in, j.out_features, j.out + first * j.out_features);
  }, threads);
  if (stack.size() > 3) *stack[3] = *stack[2];
}

// (x, start, heads, head_dim, cos or None, sin or None, out) and the return slot: x (1, T, F) -> out (1, H, T, d).
void heads_out(et::KernelRuntimeContext& ctx, et::Span<et::EValue*> stack) {
  if (!tensors(stack, {0, 6}) || !ints(stack, {1, 2, 3}) || stack[4]->isNone() != stack[5]->isNone() ||
      (!stack[4]->isNone() && !tensors(stack, {4, 5})))
    return ctx.fail(et::Error::InvalidArgument);
  const Tensor& x = stack[0]->toTensor();
  const int64_t start = stack[1]->toInt(), H = stack[2]->toInt(), d = stack[3]->toInt();
  const bool rope = !stack[4]->isNone();
  Tensor& out = stack[6]->toTensor();
  if (x.scalar_type() != ScalarType::Float || out.scalar_type() != ScalarType::Float || x.dim() != 3 ||
      x.size(0) != 1 || start < 0 || H < 1 || d < 1 || H > x.size(2) || d > x.size(2) ||
      start + H * d > x.size(2))
    return ctx.fail(et::Error::InvalidArgument);
  const int64_t T = x.size(1);
  const float *cos = nullptr, *sin = nullptr;
  if (rope) {
    const Tensor& c = stack[4]->toTensor();
    const Tensor& s = stack[5]->toTensor();
    if (c.scalar_type() != ScalarType::Float || s.scalar_type() != ScalarType::Float || c.dim() != 2 ||
        s.dim() != 2 || c.size(0) != T || s.size(0) != T || c.size(1) != d || s.size(1) != d || d % 2)
      return ctx.fail(et::Error::InvalidArgument);
    cos = c.const_data_ptr<float>(), sin = s.const_data_ptr<float>();
  }
  const SizesType sizes[4] = {1, static_cast<SizesType>(H), static_cast<SizesType>(T), static_cast<SizesType>(d)};
  if (et::resize_tensor(out, {sizes, 4}) != et::Error::Ok) return ctx.fail(et::Error::InvalidArgument);
  heads(x.const_data_ptr<float>(), T, x.size(2), start, H, d, cos, sin, out.mutable_data_ptr<float>());
  if (stack.size() > 7) *stack[7] = *stack[6];
}

// Looked up in the registry's list: registry_has_op_function logs an error line for every name it does not find,
// which would break the runtime's one-line stderr.
bool registered(const char* name) {
  for (const et::Kernel& k : et::get_registered_kernels())
    if (k.name_ && std::strcmp(k.name_, name) == 0) return true;
  return false;
}

}  // namespace

bool register_ops() {
  static bool ok = false;
  static std::once_flag once;
  std::call_once(once, [] {
    // Another copy of this code in the process may have registered them already (libcosmoes loaded beside the
    // Python runtime's libcosmoes_ops): ExecuTorch aborts on a second registration of a name; the kernels are the same.
    static const et::Kernel kernels[] = {et::Kernel(kCachedAttention, cached_attention_out),
                                         et::Kernel(kInt4Linear, int4_linear_out), et::Kernel(kRmsNorm, rms_norm_out),
                                         et::Kernel(kHeads, heads_out), et::Kernel(kFp32Linear, fp32_linear_out)};
    ok = true;
    for (const et::Kernel& kernel : kernels)
      if (!registered(kernel.name_)) ok = ok && et::register_kernels({&kernel, 1}) == et::Error::Ok;
  });
  return ok;
}

}  // namespace cosmoes
