// Benchmark statistics of a session: timing generations, the warm-up/repeat measurement and its JSON object.
//
// Every front end (cosmoes_runner, the C API, the phone apps) reports through stats_json, so the harness reads one
// schema whatever ran the model.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "runtime.h"
#include "sysinfo.h"

namespace cosmoes {

struct SamplingOptions {
  double temperature = 0.0, top_p = 1.0;
  uint64_t seed = 0;
};

// What a measurement was asked for; the JSON echoes these next to what was measured.
struct BenchOptions {
  std::string bundle;      // the bundle path as given
  double budget_mb = 0.0;  // the weight budget as given (0: the policy was named)
  int64_t gen = 32, warmup = 0, repeats = 1;
  SamplingOptions sampling;
  bool probe = false;  // also measure memory and file read bandwidth
  int64_t stop = -1;   // a token that ends a run (the tokenizer's end of text), -1: none
};

// One generation: prefill, then decode up to `gen` tokens.
struct RunStats {
  double ttft_ms = 0, prefill_tok_s = 0, decode_tok_s = 0;
  double decode_ms = 0;        // per decoded token
  StageTimes decode_stages;    // per decoded token: ms executing each kind of method
  double decode_load_ms = 0;   // per decoded token: ms loading experts
  double decode_evict_ms = 0;  // per decoded token: ms evicting them
  double prefill_ms = 0;       // the whole prompt
  StageTimes prefill_stages;   // the whole prompt: ms executing each kind of method
  double prefill_load_ms = 0;  // the whole prompt: ms loading experts
  double prefill_evict_ms = 0;  // the whole prompt: ms evicting them
  int64_t loads_decode = 0;
  std::vector<int64_t> tokens;
};

// The expert cache's counters at one moment; two readings give what a span of runs did.
struct ExpertCounters {
  int64_t loads = 0, evictions = 0, prefetched = 0, prefetch_hits = 0;
  double load_ms = 0, prefetch_ms = 0, evict_ms = 0;
  static ExpertCounters of(const ExpertStats& s) {
    return {s.loads, s.evictions, s.prefetched, s.prefetch_hits, s.load_ms, s.prefetch_ms, s.evict_ms};
  }
};

// The timed runs of a session and what the process and the expert cache did around them.
struct SessionStats {
  std::vector<RunStats> runs;
  Memory baseline, after_load, end;
  ExpertCounters traffic;  // over the repeats, not the warm-up (--prefetch: asks and hits too)
  double mem_gbps = 0, io_mbps = 0;  // the probes; 0 without BenchOptions::probe
};

// What the expert cache did between two readings of its counters.
ExpertCounters traffic_between(const ExpertCounters& before, const ExpertCounters& after);

// Receives each new token as it is picked; returning false stops the generation.
using TokenSink = std::function<bool(int64_t)>;

// One generation: prefill, then decode until `gen` tokens, the `stop` token (>= 0; it ends the run and is not
// kept or passed on) or the sink's false. Each run gets a fresh Sampler, so every repeat of a seeded run picks the
// same tokens.
RunStats time_run(Runtime& rt, const std::vector<int64_t>& prompt, int64_t gen, const SamplingOptions& sampling,
                  int64_t stop = -1, const TokenSink& sink = nullptr);

// Warm-up, then the repeats. `baseline` is the process before the Runtime opened, which only the caller saw;
// `sink` receives the tokens of the last repeat as they are picked (the runner streams their text).
SessionStats measure(Runtime& rt, const std::vector<int64_t>& prompt, const BenchOptions& options,
                     const Memory& baseline, const TokenSink& sink = nullptr);

// One JSON object (no newline): medians over the runs, the last run's tokens and decode breakdown.
std::string stats_json(Runtime& rt, const std::vector<int64_t>& prompt, const BenchOptions& options,
                       const SessionStats& s);

// Token ids as a JSON array ("[1, 2, 3]"), as in the "tokens" field.
std::string tokens_json(const std::vector<int64_t>& tokens);

}  // namespace cosmoes
