// Timing generations, measuring a session and writing its statistics JSON (the schema every front end emits).
#include "stats.h"

#include <algorithm>
#include <chrono>
#include <numeric>
#include <ostream>
#include <sstream>

#include "int4.h"
#include "json.h"

namespace cosmoes {
namespace {

using Clock = std::chrono::steady_clock;

double ms(Clock::time_point t0) { return std::chrono::duration<double, std::milli>(Clock::now() - t0).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

template <typename T>
std::string list(const std::vector<T>& v) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
  return os.str() + "]";
}

// Takes the sampler's next pick: false when the run ends with it (the stop token, or the sink said so).
bool accept(int64_t token, int64_t stop, const TokenSink& sink, RunStats& r) {
  if (token == stop) return false;
  r.tokens.push_back(token);
  return !sink || sink(token);
}

// What each kind of method took between two readings of the runtime's counters, divided by `per`.
StageTimes stages_since(const StageTimes& st0, const StageTimes& st1, double per) {
  return {(st1.embed - st0.embed) / per, (st1.layers - st0.layers) / per, (st1.experts - st0.experts) / per,
          (st1.head - st0.head) / per};
}

// Decodes until `r` holds `gen` tokens or the run ends; fills the per-token decode figures from the runtime's
// counters.
void time_decode(Runtime& rt, Sampler& sampler, int64_t gen, int64_t stop, const TokenSink& sink, RunStats& r) {
  const ExpertCounters before = ExpertCounters::of(rt.expert_stats());
  const StageTimes st0 = rt.stage_ms();
  auto t1 = Clock::now();
  int64_t steps_run = 0;
  while (static_cast<int64_t>(r.tokens.size()) < gen) {
    const std::vector<float>& logits = rt.decode(r.tokens.back());
    ++steps_run;
    if (!accept(sampler.pick(logits), stop, sink, r)) break;
  }
  double decode_ms = ms(t1);
  const ExpertCounters t = traffic_between(before, ExpertCounters::of(rt.expert_stats()));
  r.loads_decode = t.loads;
  r.decode_tok_s = steps_run > 0 ? steps_run / (decode_ms / 1e3) : 0;
  const double steps = static_cast<double>(std::max<int64_t>(1, steps_run));
  r.decode_ms = decode_ms / steps;
  r.decode_stages = stages_since(st0, rt.stage_ms(), steps);
  r.decode_load_ms = t.load_ms / steps;
  r.decode_evict_ms = t.evict_ms / steps;
}

void write_setup(std::ostream& os, Runtime& rt, const std::vector<int64_t>& prompt, const BenchOptions& o) {
  const auto& man = rt.manifest();
  os << "{\"runner\": \"cosmoes-native\", \"bundle\": " << json::quote(o.bundle)
     << ", \"policy\": " << json::quote(rt.policy().name()) << ", \"budget_mb\": " << o.budget_mb
     << ", \"threads\": " << rt.threads() << ", \"quant\": " << json::quote(man.quant)
     << ", \"prompt_tokens\": " << prompt.size() << ", \"generated_tokens\": " << o.gen
     << ", \"warmup\": " << o.warmup << ", \"repeats\": " << o.repeats << ", \"verify_ms\": " << rt.verify_ms()
     << ", \"model_load_ms\": " << rt.load_ms() << ", \"cold_experts\": " << (rt.cold_experts() ? "true" : "false")
     << ", \"prefetch\": " << (rt.prefetch() ? "true" : "false")
     << ", \"expert_pages_shared\": " << (rt.expert_pages_shared() ? "true" : "false")
     << ", \"expert_kernels\": "
     << json::quote(man.packed_experts() ? int4::isa_name(int4::active_isa()) : man.is_moe ? "xnnpack" : "none");
}

// Medians over the repeats: one slow run (a page-cache miss, a scheduler hiccup) does not move them.
void write_speed(std::ostream& os, const SessionStats& s) {
  std::vector<double> ttft, prefill, decode;
  for (const auto& r : s.runs)
    ttft.push_back(r.ttft_ms), prefill.push_back(r.prefill_tok_s), decode.push_back(r.decode_tok_s);
  os << ", \"ttft_ms\": " << median(ttft) << ", \"prefill_tok_s\": " << median(prefill)
     << ", \"decode_tok_s\": " << median(decode) << ", \"decode_tok_s_runs\": " << list(decode);
}

void write_memory(std::ostream& os, Runtime& rt, const SessionStats& s) {
  // arena_mb is reserved address space; arena_resident_mb the part the run touched (KV positions filled, chunks run)
  os << ", \"rss_baseline_mb\": " << s.baseline.rss_mb << ", \"arena_mb\": " << rt.arena_mb()
     << ", \"arena_resident_mb\": " << rt.arena_resident_mb()
     << ", \"rss_after_load_mb\": " << s.after_load.rss_mb << ", \"rss_end_mb\": " << s.end.rss_mb
     << ", \"peak_rss_mb\": " << s.end.peak_mb
     // RSS split into anonymous and file-backed pages (-1: the system does not say), after load and at the end
     << ", \"rss_after_load_anon_mb\": " << s.after_load.anon_mb << ", \"rss_after_load_file_mb\": "
     << s.after_load.file_mb << ", \"rss_end_anon_mb\": " << s.end.anon_mb << ", \"rss_end_file_mb\": "
     << s.end.file_mb;
  // by kind at the end of the last run: what a device must hold for this bundle, policy and context
  os << ", \"resident_mb\": {";
  bool first = true;
  for (const auto& k : rt.resident_by_kind()) {
    os << (first ? "" : ", ") << json::quote(k.kind) << ": {\"anon\": " << k.anon_mb << ", \"file\": " << k.file_mb
       << "}";
    first = false;
  }
  os << "}";
}

void write_experts(std::ostream& os, Runtime& rt, const SessionStats& s) {
  const auto& man = rt.manifest();
  std::vector<double> loads_decode;
  for (const auto& r : s.runs) loads_decode.push_back(static_cast<double>(r.loads_decode));
  std::vector<double> exrep = rt.expert_stats().exrep_per_layer(man.num_experts);
  double exrep_mean = exrep.empty() ? 0 : std::accumulate(exrep.begin(), exrep.end(), 0.0) / exrep.size();
  const ExpertCounters& t = s.traffic;
  os << ", \"expert_loads\": " << t.loads << ", \"expert_evictions\": " << t.evictions
     << ", \"expert_load_ms\": " << t.load_ms
     << ", \"expert_load_ms_mean\": " << (t.loads ? t.load_ms / t.loads : 0.0)
     << ", \"expert_evict_ms\": " << t.evict_ms
     << ", \"expert_evict_ms_mean\": " << (t.evictions ? t.evict_ms / t.evictions : 0.0)
     << ", \"expert_loads_decode\": " << median(loads_decode)
     << ", \"expert_resident_peak\": " << rt.expert_stats().resident_peak
     // --prefetch: experts asked for a layer ahead, the loads that found theirs asked for, and the asking's time
     << ", \"expert_prefetched\": " << t.prefetched << ", \"expert_prefetch_hits\": " << t.prefetch_hits
     << ", \"expert_prefetch_hit_rate\": " << (t.loads ? static_cast<double>(t.prefetch_hits) / t.loads : 0.0)
     << ", \"expert_prefetch_ms\": " << t.prefetch_ms
     << ", \"expert_mb\": " << man.max_expert_bytes() / 1e6 << ", \"non_expert_mb\": " << man.non_expert_total() / 1e6
     << ", \"active_expert_mb\": " << man.active_expert_bytes() / 1e6 << ", \"exrep_per_layer\": " << list(exrep)
     << ", \"exrep_mean\": " << exrep_mean
     // read when the statistics are asked for: nothing loads or evicts between the end of a generation and then
     << ", \"resident_per_layer\": " << list(rt.resident_per_layer());
}

// expert_read_ms: one expert's stored bytes at the probed file read speed, to set against expert_load_ms_mean.
void write_probes(std::ostream& os, Runtime& rt, const SessionStats& s) {
  double expert_mb = rt.manifest().max_expert_bytes() / 1e6;
  os << ", \"mem_read_gb_s\": " << s.mem_gbps << ", \"file_read_mb_s\": " << s.io_mbps
     << ", \"expert_read_ms\": " << (s.io_mbps > 0 ? expert_mb / s.io_mbps * 1e3 : 0.0);
}

// One breakdown object; "other" is what no counter covers.
void write_stages(std::ostream& os, const StageTimes& st, double load_ms, double evict_ms, double total_ms) {
  os << "{\"embed\": " << st.embed << ", \"layers\": " << st.layers << ", \"experts\": " << st.experts
     << ", \"expert_loads\": " << load_ms << ", \"expert_evictions\": " << evict_ms << ", \"head\": " << st.head
     << ", \"other\": " << total_ms - st.embed - st.layers - st.experts - st.head - load_ms - evict_ms << "}";
}

// The breakdown of one run (the last), in ms per decoded token and in ms for the whole prompt.
void write_breakdown(std::ostream& os, const RunStats& last) {
  os << ", \"decode_ms_per_token\": " << last.decode_ms << ", \"decode_breakdown_ms\": ";
  write_stages(os, last.decode_stages, last.decode_load_ms, last.decode_evict_ms, last.decode_ms);
  os << ", \"prefill_breakdown_ms\": ";
  write_stages(os, last.prefill_stages, last.prefill_load_ms, last.prefill_evict_ms, last.prefill_ms);
  os << ", \"tokens\": " << list(last.tokens) << "}";
}

}  // namespace

RunStats time_run(Runtime& rt, const std::vector<int64_t>& prompt, int64_t gen, const SamplingOptions& sampling,
                  int64_t stop, const TokenSink& sink) {
  RunStats r;
  Sampler sampler(sampling.temperature, sampling.top_p, sampling.seed);
  const StageTimes st0 = rt.stage_ms();
  const ExpertCounters before = ExpertCounters::of(rt.expert_stats());
  auto t0 = Clock::now();
  const std::vector<float>& logits = rt.prefill(prompt);
  const double prefill_ms = ms(t0);
  r.prefill_ms = prefill_ms;
  r.prefill_stages = stages_since(st0, rt.stage_ms(), 1.0);
  const ExpertCounters prefill = traffic_between(before, ExpertCounters::of(rt.expert_stats()));
  r.prefill_load_ms = prefill.load_ms;
  r.prefill_evict_ms = prefill.evict_ms;
  bool going = accept(sampler.pick(logits), stop, sink, r);
  r.ttft_ms = ms(t0);
  r.prefill_tok_s = prompt.size() / (prefill_ms / 1e3);
  if (going) time_decode(rt, sampler, gen, stop, sink, r);
  return r;
}

ExpertCounters traffic_between(const ExpertCounters& a, const ExpertCounters& b) {
  return {b.loads - a.loads, b.evictions - a.evictions, b.prefetched - a.prefetched,
          b.prefetch_hits - a.prefetch_hits, b.load_ms - a.load_ms, b.prefetch_ms - a.prefetch_ms,
          b.evict_ms - a.evict_ms};
}

SessionStats measure(Runtime& rt, const std::vector<int64_t>& prompt, const BenchOptions& o, const Memory& baseline,
                     const TokenSink& sink) {
  SessionStats s;
  s.baseline = baseline;
  s.after_load = process_memory();
  for (int64_t w = 0; w < o.warmup; ++w) time_run(rt, prompt, o.gen, o.sampling, o.stop);
  auto& st = rt.expert_stats();
  const ExpertCounters before = ExpertCounters::of(st);
  for (int64_t r = 0; r < o.repeats; ++r)
    s.runs.push_back(time_run(rt, prompt, o.gen, o.sampling, o.stop, r + 1 == o.repeats ? sink : nullptr));
  s.traffic = traffic_between(before, ExpertCounters::of(st));
  s.end = process_memory();
  if (o.probe) {  // after the peak is read: the probe's own buffer must not count as the model's memory
    s.mem_gbps = memory_read_gbps(rt.threads());
    s.io_mbps = file_read_mbps(rt.manifest().experts_path(), 256ll << 20);
  }
  return s;
}

std::string stats_json(Runtime& rt, const std::vector<int64_t>& prompt, const BenchOptions& o, const SessionStats& s) {
  std::ostringstream os;
  os.precision(6);
  write_setup(os, rt, prompt, o);
  write_speed(os, s);
  write_memory(os, rt, s);
  write_experts(os, rt, s);
  write_probes(os, rt, s);
  write_breakdown(os, s.runs.back());
  return os.str();
}

std::string tokens_json(const std::vector<int64_t>& tokens) { return list(tokens); }

}  // namespace cosmoes
