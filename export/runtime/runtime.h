// The native CoSMoEs runtime: resident backbone, experts loaded when the router selects them (§3.4.2, Eq. 8).
//
// Mirrors cosmoes/export/runtime.py step for step (routing softmax(τR) + top-k in fp32, experts run over their
// gathered tokens in ascending id order, weighted sums added in the same order) so both give the same tokens.
#pragma once

#include <chrono>
#include <cstdint>
#include <list>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "arena.h"
#include "bundle.h"
#include "footprint.h"
#include "pool.h"
#include "segments.h"

namespace executorch::extension::module {
class Module;
}

namespace cosmoes {

// Which experts stay resident: all | swap (Eq. 8: exactly the current token's experts) | lru:N per layer.
struct Policy {
  enum class Kind { All, Swap, Lru };
  Kind kind = Kind::Swap;
  int64_t capacity = 0;  // N of lru:N
  std::string name() const;
  // Throws cosmoes::Error for an unknown policy or N < top_k.
  static Policy parse(const std::string& text, int64_t top_k);
  // The largest lru:N whose weights fit budget_bytes (non-expert weights + N experts per layer); `all` if every
  // expert fits. Throws cosmoes::Error naming the minimum when not even top_k experts per layer fit.
  static Policy from_budget(const BundleManifest& m, int64_t budget_bytes);
};

struct ExpertStats {
  int64_t loads = 0, evictions = 0;
  double load_ms = 0.0;
  double evict_ms = 0.0;  // giving resident experts back (unmapping their pages; unloading their methods)
  int64_t resident_peak = 0;
  // anonymous memory added by the first loads (an expert's packed weights), to size the resident experts by
  double packed_mb_sum = 0;
  int64_t packed_samples = 0;
  // --prefetch: experts asked for ahead (not resident when their layer's router was applied a layer early), and
  // the loads that found theirs asked for (hits; a hit's pages were being read while the layer before ran)
  int64_t prefetched = 0, prefetch_hits = 0;
  double prefetch_ms = 0;  // asking (the reading itself goes on in the kernel)
  // per layer, the top-k expert ids of every token of the current sequence (for ExRep, Eq. 4-5)
  std::vector<std::vector<std::vector<int64_t>>> selections;
  std::vector<double> exrep_per_layer(int64_t num_experts) const;
};

// The resident experts, per layer in least-recently-used order: loaded methods of experts.pte (layout xnnpack) or
// brought-in segments of the mapped expert file (layout int4).
class ExpertCache {
 public:
  // Every expert method loads with `planned` (its program's LazyArena), so they share one set of buffers.
  ExpertCache(executorch::extension::module::Module& program, executorch::runtime::HierarchicalAllocator* planned,
              const BundleManifest& m, Policy policy);
  // cold: a prefetched expert that goes unused is dropped from the page cache again (see RuntimeOptions::cold_experts)
  ExpertCache(const SegmentMap& segments, const BundleManifest& m, Policy policy, bool cold = false);
  // A layer's FFN is about to run `selected`: under swap, evict the others before anything loads.
  void begin_step(int64_t layer, const std::vector<int64_t>& selected);
  // Makes the expert's method resident (lru evicts first, so N is never exceeded: the least recently used expert
  // the step does not still need); returns its method name.
  const std::string& acquire(int64_t layer, int64_t expert);
  // The expert has run over its tokens. Under swap, a multi-token step (prefill) keeps only the last token's
  // experts resident, so an expert outside `keep` goes now: at most top_k + 1 experts per layer at any time.
  void release(int64_t layer, int64_t expert, const std::vector<int64_t>& keep);
  // The next layer's experts as its router foretold them a layer early (int4 segments): those not resident start
  // being read now (SegmentMap::prefetch), so their acquire finds the pages in the page cache.
  void prefetch(int64_t layer, const std::vector<int64_t>& foretold);
  // While on (int4 segments only), the page work of begin_step and acquire (evictions, loads) is queued in order
  // instead of done, every counter but the times kept as if it were: run_paging() then does it, on whichever
  // thread, while other threads compute the step's resident experts. An expert acquired is resident by the end of
  // run_paging(); until then only its bookkeeping says so.
  void defer_paging(bool on) { defer_ = on && segments_ != nullptr; }
  bool paging_pending() const { return !paging_.empty(); }
  double run_paging();  // ms spent
  bool resident(int64_t layer, int64_t expert) const;
  ExpertStats& stats() { return stats_; }
  int64_t resident_count() const;
  // How many experts each layer holds now (the app shows it; the stats JSON's resident_per_layer).
  std::vector<int64_t> resident_per_layer() const {
    std::vector<int64_t> n;
    for (const auto& layer : lru_) n.push_back(static_cast<int64_t>(layer.size()));
    return n;
  }

 private:
  executorch::extension::module::Module* program_ = nullptr;
  executorch::runtime::HierarchicalAllocator* planned_ = nullptr;
  const SegmentMap* segments_ = nullptr;
  const BundleManifest& m_;
  Policy policy_;
  std::vector<std::list<int64_t>> lru_;  // per layer, least recent first
  std::vector<std::vector<int64_t>> asked_;  // per layer, the experts of its last prefetch
  std::vector<std::vector<int64_t>> pending_;  // per layer, the step's experts not acquired yet
  bool cold_ = false;
  bool defer_ = false;
  std::vector<std::pair<int64_t, bool>> paging_;  // deferred (segment offset, load: true / eviction: false), in order
  ExpertStats stats_;
  void evict(int64_t layer, int64_t expert);
  void page(int64_t offset, bool in);
  void page_now(int64_t offset, bool in);
  int64_t victim(int64_t layer) const;
};

// Milliseconds spent executing each kind of method since the runtime opened (expert loading is counted apart, in
// ExpertStats::load_ms), so a caller can see where a decode step's time goes.
struct StageTimes {
  double embed = 0, layers = 0, experts = 0, head = 0;
};

struct RuntimeOptions {
  std::string policy = "swap";
  double budget_mb = 0.0;  // > 0: derive the policy from this weight budget instead
  int threads = 0;         // 0 = the bundle's recipe
  bool check_sha = true;
  bool cold_experts = false;  // layout int4: an evicted expert's bytes leave the page cache too (the cold case)
  // layout int4: each MoE layer's experts are asked for while the layer before runs, as that layer's output of the
  // next router foretells them (bundle format 8); beyond the paper, off by default (docs/export.md)
  bool prefetch = false;
};

class Runtime {
 public:
  Runtime(const std::string& bundle_dir, const RuntimeOptions& options);
  ~Runtime();

  const BundleManifest& manifest() const { return m_; }
  const Policy& policy() const { return policy_; }
  ExpertStats& expert_stats() { return experts_ ? experts_->stats() : dense_stats_; }
  double verify_ms() const { return verify_ms_; }
  double load_ms() const { return load_ms_; }
  // Memory-planned buffers (activations, KV caches) of both programs, each shared arena sized to its largest user:
  // reserved address space, and the part of it resident now (it grows with the positions filled).
  double arena_mb() const;
  double arena_resident_mb() const;
  int threads() const { return threads_; }
  bool cold_experts() const { return cold_experts_; }
  // int4 segments that share pages with their neighbours on this system (SegmentMap::pages_shared)
  bool expert_pages_shared() const { return segments_ && segments_->pages_shared(); }
  bool prefetch() const { return prefetch_; }
  const StageTimes& stage_ms() const { return stage_ms_; }
  // Resident memory now by kind: embedding, attention, head, dense_ffn, experts (packed weights anonymous, weights
  // read in place file-backed), kv_cache and activations (the arenas' touched pages), and runtime (the rest of the
  // process: code, heap, XNNPACK's workspace).
  std::vector<KindBytes> resident_by_kind() const;
  // Experts resident per layer now (empty for a dense model).
  std::vector<int64_t> resident_per_layer() const {
    return experts_ ? experts_->resident_per_layer() : std::vector<int64_t>{};
  }

  // Starts a new sequence with `ids`; logits (vocab) of its last position, valid until the next call (one buffer
  // reused: a fresh 0.5 MB vector per token was page faults and a heap trim on every step).
  const std::vector<float>& prefill(const std::vector<int64_t>& ids);
  // Feeds one more token; its logits, valid until the next call.
  const std::vector<float>& decode(int64_t token);
  void reset();

 private:
  BundleManifest m_;
  Policy policy_;
  int threads_ = 1;
  double verify_ms_ = 0.0, load_ms_ = 0.0;
  int64_t pos_ = 0;
  StageTimes stage_ms_;
  // Declared before the Modules: a loaded method points into its arena, so the arenas are destroyed last.
  std::unique_ptr<LazyArena> backbone_arena_, expert_arena_;
  std::unique_ptr<executorch::extension::module::Module> backbone_, expert_program_;
  std::unique_ptr<SegmentMap> segments_;  // layout int4: the mapped expert file
  std::vector<MatrixLayout> expert_layout_;
  std::vector<float> logits_;  // the last position's, of the last prefill or decode
  // a chunk's activations between methods (kept: fresh vectors cost page faults and unmaps on every copy)
  struct ChunkBuffers {
    std::vector<float> h, cos, sin, bias, ff, attn, x, scores, ahead;
  };
  ChunkBuffers chunk_;
  // One expert's share of a step: the tokens routed to it and their top-k slots, their rows gathered, its outputs
  // and scratch. One per expert run side by side (each on its own thread), and one for the serial path.
  struct ExpertWork {
    std::vector<int64_t> token, slot;
    std::vector<float> x, out;
    const uint8_t* segment = nullptr;
    ExpertScratch scratch;
    void route(const std::vector<int64_t>& ids_TK, int64_t K, int64_t expert);
    void gather(const float* x_TD, int64_t D);
    // out_TD[token] += y_ND[n] * weight, token by token (y_ND: N x D in the order of `token`)
    void add_weighted(const float* y_ND, const std::vector<float>& weights_TK, int64_t K, int64_t D,
                      std::vector<float>& out_TD) const;
  };
  std::vector<ExpertWork> side_;
  ExpertWork serial_;
  std::unique_ptr<ExpertCache> experts_;  // null for a dense model
  std::unique_ptr<SpinPool> spin_;  // this runtime's threads for the project's kernels (null: ExecuTorch's pool)
  ExpertStats dense_stats_;
  LoadAccount loaded_;  // anonymous memory each kind of backbone method added when it loaded
  bool check_sha_ = true, cold_experts_ = false, prefetch_ = false;
  std::vector<int64_t> foretold_;  // the experts the next layer's router picks for a chunk's tokens, a layer early

  void open_programs();
  std::unique_ptr<executorch::extension::module::Module> open_program(const ProgramFile& p,
                                                                      const std::vector<std::string>& calls,
                                                                      std::unique_ptr<LazyArena>& arena);
  std::vector<int64_t> planned_sizes(executorch::extension::module::Module& mod, const ProgramFile& p) const;
  void check_ids(const std::vector<int64_t>& ids) const;
  const std::vector<float>& feed(const std::vector<int64_t>& ids);
  void run_chunk(const int64_t* ids, int64_t T, std::vector<float>* last_logits);
  // Asks for the experts that layer `layer`'s router, applied a layer early, picks for the chunk's T tokens.
  void prefetch_next(int64_t layer, const std::vector<float>& scores_TE, int64_t T);
  void moe(int64_t layer, const std::vector<float>& x_TD, const std::vector<float>& scores_TE, int64_t T,
           std::vector<float>& out_TD);
  bool side_by_side(size_t selected) const;
  void moe_side_by_side(int64_t layer, const std::vector<float>& x_TD, const std::vector<int64_t>& selected,
                        const std::vector<float>& weights_TK, const std::vector<int64_t>& ids_TK,
                        const std::vector<int64_t>& last, std::vector<float>& out_TD);
  void run_side_by_side(const float* x_TD, std::vector<int64_t> items, bool paging);
  void run_spread(ExpertWork& w, const uint8_t* segment);
};

// Next-token choice: argmax at temperature 0, else temperature + top-p (nucleus) sampling from a seeded stream.
class Sampler {
 public:
  Sampler(double temperature, double top_p, uint64_t seed);
  int64_t pick(const std::vector<float>& logits);

 private:
  double temperature_, top_p_;
  std::mt19937_64 rng_;
  std::vector<std::pair<double, int64_t>> candidates_;  // (unnormalised probability, token id), reused per token
};

// Makes an ExecuTorch abort (a failed check inside a kernel or delegate, which logs its reason first) end the process
// with one "error: ..." line naming the method that was running and exit status 2, as every other refusal does,
// instead of SIGABRT. Process-wide: front ends (the runner, a fuzz target) call it once at start.
void report_executorch_aborts();

// Makes the C library give an evicted expert's memory back to the OS when it is freed (glibc: a process-wide
// mmap threshold); every Runtime calls it.
void return_freed_weights_to_os();

}  // namespace cosmoes
