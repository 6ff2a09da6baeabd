// Native runtime: ExecuTorch Modules for the backbone and the experts, expert methods loaded/unloaded per policy.
#include "runtime.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <thread>
#include <unordered_set>

#include <executorch/extension/module/module.h>
#include <executorch/runtime/core/function_ref.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/platform/platform.h>
#include <unistd.h>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "ops.h"
#include "errors.h"
#include "pool.h"
#include "pte.h"
#include "sysinfo.h"


namespace cosmoes {

using executorch::extension::from_blob;
using executorch::extension::module::Module;
using EtError = executorch::runtime::Error;
using executorch::runtime::EValue;
using Clock = std::chrono::steady_clock;
namespace et = executorch::runtime;

namespace {

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

std::string et_error(EtError e) {
  return "ExecuTorch error " + std::to_string(static_cast<int>(e)) + " (" + executorch::runtime::to_string(e) + ")";
}

// The method ExecuTorch is loading or running (null: none), for the line an ExecuTorch abort prints.
const std::string* g_method = nullptr;

struct InMethod {
  explicit InMethod(const std::string& method) : previous(g_method) { g_method = &method; }
  ~InMethod() { g_method = previous; }
  const std::string* previous;
};

// ExecuTorch's abort (a failed ET_CHECK in a kernel or delegate, after it logged why): the same one error line and
// exit status 2 as every other refusal, instead of SIGABRT.
void abort_as_error() {
  std::fprintf(stderr, "error: ExecuTorch stopped %s%s: the program is corrupt or not one this runtime can run (its "
               "reason is logged above); re-export the bundle\n", g_method ? "in method " : "outside any method",
               g_method ? g_method->c_str() : "");
  std::fflush(stderr);
  std::_Exit(2);
}


// Runs a method and checks it returned at least `outputs` values, so callers may index them.
std::vector<EValue> run(Module& program, const std::string& method, std::vector<EValue> inputs, size_t outputs,
                        double& ms) {
  InMethod in(method);
  auto t0 = Clock::now();
  auto result = program.execute(method, inputs);
  if (!result.ok()) throw cosmoes::Error("running " + method + " failed: " + et_error(result.error()));
  ms += ms_since(t0);
  if (result->size() < outputs)
    throw cosmoes::Error("method " + method + " returned " + std::to_string(result->size()) + " values, expected " +
                         std::to_string(outputs));
  return std::move(result.get());
}

// A float tensor output of `numel` elements, copied (outputs alias the shared arena). The signatures were checked
// when the programs opened; this catches a program whose execution disagrees with its own metadata, before any
// caller indexes past the buffer.
const float* checked_floats(const EValue& v, int64_t numel, const std::string& what) {
  if (!v.isTensor() || v.toTensor().scalar_type() != executorch::aten::ScalarType::Float ||
      v.toTensor().numel() != numel)
    throw cosmoes::Error(what + " did not return a float tensor of " + std::to_string(numel) + " elements");
  return v.toTensor().const_data_ptr<float>();
}

// Into a buffer the runtime keeps: a prefill chunk's T x D activations are 115 kB for wearable-moe at T = 64, which
// glibc mapped and unmapped on every copy (munmap: a TLB shootdown to the pool's threads), several per layer.
void copy_floats(const EValue& v, int64_t numel, const std::string& what, std::vector<float>& out) {
  const float* p = checked_floats(v, numel, what);
  out.assign(p, p + numel);
}

// Softmax(τ·scores) over one token's experts in fp32, then the top-k ids and (optionally renormalised) weights,
// as cosmoes.model.route computes them.
void route_token(const float* scores_E, int64_t E, int64_t K, float tau, bool renorm, int64_t* ids_K,
                 float* weights_K) {
  std::vector<float> probs(E);
  float mx = -INFINITY;
  for (int64_t e = 0; e < E; ++e) mx = std::max(mx, scores_E[e] * tau);
  float sum = 0.f;
  for (int64_t e = 0; e < E; ++e) sum += (probs[e] = std::exp(scores_E[e] * tau - mx));
  for (int64_t e = 0; e < E; ++e) probs[e] /= sum;
  std::vector<int64_t> order(E);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return probs[a] > probs[b]; });
  float total = 0.f;
  for (int64_t k = 0; k < K; ++k) total += probs[order[k]];
  for (int64_t k = 0; k < K; ++k) {
    ids_K[k] = order[k];
    weights_K[k] = renorm ? probs[order[k]] / total : probs[order[k]];
  }
}

// -- Method signatures: what the runtime passes and reads, checked against each program's metadata -------------
using executorch::aten::ScalarType;

struct Dim {
  enum Kind { Any, Exact, AtLeast } kind;
  int64_t n;
};
Dim any() { return {Dim::Any, 0}; }
Dim eq(int64_t n) { return {Dim::Exact, n}; }
Dim ge(int64_t n) { return {Dim::AtLeast, n}; }  // a dynamic dimension: its planned upper bound must reach n

struct TensorSpec {
  ScalarType dtype;
  std::vector<Dim> dims;
};

struct Signature {
  std::vector<TensorSpec> inputs, outputs;
};

std::string show(ScalarType dtype, const std::vector<std::string>& dims) {
  std::string out = dtype == ScalarType::Float ? "float [" : dtype == ScalarType::Long ? "int64 [" : "dtype " +
                    std::to_string(static_cast<int>(dtype)) + " [";
  for (size_t i = 0; i < dims.size(); ++i) out += (i ? ", " : "") + dims[i];
  return out + "]";
}

std::string show(const TensorSpec& spec) {
  std::vector<std::string> dims;
  for (const Dim& d : spec.dims)
    dims.push_back(d.kind == Dim::Any ? "*" : (d.kind == Dim::AtLeast ? ">=" : "") + std::to_string(d.n));
  return show(spec.dtype, dims);
}

bool matches(const et::TensorInfo& info, const TensorSpec& spec) {
  auto sizes = info.sizes();
  if (info.scalar_type() != spec.dtype || sizes.size() != spec.dims.size()) return false;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const Dim& d = spec.dims[i];
    if ((d.kind == Dim::Exact && sizes[i] != d.n) || (d.kind == Dim::AtLeast && sizes[i] < d.n)) return false;
  }
  return true;
}

// An FFN (an expert or a dense layer's layer_i_ffn): up to max_chunk tokens x dim in, as many rows out.
Signature ffn_signature(const BundleManifest& m) {
  return {{{ScalarType::Float, {ge(m.max_chunk), eq(m.dim)}}}, {{ScalarType::Float, {any(), eq(m.dim)}}}};
}

// i of "layer_i" (a name required_methods made, so its digits are there).
int64_t layer_index(const std::string& method) { return std::stoll(method.substr(6)); }

// What the runtime calls backbone method `method` (a name required_methods gives) with and reads from it, for this
// manifest (see run_chunk): T tokens of a chunk, S cache slots, D = dim, hd = head_dim.
Signature backbone_signature(const BundleManifest& m, const std::string& method) {
  const int64_t T = m.max_chunk, S = m.max_seq_len, D = m.dim, hd = m.head_dim;
  const auto F = ScalarType::Float, I = ScalarType::Long;
  const TensorSpec out_1TD{F, {eq(1), any(), eq(D)}};
  if (method == "embed") return {{{I, {eq(1), ge(T)}}}, {out_1TD}};
  if (method == "context")
    return {{{I, {ge(T)}}, {I, {ge(S)}}}, {{F, {any(), eq(hd)}}, {F, {any(), eq(hd)}}, {F, {any(), ge(S)}}}};
  if (method == "head") return {{{F, {eq(1), ge(1), eq(D)}}}, {{F, {eq(1), any(), eq(m.vocab_size)}}}};
  if (method.size() > 4 && method.compare(method.size() - 4, 4, "_ffn") == 0) return ffn_signature(m);
  Signature s{{{F, {eq(1), ge(T), eq(D)}}, {F, {ge(T), eq(hd)}}, {F, {ge(T), eq(hd)}}, {F, {ge(T), ge(S)}}},
              {out_1TD, out_1TD}};  // layer_i: hidden state, RoPE cos/sin, causal bias -> attention out, FFN input
  if (!m.is_moe) return s;
  s.outputs.push_back({F, {eq(1), any(), eq(m.num_experts)}});  // router scores
  if (layer_index(method) + 1 < m.n_layers) s.outputs.push_back(s.outputs.back());  // the next layer's, foretold
  return s;
}

// One tensor of a method's metadata against what the runtime uses; throws naming the program and method.
void check_tensor(const std::string& where, const char* kind, size_t i, et::Result<et::Tag> tag,
                  et::Result<et::TensorInfo> info, const TensorSpec& spec) {
  std::string what = where + ": " + kind + " " + std::to_string(i);
  if (!tag.ok() || tag.get() != et::Tag::Tensor || !info.ok())
    throw cosmoes::Error(what + " is not a tensor; the runtime uses " + show(spec));
  if (!matches(info.get(), spec)) {
    std::vector<std::string> dims;
    for (int32_t n : info->sizes()) dims.push_back(std::to_string(n));
    throw cosmoes::Error(what + " is " + show(info->scalar_type(), dims) + ", the runtime uses " + show(spec) +
                         " for this manifest");
  }
}

void check_signature(Module& mod, const std::string& path, const std::string& method, const Signature& want) {
  const std::string where = "program " + path + " method " + method;
  auto meta = mod.method_meta(method);
  if (!meta.ok()) throw cosmoes::Error(where + ": unreadable metadata (" + et_error(meta.error()) + ")");
  if (meta->num_inputs() != want.inputs.size() || meta->num_outputs() != want.outputs.size())
    throw cosmoes::Error(where + " takes " + std::to_string(meta->num_inputs()) + " inputs and returns " +
                         std::to_string(meta->num_outputs()) + " outputs; the runtime passes " +
                         std::to_string(want.inputs.size()) + " and reads " + std::to_string(want.outputs.size()));
  for (size_t i = 0; i < want.inputs.size(); ++i)
    check_tensor(where, "input", i, meta->input_tag(i), meta->input_tensor_meta(i), want.inputs[i]);
  for (size_t i = 0; i < want.outputs.size(); ++i)
    check_tensor(where, "output", i, meta->output_tag(i), meta->output_tensor_meta(i), want.outputs[i]);
}

}  // namespace

// -- Policy -----------------------------------------------------------------------------------------------------
std::string Policy::name() const {
  if (kind == Kind::All) return "all";
  if (kind == Kind::Swap) return "swap";
  return "lru:" + std::to_string(capacity);
}

Policy Policy::parse(const std::string& text, int64_t top_k) {
  Policy p;
  if (text == "all") { p.kind = Kind::All; return p; }
  if (text == "swap") { p.kind = Kind::Swap; return p; }
  if (text.rfind("lru:", 0) == 0 && text.size() > 4 &&
      std::all_of(text.begin() + 4, text.end(), [](char c) { return c >= '0' && c <= '9'; }) && text.size() < 14) {
    p.kind = Kind::Lru;
    p.capacity = std::stoll(text.substr(4));
    if (p.capacity < top_k)
      throw cosmoes::Error("expert cache policy " + text + ": lru needs N >= top_k = " + std::to_string(top_k) +
                           " experts per layer");
    return p;
  }
  throw cosmoes::Error("unknown expert cache policy '" + text + "': use all, swap or lru:N (e.g. lru:4)");
}

Policy Policy::from_budget(const BundleManifest& m, int64_t budget_bytes) {
  Policy p;
  if (!m.is_moe) { p.kind = Kind::All; return p; }
  int64_t per_slot = m.n_layers * m.max_expert_bytes();  // one more expert resident in every layer
  int64_t minimum = m.non_expert_total() + m.top_k * per_slot;
  if (budget_bytes < minimum) {
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "memory budget %.1f MB is below this bundle's minimum of %.1f MB (non-expert weights %.1f MB + "
                  "top_k=%lld experts in each of %lld layers)",
                  budget_bytes / 1e6, minimum / 1e6, m.non_expert_total() / 1e6, (long long)m.top_k,
                  (long long)m.n_layers);
    throw cosmoes::Error(buf);
  }
  int64_t n = (budget_bytes - m.non_expert_total()) / per_slot;
  if (n >= m.num_experts) { p.kind = Kind::All; return p; }
  p.kind = Kind::Lru;
  p.capacity = n;
  return p;
}

// -- ExpertCache ------------------------------------------------------------------------------------------------
ExpertCache::ExpertCache(Module& program, executorch::runtime::HierarchicalAllocator* planned, const BundleManifest& m,
                         Policy policy)
    : program_(&program), planned_(planned), m_(m), policy_(policy), lru_(m.n_layers), pending_(m.n_layers) {
  stats_.selections.resize(m.n_layers);
}

ExpertCache::ExpertCache(const SegmentMap& segments, const BundleManifest& m, Policy policy, bool cold)
    : segments_(&segments), m_(m), policy_(policy), lru_(m.n_layers), asked_(m.n_layers), pending_(m.n_layers),
      cold_(cold) {
  stats_.selections.resize(m.n_layers);
}

int64_t ExpertCache::resident_count() const {
  int64_t n = 0;
  for (const auto& layer : lru_) n += static_cast<int64_t>(layer.size());
  return n;
}

void ExpertCache::prefetch(int64_t layer, const std::vector<int64_t>& foretold) {
  auto t0 = Clock::now();
  auto& asked = asked_[layer];
  asked.clear();
  for (int64_t e : foretold) {
    if (std::find(lru_[layer].begin(), lru_[layer].end(), e) != lru_[layer].end()) continue;
    const ExpertEntry& entry = m_.experts[layer][e];
    segments_->prefetch(entry.offset);
    asked.push_back(e);
  }
  stats_.prefetched += static_cast<int64_t>(asked.size());
  stats_.prefetch_ms += ms_since(t0);
}

void ExpertCache::begin_step(int64_t layer, const std::vector<int64_t>& selected) {
  pending_[layer] = selected;
  if (cold_)  // a prefetch the router did not confirm: cold, its bytes leave the page cache (int4 segments only)
    for (int64_t e : asked_[layer])
      if (std::find(selected.begin(), selected.end(), e) == selected.end())
        segments_->forget(m_.experts[layer][e].offset);
  if (policy_.kind != Policy::Kind::Swap) return;
  std::vector<int64_t> leaving;
  for (int64_t e : lru_[layer])
    if (std::find(selected.begin(), selected.end(), e) == selected.end()) leaving.push_back(e);
  for (int64_t e : leaving) evict(layer, e);
}

constexpr int64_t kPackedSamples = 16;

const std::string& ExpertCache::acquire(int64_t layer, int64_t expert) {
  auto& order = lru_[layer];
  auto& pending = pending_[layer];
  pending.erase(std::remove(pending.begin(), pending.end(), expert), pending.end());
  const std::string& method = m_.experts[layer][expert].method;
  auto it = std::find(order.begin(), order.end(), expert);
  if (it != order.end()) {
    order.splice(order.end(), order, it);
    return method;
  }
  if (policy_.kind == Policy::Kind::Lru && static_cast<int64_t>(order.size()) >= policy_.capacity)
    evict(layer, victim(layer));
  if (segments_) {  // a segment used in place: loading is bringing its pages in
    page(m_.experts[layer][expert].offset, true);
    stats_.loads += 1;
    auto& asked = asked_[layer];
    if (std::find(asked.begin(), asked.end(), expert) != asked.end()) stats_.prefetch_hits += 1;
    order.push_back(expert);
    stats_.resident_peak = std::max(stats_.resident_peak, resident_count());
    return method;
  }
  // The first loads also measure what a resident expert costs (reading /proc is kept out of the load time).
  const bool sample = stats_.packed_samples < kPackedSamples;
  const double anon0 = sample ? anon_rss_mb() : 0;
  auto t0 = Clock::now();
  InMethod in(method);
  EtError err = program_->load_method(method, planned_);
  if (err != EtError::Ok)
    throw cosmoes::Error("loading expert method " + method + " of " + m_.path(m_.program("experts")) + " failed: " +
                         et_error(err));
  stats_.load_ms += ms_since(t0);
  if (sample && anon0 >= 0) {
    stats_.packed_mb_sum += std::max(0.0, anon_rss_mb() - anon0);
    stats_.packed_samples += 1;
  }
  stats_.loads += 1;
  order.push_back(expert);
  stats_.resident_peak = std::max(stats_.resident_peak, resident_count());
  return method;
}

// The least recently used expert the step will not run again: evicting one it still needs (resident, but later in
// ascending order than the miss) would only load it back a moment later.
int64_t ExpertCache::victim(int64_t layer) const {
  const auto& pending = pending_[layer];
  for (int64_t e : lru_[layer])
    if (std::find(pending.begin(), pending.end(), e) == pending.end()) return e;
  return lru_[layer].front();
}

void ExpertCache::release(int64_t layer, int64_t expert, const std::vector<int64_t>& keep) {
  if (policy_.kind != Policy::Kind::Swap || std::find(keep.begin(), keep.end(), expert) != keep.end()) return;
  evict(layer, expert);
}

void ExpertCache::evict(int64_t layer, int64_t expert) {
  const ExpertEntry& entry = m_.experts[layer][expert];
  if (segments_) {
    page(entry.offset, false);
  } else {
    auto t0 = Clock::now();
    program_->unload_method(entry.method);  // destroys the XNNPACK runtime + packed weights
    stats_.evict_ms += ms_since(t0);
  }
  lru_[layer].remove(expert);
  stats_.evictions += 1;
}

// A segment's pages in or out, now or (deferred) in run_paging's turn.
void ExpertCache::page(int64_t offset, bool in) {
  if (defer_)
    paging_.emplace_back(offset, in);
  else
    page_now(offset, in);
}

void ExpertCache::page_now(int64_t offset, bool in) {
  auto t0 = Clock::now();
  in ? segments_->bring_in(offset) : segments_->give_back(offset);
  (in ? stats_.load_ms : stats_.evict_ms) += ms_since(t0);
}

double ExpertCache::run_paging() {
  auto t0 = Clock::now();
  for (const auto& [offset, in] : paging_) page_now(offset, in);
  paging_.clear();
  return ms_since(t0);
}

bool ExpertCache::resident(int64_t layer, int64_t expert) const {
  return std::find(lru_[layer].begin(), lru_[layer].end(), expert) != lru_[layer].end();
}

std::vector<double> ExpertStats::exrep_per_layer(int64_t num_experts) const {
  // Eq. 4-5: floor(H/2) / (K (T-1)), H = Σ_t |S_{t+1} Δ S_t| counted over expert membership.
  std::vector<double> out;
  for (const auto& tokens : selections) {
    if (tokens.size() < 2) { out.push_back(0.0); continue; }
    int64_t H = 0, K = static_cast<int64_t>(tokens[0].size());
    for (size_t t = 1; t < tokens.size(); ++t) {
      std::vector<int> member(num_experts, 0);
      for (int64_t e : tokens[t - 1]) member[e] |= 1;
      for (int64_t e : tokens[t]) member[e] |= 2;
      for (int v : member) H += (v == 1 || v == 2);
    }
    out.push_back(static_cast<double>(H / 2) / static_cast<double>(K * (tokens.size() - 1)));
  }
  return out;
}

static std::string sizes_text(const std::vector<int64_t>& sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

// -- Runtime ----------------------------------------------------------------------------------------------------
Runtime::Runtime(const std::string& bundle_dir, const RuntimeOptions& options) {
  return_freed_weights_to_os();
  if (!register_ops())
    throw cosmoes::Error(
        "ExecuTorch refused the runtime's operators (cosmoes::cached_attention, cosmoes::int4_linear)");
  auto t0 = Clock::now();
  m_ = load_bundle_manifest(bundle_dir, options.check_sha);
  check_sha_ = options.check_sha;
  cold_experts_ = options.cold_experts;
  prefetch_ = options.prefetch;
  verify_ms_ = ms_since(t0);
  if (prefetch_ && !m_.packed_experts())
    throw cosmoes::Error(std::string("--prefetch needs int4 expert segments (expert_layout int4); this bundle's "
                                     "expert_layout is ") + (m_.is_moe ? "xnnpack" : "none (a dense model)"));
  if (options.budget_mb > 1e9) throw cosmoes::Error("a memory budget must be at most 1e9 MB");  // int64 bytes
  policy_ = options.budget_mb > 0 ? Policy::from_budget(m_, static_cast<int64_t>(options.budget_mb * 1e6))
                                  : Policy::parse(options.policy, m_.top_k);
  // 0 (from the option or the recipe) means one thread per core, as in the Python runtime
  threads_ = options.threads > 0 ? options.threads : static_cast<int>(m_.threads);
  if (threads_ <= 0) threads_ = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  // With int4 experts and an 8da4w backbone every heavy operator is the project's (attention, projections, routers,
  // head, experts; format 8 lowers that backbone with no delegate): they share the spinning pool, and ExecuTorch's
  // pool keeps one thread. Other bundles run their linears in XNNPACK, on ExecuTorch's pool.
  const bool own_pool = threads_ > 1 && m_.packed_experts() && m_.quant == "8da4w";
  if (own_pool) spin_ = std::make_unique<SpinPool>(threads_);
  const size_t et_threads = own_pool ? 1 : static_cast<size_t>(threads_);
  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (pool && pool->get_thread_count() != et_threads) pool->_unsafe_reset_threadpool(static_cast<uint32_t>(et_threads));
  t0 = Clock::now();
  open_programs();
  load_ms_ = ms_since(t0);
}

Runtime::~Runtime() = default;

// Opens a program and checks, before any method is loaded or run, that it has every method the manifest lists and
// that each one the runtime calls takes and returns the tensors the runtime passes and reads.
std::unique_ptr<Module> Runtime::open_program(const ProgramFile& p, const std::vector<std::string>& calls,
                                              std::unique_ptr<LazyArena>& arena) {
  // Mmap: segments are paged in when a method's weights are packed and unmapped afterwards, so an unloaded expert
  // costs no memory. The planned buffers are not the Module's own (zero-filled, resident from load) but one
  // LazyArena per program that every method loads with: the KV caches are shared mutable buffers that every layer
  // method must see, and their pages become resident only as positions fill.
  auto mod = std::make_unique<Module>(m_.path(p), Module::LoadMode::Mmap);
  // InternalConsistency runs the flatbuffer verifier over the whole program: a file whose bytes were altered (and
  // its manifest size and sha256 rewritten to match) is refused here instead of crashing Method::init later.
  EtError err = mod->load(et::Program::Verification::InternalConsistency);
  if (err != EtError::Ok) throw cosmoes::Error("ExecuTorch cannot open " + m_.path(p) + ": " + et_error(err));
  check_operator_table(m_.path(p));
  auto names = mod->method_names();
  if (!names.ok()) throw cosmoes::Error("cannot list the methods of " + m_.path(p));
  for (const auto& method : p.methods)
    if (!names.get().count(method))
      throw cosmoes::Error("program " + m_.path(p) + " lacks method '" + method + "' listed in the manifest");
  for (const auto& method : calls)
    check_signature(*mod, m_.path(p), method, p.name == "backbone" ? backbone_signature(m_, method) : ffn_signature(m_));
  arena = std::make_unique<LazyArena>(planned_sizes(*mod, p));
  return mod;
}

// The program's memory-planned buffers: each shared buffer id is as large as its largest user.
std::vector<int64_t> Runtime::planned_sizes(Module& mod, const ProgramFile& p) const {
  std::vector<int64_t> largest;
  for (const auto& method : p.methods) {
    auto meta = mod.method_meta(method);
    if (!meta.ok()) continue;
    for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
      auto size = meta->memory_planned_buffer_size(i);
      if (!size.ok()) throw cosmoes::Error("program " + m_.path(p) + " method " + method + ": unreadable buffer plan");
      if (largest.size() <= i) largest.resize(i + 1, 0);
      largest[i] = std::max<int64_t>(largest[i], size.get());
    }
  }
  auto recorded = m_.planned_bytes.find(p.name);
  if (recorded != m_.planned_bytes.end() && recorded->second != largest)
    throw cosmoes::Error("program " + m_.path(p) + " plans " + sizes_text(largest) +
                         " bytes of buffers, its manifest says " + sizes_text(recorded->second) +
                         " (memory.planned_bytes." + p.name + "); re-export the bundle");
  int64_t total = 0;
  for (int64_t b : largest) total += b;
  // A corrupt plan asks for absurd buffers: refused before any address space is reserved for them.
  const int64_t ram = static_cast<int64_t>(::sysconf(_SC_PHYS_PAGES)) * ::sysconf(_SC_PAGE_SIZE);
  if (ram > 0 && total > ram)
    throw cosmoes::Error("program " + m_.path(p) + " plans " + std::to_string(total / 1000000) +
                         " MB of activation buffers, more than this machine's " + std::to_string(ram / 1000000) +
                         " MB of memory; re-export the bundle");
  return largest;
}

std::vector<KindBytes> Runtime::resident_by_kind() const {
  std::vector<KindBytes> out;
  for (const char* kind : {"embedding", "attention", "head", "dense_ffn"})
    if (m_.non_expert_bytes.count(kind)) out.push_back({kind, loaded_.mb(kind), 0});
  std::vector<std::string> files = {m_.path(m_.program("backbone"))};
  if (m_.is_moe) files.push_back(m_.experts_path());
  std::vector<double> file_mb = mapped_file_rss_mb(files);
  // What stays mapped of backbone.pte is the weights read in place (the embedding table and, with an int4
  // backbone, the projections, routers and head; XNNPACK's segments are unmapped once packed) and the program's
  // tables; all of it is reported as the embedding's file pages.
  if (!out.empty() && out[0].kind == "embedding") out[0].file_mb = std::max(0.0, file_mb[0]);
  if (m_.is_moe) {
    const ExpertStats& st = experts_->stats();
    // int4 segments are file pages only; XNNPACK's packed copies are anonymous
    double per_expert = st.packed_samples ? st.packed_mb_sum / st.packed_samples : 0;
    out.push_back({"experts", segments_ ? 0.0 : per_expert * experts_->resident_count(), std::max(0.0, file_mb[1])});
  }
  const LazyArena* kv_arena = m_.kv_program == "backbone" ? backbone_arena_.get() : expert_arena_.get();
  double kv = kv_arena ? kv_arena->resident_bytes(static_cast<size_t>(m_.kv_buffer_id)) / 1e6 : 0;
  out.push_back({"kv_cache", kv, 0});
  out.push_back({"activations", arena_resident_mb() - kv, 0});
  Memory now = process_memory();
  double anon = 0, file = 0;
  for (const auto& k : out) anon += k.anon_mb, file += k.file_mb;
  const double anon_now = anon_rss_mb();
  out.push_back({"runtime", anon_now >= 0 ? std::max(0.0, anon_now - anon) : -1,
                 now.file_mb >= 0 ? std::max(0.0, now.file_mb - file) : -1});
  return out;
}

double Runtime::arena_mb() const {
  int64_t total = 0;
  for (const auto* a : {backbone_arena_.get(), expert_arena_.get()}) total += a ? a->reserved_bytes() : 0;
  return total / 1e6;
}

double Runtime::arena_resident_mb() const {
  int64_t total = 0;
  for (const auto* a : {backbone_arena_.get(), expert_arena_.get()}) total += a ? a->resident_bytes() : 0;
  return total / 1e6;
}

void Runtime::open_programs() {
  auto calls = required_methods(m_);
  if (check_sha_) forget_cached_pages(m_.path(m_.program("backbone")));  // the hash read it all: see footprint.h
  backbone_ = open_program(m_.program("backbone"), calls["backbone"], backbone_arena_);
  for (const auto& method : m_.program("backbone").methods) {
    InMethod in(method);
    EtError err = loaded_.charge(method_kind(method),
                                 [&] { return backbone_->load_method(method, backbone_arena_->planned()); });
    if (err != EtError::Ok)
      throw cosmoes::Error("loading method " + method + " of " + m_.path(m_.program("backbone")) + " failed: " +
                           et_error(err));
  }
  // the embedding is read in place: each token's row should cost its page, not a read-ahead window
  read_in_place_without_readahead(m_.path(m_.program("backbone")));
  if (m_.packed_experts()) {
    const std::string file = m_.path(m_.expert_file);
    int4::active_isa();  // a COSMOES_ISA this CPU cannot run is refused here, before any token
    // A first load reads its own pages (and, cold, reads storage like every other), not the hash's: keeping the
    // large folios the hash's read leaves made the expert kernels up to 2x slower on phone-moe, and under a cgroup
    // cap the kernel reclaimed the backbone's pages before them (docs/export.md, "Each segment its own mapping").
    if (check_sha_ || cold_experts_) forget_cached_pages(file);
    std::vector<int64_t> offsets;
    for (const auto& layer : m_.experts)
      for (const auto& entry : layer) offsets.push_back(entry.offset);
    segments_ = std::make_unique<SegmentMap>(file, m_.expert_file.bytes, offsets, m_.experts[0][0].bytes,
                                             cold_experts_);
    expert_layout_ = expert_matrices(m_.dim, m_.ffn_dim, m_.wd_rank, m_.group_size, nullptr);
    experts_ = std::make_unique<ExpertCache>(*segments_, m_, policy_, cold_experts_);
  } else if (m_.is_moe) {
    expert_program_ = open_program(m_.program("experts"), calls["experts"], expert_arena_);
    experts_ = std::make_unique<ExpertCache>(*expert_program_, expert_arena_->planned(), m_, policy_);
  }
}

void Runtime::reset() {
  pos_ = 0;
  for (auto& layer : expert_stats().selections) layer.clear();
}

void Runtime::check_ids(const std::vector<int64_t>& ids) const {
  if (ids.empty()) throw cosmoes::Error("no token ids to run");
  for (int64_t id : ids)
    if (id < 0 || id >= m_.vocab_size)
      throw cosmoes::Error("token id " + std::to_string(id) + " outside [0, " + std::to_string(m_.vocab_size) + ")");
  if (pos_ + static_cast<int64_t>(ids.size()) > m_.max_seq_len)
    throw cosmoes::Error("sequence of " + std::to_string(pos_ + ids.size()) +
                         " tokens exceeds the bundle's max_seq_len " + std::to_string(m_.max_seq_len));
}

const std::vector<float>& Runtime::prefill(const std::vector<int64_t>& ids) {
  reset();
  return feed(ids);
}

const std::vector<float>& Runtime::decode(int64_t token) { return feed(std::vector<int64_t>{token}); }

const std::vector<float>& Runtime::feed(const std::vector<int64_t>& ids) {
  check_ids(ids);
  PoolScope scope(spin_.get());
  int64_t chunk = std::max<int64_t>(1, std::min(m_.max_chunk, m_.max_seq_len));
  for (size_t at = 0; at < ids.size(); at += chunk) {
    int64_t T = std::min<int64_t>(chunk, ids.size() - at);
    bool last = at + T >= ids.size();
    run_chunk(ids.data() + at, T, last ? &logits_ : nullptr);
  }
  return logits_;
}

void Runtime::run_chunk(const int64_t* ids, int64_t T, std::vector<float>* last_logits) {
  const int64_t D = m_.dim;
  const int L = static_cast<int>(pos_ + T);
  std::vector<int64_t> ids_1T(ids, ids + T), positions_L(L);
  std::iota(positions_L.begin(), positions_L.end(), int64_t{0});
  auto ids_t = from_blob(ids_1T.data(), {1, static_cast<int>(T)}, executorch::aten::ScalarType::Long);
  auto pos_T = from_blob(positions_L.data() + pos_, {static_cast<int>(T)}, executorch::aten::ScalarType::Long);
  auto pos_L = from_blob(positions_L.data(), {L}, executorch::aten::ScalarType::Long);
  // Outputs alias the shared activation arena, so each is copied before the next method runs.
  ChunkBuffers& b = chunk_;
  copy_floats(run(*backbone_, "embed", {EValue(ids_t)}, 1, stage_ms_.embed)[0], T * D, "embed", b.h);
  // RoPE tables + causal bias, once per call for all layers (timed with embed: both are per-call work)
  auto ctx = run(*backbone_, "context", {EValue(pos_T), EValue(pos_L)}, 3, stage_ms_.embed);
  const int d = static_cast<int>(m_.head_dim);
  copy_floats(ctx[0], T * d, "context", b.cos);
  copy_floats(ctx[1], T * d, "context", b.sin);
  copy_floats(ctx[2], T * L, "context", b.bias);
  auto cos_t = from_blob(b.cos.data(), {static_cast<int>(T), d});
  auto sin_t = from_blob(b.sin.data(), {static_cast<int>(T), d});
  auto bias_t = from_blob(b.bias.data(), {static_cast<int>(T), L});
  b.ff.resize(static_cast<size_t>(T * D));
  for (int64_t i = 0; i < m_.n_layers; ++i) {
    auto h_t = from_blob(b.h.data(), {1, static_cast<int>(T), static_cast<int>(D)});
    const std::string layer = "layer_" + std::to_string(i);
    const bool ahead = m_.is_moe && i + 1 < m_.n_layers;  // format 8: the next layer's router scores too
    auto outs = run(*backbone_, layer, {EValue(h_t), EValue(cos_t), EValue(sin_t), EValue(bias_t)},
                    m_.is_moe ? 3 + ahead : 2, stage_ms_.layers);
    copy_floats(outs[0], T * D, layer, b.attn);
    copy_floats(outs[1], T * D, layer, b.x);
    if (m_.is_moe) {
      copy_floats(outs[2], T * m_.num_experts, layer, b.scores);
      if (ahead && prefetch_) {
        copy_floats(outs[3], T * m_.num_experts, layer, b.ahead);
        prefetch_next(i + 1, b.ahead, T);  // before this layer's experts run: their time is the reading's
      }
      moe(i, b.x, b.scores, T, b.ff);
    } else {
      auto x_t = from_blob(b.x.data(), {static_cast<int>(T), static_cast<int>(D)});
      copy_floats(run(*backbone_, layer + "_ffn", {EValue(x_t)}, 1, stage_ms_.experts)[0], T * D, layer + "_ffn",
                  b.ff);
    }
    for (int64_t j = 0; j < T * D; ++j) b.h[j] = b.attn[j] + b.ff[j];
  }
  pos_ += T;
  if (!last_logits) return;  // a prompt's earlier chunks only fill the KV caches
  auto last_t = from_blob(b.h.data() + (T - 1) * D, {1, 1, static_cast<int>(D)});
  const float* logits = checked_floats(run(*backbone_, "head", {EValue(last_t)}, 1, stage_ms_.head)[0], m_.vocab_size,
                                      "head");
  last_logits->assign(logits, logits + m_.vocab_size);
}

void Runtime::ExpertWork::route(const std::vector<int64_t>& ids_TK, int64_t K, int64_t expert) {
  token.clear(), slot.clear();
  for (int64_t at = 0; at < static_cast<int64_t>(ids_TK.size()); ++at)
    if (ids_TK[at] == expert) token.push_back(at / K), slot.push_back(at % K);
}

void Runtime::ExpertWork::gather(const float* x_TD, int64_t D) {
  x.resize(token.size() * static_cast<size_t>(D));
  for (size_t n = 0; n < token.size(); ++n) std::copy_n(x_TD + token[n] * D, D, x.begin() + n * D);
}

void Runtime::ExpertWork::add_weighted(const float* y_ND, const std::vector<float>& weights_TK, int64_t K, int64_t D,
                                       std::vector<float>& out_TD) const {
  for (size_t n = 0; n < token.size(); ++n) {
    const float w = weights_TK[token[n] * K + slot[n]];
    float* out = &out_TD[token[n] * D];
    for (int64_t d = 0; d < D; ++d) {
      const float product = y_ND[n * D + d] * w;  // rounded before the add, as torch's mul + index_add_
      out[d] += product;
    }
  }
}

void Runtime::prefetch_next(int64_t layer, const std::vector<float>& scores_TE, int64_t T) {
  const int64_t E = m_.num_experts, K = m_.top_k;
  std::vector<int64_t> ids(K);
  std::vector<float> weights(K);
  foretold_.clear();
  for (int64_t t = 0; t < T; ++t) {
    route_token(&scores_TE[t * E], E, K, static_cast<float>(m_.router_temperature), m_.norm_topk_prob, ids.data(),
                weights.data());
    for (int64_t e : ids)
      if (std::find(foretold_.begin(), foretold_.end(), e) == foretold_.end()) foretold_.push_back(e);
  }
  std::sort(foretold_.begin(), foretold_.end());
  experts_->prefetch(layer, foretold_);
}

void Runtime::moe(int64_t layer, const std::vector<float>& x_TD, const std::vector<float>& scores_TE, int64_t T,
                  std::vector<float>& out_TD) {
  const int64_t D = m_.dim, E = m_.num_experts, K = m_.top_k;
  std::vector<int64_t> ids_TK(T * K);
  std::vector<float> weights_TK(T * K);
  auto& record = experts_->stats().selections[layer];
  for (int64_t t = 0; t < T; ++t) {
    route_token(&scores_TE[t * E], E, K, static_cast<float>(m_.router_temperature), m_.norm_topk_prob,
                &ids_TK[t * K], &weights_TK[t * K]);
    record.emplace_back(ids_TK.begin() + t * K, ids_TK.begin() + (t + 1) * K);
  }
  std::vector<int64_t> selected(ids_TK);
  std::sort(selected.begin(), selected.end());
  selected.erase(std::unique(selected.begin(), selected.end()), selected.end());
  const bool beside = side_by_side(selected.size());
  // side by side on the spinning pool, the step's page work waits for one thread while the others start on the
  // experts already resident (see moe_side_by_side)
  experts_->defer_paging(beside && pool_spins());
  experts_->begin_step(layer, selected);
  std::fill(out_TD.begin(), out_TD.end(), 0.f);
  const std::vector<int64_t> last(ids_TK.end() - K, ids_TK.end());
  if (beside) return moe_side_by_side(layer, x_TD, selected, weights_TK, ids_TK, last, out_TD);
  ExpertWork& work = serial_;
  for (int64_t e : selected) {  // ascending, as the eager model, so fp32 sums are added in the same order
    work.route(ids_TK, K, e);
    work.gather(x_TD.data(), D);
    const std::string& method = experts_->acquire(layer, e);
    const int64_t N = static_cast<int64_t>(work.token.size());
    const float* y_ND = nullptr;
    std::vector<EValue> outs;
    if (segments_) {
      run_spread(work, segments_->at(m_.experts[layer][e].offset));
      y_ND = work.out.data();
    } else {
      auto x_t = from_blob(work.x.data(), {static_cast<int>(N), static_cast<int>(D)});
      outs = run(*expert_program_, method, {EValue(x_t)}, 1, stage_ms_.experts);
      y_ND = checked_floats(outs[0], N * D, method);
    }
    work.add_weighted(y_ND, weights_TK, K, D, out_TD);
    experts_->release(layer, e, last);
  }
}

// A step's experts at once, each on one thread with its own scratch, instead of one expert after another with each
// linear split over the threads: one pool job per layer instead of three per expert, and the gathering, int8
// quantisation and gate of every expert run in parallel too (wearable-moe on 2 threads: decode 1.3 -> 1.9x of one
// thread with the spinning pool). Needs every selected expert resident at once: decode under any policy (each holds
// top_k per layer), prefill under `all` or an lru:N with N >= the experts selected. The outputs are added afterwards
// in ascending expert order, token by token, as in moe().
bool Runtime::side_by_side(size_t selected) const {
  if (!segments_ || threads_ <= 1 || selected <= 1) return false;
  return selected <= static_cast<size_t>(m_.top_k) || policy_.kind == Policy::Kind::All ||
         (policy_.kind == Policy::Kind::Lru && static_cast<size_t>(policy_.capacity) >= selected);
}

void Runtime::moe_side_by_side(int64_t layer, const std::vector<float>& x_TD, const std::vector<int64_t>& selected,
                               const std::vector<float>& weights_TK, const std::vector<int64_t>& ids_TK,
                               const std::vector<int64_t>& last, std::vector<float>& out_TD) {
  const int64_t D = m_.dim, K = m_.top_k, n = static_cast<int64_t>(selected.size());
  // grown, never shrunk: a decode step after a prefill would free (munmap) the scratch the next prefill needs
  if (side_.size() < selected.size()) side_.resize(selected.size());
  std::vector<int64_t> resident, missing;  // indices into selected
  for (int64_t i = 0; i < n; ++i) {
    side_[i].route(ids_TK, K, selected[i]);
    (experts_->resident(layer, selected[i]) ? resident : missing).push_back(i);
    experts_->acquire(layer, selected[i]);  // deferred paging: the bookkeeping only
    side_[i].segment = segments_->at(m_.experts[layer][selected[i]].offset);
  }
  experts_->defer_paging(false);
  if (!experts_->paging_pending()) {  // every expert resident, or paged in already (the pool does not spin)
    std::vector<int64_t> all(selected.size());
    std::iota(all.begin(), all.end(), int64_t{0});
    run_side_by_side(x_TD.data(), all, false);
  } else {
    // A miss's kernel work (unmapping the victim, mapping the new pages: 0.13-0.19 ms for a 1 MB expert here) on one
    // thread while the others run the resident experts, then the loaded ones: one expert split over every thread,
    // or several side by side. Evictions still come before loads, so the bound a policy sets holds throughout.
    run_side_by_side(x_TD.data(), resident, true);
    if (missing.size() == 1) {
      ExpertWork& e = side_[missing[0]];
      e.gather(x_TD.data(), D);
      run_spread(e, e.segment);
    } else {
      run_side_by_side(x_TD.data(), missing, false);
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    side_[i].add_weighted(side_[i].out.data(), weights_TK, K, D, out_TD);
    experts_->release(layer, selected[i], last);
  }
}

// One int4 expert over w's gathered rows, each linear split over the pool's threads; into w.out.
void Runtime::run_spread(ExpertWork& w, const uint8_t* segment) {
  auto t0 = Clock::now();
  const int64_t N = static_cast<int64_t>(w.token.size());
  w.out.resize(static_cast<size_t>(N * m_.dim));
  run_expert(expert_layout_, m_.wd_rank > 0, segment, w.x.data(), N, w.out.data(), w.scratch, pool_parallel, threads_);
  stage_ms_.experts += ms_since(t0);
}

// side_[items] each on one thread, busiest first so the last item a thread takes is a small one; with `paging`, the
// expert cache's deferred page work is the first item (its time is the loads' and evictions', not the experts').
void Runtime::run_side_by_side(const float* x_TD, std::vector<int64_t> items, bool paging) {
  std::stable_sort(items.begin(), items.end(),
                   [&](int64_t a, int64_t b) { return side_[a].token.size() > side_[b].token.size(); });
  struct Job {
    Runtime* self;
    const std::vector<int64_t>* items;
    const float* x_TD;
    bool paging;
    double paging_ms;
  } job{this, &items, x_TD, paging, 0.0};
  auto t0 = Clock::now();
  pool_parallel(&job, [](void* ctx, int64_t item) {
    auto* j = static_cast<Job*>(ctx);
    Runtime& r = *j->self;
    if (j->paging && item-- == 0) {
      j->paging_ms = r.experts_->run_paging();
      return;
    }
    ExpertWork& e = r.side_[(*j->items)[item]];
    const int64_t N = static_cast<int64_t>(e.token.size());
    e.gather(j->x_TD, r.m_.dim);
    e.out.resize(static_cast<size_t>(N * r.m_.dim));
    run_expert(r.expert_layout_, r.m_.wd_rank > 0, e.segment, e.x.data(), N, e.out.data(), e.scratch, nullptr, 1);
  }, static_cast<int64_t>(items.size()) + paging);
  stage_ms_.experts += std::max(0.0, ms_since(t0) - job.paging_ms);
}

// -- Sampler ----------------------------------------------------------------------------------------------------
Sampler::Sampler(double temperature, double top_p, uint64_t seed)
    : temperature_(temperature), top_p_(top_p), rng_(seed) {
  if (!(temperature >= 0)) throw cosmoes::Error("temperature must be >= 0");
  if (!(top_p > 0 && top_p <= 1)) throw cosmoes::Error("top_p must be in (0, 1]");
}

int64_t Sampler::pick(const std::vector<float>& logits) {
  if (temperature_ == 0)
    return std::max_element(logits.begin(), logits.end()) - logits.begin();
  const size_t V = logits.size();
  auto& cand = candidates_;
  cand.resize(V);
  double mx = *std::max_element(logits.begin(), logits.end()) / temperature_, sum = 0;
  // float exp (half the cost of double, ample for drawing one token); far below the maximum it would return a
  // denormal, which costs a hundred times more, for a probability under 1e-38 of the top one's: call that 0
  for (size_t v = 0; v < V; ++v) {
    const float x = static_cast<float>(logits[v] / temperature_ - mx);
    sum += (cand[v].first = x > -87.f ? std::exp(x) : 0.f);
  }
  for (size_t v = 0; v < V; ++v) cand[v].second = static_cast<int64_t>(v);
  size_t keep = V;
  double mass = sum;
  if (top_p_ < 1) {
    // Nucleus: the fewest most probable tokens whose mass reaches top_p. Bisect on their count with partial
    // partitions (linear time in all) instead of sorting the vocabulary, which cost more than a tiny model's step;
    // the kept tokens are sampled in whatever order they lie.
    auto more_probable = [](const std::pair<double, int64_t>& a, const std::pair<double, int64_t>& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    const double target = top_p_ * sum;
    // Tokens under this probability hold less than 1 - top_p of the mass all together, so none of them is in the
    // nucleus: drop them first (a tiny model keeps about half its vocabulary, a trained one far fewer). Capped at 1,
    // the most probable token's own weight, so that one always stays.
    const double cutoff = V > 1 ? std::min(1.0, (sum - target) / static_cast<double>(V - 1)) : 0.0;
    size_t n = 0;
    for (size_t v = 0; v < V; ++v) {
      cand[n] = cand[v];
      n += cand[v].first >= cutoff;  // branch-free: the kept share is unpredictable token by token
    }
    size_t lo = 0, hi = n;  // the lo most probable tokens hold less than target (`below`), the hi most reach it
    double below = 0;
    while (hi - lo > 1) {
      size_t mid = lo + (hi - lo) / 2;
      std::nth_element(cand.begin() + lo, cand.begin() + mid, cand.begin() + hi, more_probable);
      double m = below;
      for (size_t i = lo; i < mid; ++i) m += cand[i].first;
      if (m >= target) hi = mid;
      else { below = m; lo = mid; }
    }
    keep = hi;
    mass = below + cand[lo].first;
  }
  double r = std::uniform_real_distribution<double>(0.0, mass)(rng_);
  for (size_t k = 0; k < keep; ++k)
    if ((r -= cand[k].first) <= 0) return cand[k].second;
  return cand[keep - 1].second;
}

void report_executorch_aborts() {
  et::register_pal(et::PalImpl::create(nullptr, abort_as_error, nullptr, nullptr, nullptr, nullptr, nullptr, __FILE__));
}

void return_freed_weights_to_os() {
#if defined(__GLIBC__)
  // Blocks from 16 KB up (packed expert weights and their buffers) are mmapped, so unloading an expert unmaps them
  // at once. glibc's default threshold rises with each such free and keeps later blocks in its arenas, where only
  // malloc_trim, a walk of the whole heap, gives them back: after every eviction that was two thirds of a tiny
  // model's lru:4 decode step, and it left a higher peak RSS than this does.
  mallopt(M_MMAP_THRESHOLD, 16 * 1024);
#endif
}

}  // namespace cosmoes
