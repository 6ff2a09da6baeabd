// cosmoes_runner: generate from a bundle on token ids and report latency, memory and expert traffic as JSON.
//
//   cosmoes_runner BUNDLE [--policy all|swap|lru:N | --budget-mb MB] [--threads N]
//                  [--prompt-ids 1,2,3 | --prompt-file ids.txt | --prompt-len N] [--gen N]
//                  [--temperature T --top-p P --seed S] [--warmup N] [--repeats N]
//                  [--stats-json PATH] [--probe] [--no-sha]
//
// Prints the generated ids of the last repeat on stdout (one line); any problem is one "error: ..." line on stderr
// and exit status 2.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "errors.h"
#include "json.h"
#include "runtime.h"
#include "sysinfo.h"

namespace {

using cosmoes::Error;
using Clock = std::chrono::steady_clock;

struct Args {
  std::string bundle, stats_json;
  cosmoes::RuntimeOptions runtime;
  std::vector<int64_t> prompt;
  std::string prompt_file;
  int64_t prompt_len = 0, gen = 32, warmup = 0, repeats = 1;
  double temperature = 0.0, top_p = 1.0;
  uint64_t seed = 0;
  bool probe = false;
};

int64_t to_int(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end) throw Error(flag + " expects an integer, got '" + v + "'");
  return x;
}

double to_double(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end) throw Error(flag + " expects a number, got '" + v + "'");
  return x;
}

std::vector<int64_t> parse_ids(const std::string& text, const std::string& origin) {
  std::vector<int64_t> ids;
  std::string token;
  std::stringstream ss(text);
  while (ss >> token) {
    std::stringstream parts(token);
    std::string part;
    while (std::getline(parts, part, ','))
      if (!part.empty()) ids.push_back(to_int(origin, part));
  }
  return ids;
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw Error(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "--policy") a.runtime.policy = value();
    else if (flag == "--budget-mb") a.runtime.budget_mb = to_double(flag, value());
    else if (flag == "--threads") a.runtime.threads = static_cast<int>(to_int(flag, value()));
    else if (flag == "--prompt-ids") a.prompt = parse_ids(value(), flag);
    else if (flag == "--prompt-file") a.prompt_file = value();
    else if (flag == "--prompt-len") a.prompt_len = to_int(flag, value());
    else if (flag == "--gen") a.gen = to_int(flag, value());
    else if (flag == "--temperature") a.temperature = to_double(flag, value());
    else if (flag == "--top-p") a.top_p = to_double(flag, value());
    else if (flag == "--seed") a.seed = static_cast<uint64_t>(to_int(flag, value()));
    else if (flag == "--warmup") a.warmup = to_int(flag, value());
    else if (flag == "--repeats") a.repeats = to_int(flag, value());
    else if (flag == "--stats-json") a.stats_json = value();
    else if (flag == "--probe") a.probe = true;
    else if (flag == "--no-sha") a.runtime.check_sha = false;
    else if (!flag.empty() && flag[0] == '-') throw Error("unknown option " + flag);
    else if (a.bundle.empty()) a.bundle = flag;
    else throw Error("unexpected argument " + flag);
  }
  if (a.bundle.empty()) throw Error("usage: cosmoes_runner BUNDLE [options] (see the header of runner/main.cpp)");
  if (a.gen < 1) throw Error("--gen must be at least 1");
  if (a.repeats < 1 || a.warmup < 0) throw Error("--repeats must be >= 1 and --warmup >= 0");
  if (a.runtime.threads < 0) throw Error("--threads must be >= 0");
  return a;
}

std::vector<int64_t> make_prompt(Args& a, int64_t vocab) {
  if (!a.prompt_file.empty()) {
    std::ifstream in(a.prompt_file);
    if (!in) throw Error("cannot read prompt file " + a.prompt_file);
    std::stringstream ss;
    ss << in.rdbuf();
    a.prompt = parse_ids(ss.str(), a.prompt_file);
  }
  if (a.prompt.empty()) {  // synthetic ids: reproducible, but real text routes differently (see cosmoes bench)
    if (a.prompt_len < 1) throw Error("give a prompt: --prompt-ids, --prompt-file or --prompt-len N");
    std::mt19937_64 rng(a.seed);
    for (int64_t i = 0; i < a.prompt_len; ++i) a.prompt.push_back(static_cast<int64_t>(rng() % vocab));
  }
  return a.prompt;
}

struct Run {
  double ttft_ms = 0, prefill_tok_s = 0, decode_tok_s = 0;
  double decode_ms = 0;
  cosmoes::StageTimes decode_stages;  // per decoded token: ms executing each kind of method
  double decode_load_ms = 0;          // per decoded token: ms loading experts
  int64_t loads_decode = 0;
  std::vector<int64_t> tokens;
};

double ms(Clock::time_point t0) { return std::chrono::duration<double, std::milli>(Clock::now() - t0).count(); }

Run run_once(cosmoes::Runtime& rt, const std::vector<int64_t>& prompt, const Args& a) {
  Run r;
  cosmoes::Sampler sampler(a.temperature, a.top_p, a.seed);
  auto t0 = Clock::now();
  std::vector<float> logits = rt.prefill(prompt);
  double prefill_ms = ms(t0);
  r.tokens.push_back(sampler.pick(logits));
  r.ttft_ms = ms(t0);
  r.prefill_tok_s = prompt.size() / (prefill_ms / 1e3);
  int64_t loads0 = rt.expert_stats().loads;
  const cosmoes::StageTimes st0 = rt.stage_ms();
  const double load_ms0 = rt.expert_stats().load_ms;
  auto t1 = Clock::now();
  while (static_cast<int64_t>(r.tokens.size()) < a.gen) {
    logits = rt.decode(r.tokens.back());
    r.tokens.push_back(sampler.pick(logits));
  }
  double decode_ms = ms(t1);
  r.loads_decode = rt.expert_stats().loads - loads0;
  r.decode_tok_s = a.gen > 1 ? (a.gen - 1) / (decode_ms / 1e3) : 0;
  const double steps = static_cast<double>(std::max<int64_t>(1, a.gen - 1));
  const cosmoes::StageTimes& st1 = rt.stage_ms();
  r.decode_ms = decode_ms / steps;
  r.decode_stages = {(st1.embed - st0.embed) / steps, (st1.layers - st0.layers) / steps,
                     (st1.experts - st0.experts) / steps, (st1.head - st0.head) / steps};
  r.decode_load_ms = (rt.expert_stats().load_ms - load_ms0) / steps;
  return r;
}

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

}  // namespace

namespace {

struct Measured {
  std::vector<Run> runs;
  cosmoes::Memory baseline, after_load, end;
  int64_t loads = 0, evictions = 0;
  double load_ms = 0;
  double mem_gbps = 0, io_mbps = 0;
};

std::string stats_json(const Args& a, cosmoes::Runtime& rt, const std::vector<int64_t>& prompt, const Measured& m) {
  const auto& man = rt.manifest();
  std::vector<double> ttft, prefill, decode, loads_decode;
  for (const auto& r : m.runs) {
    ttft.push_back(r.ttft_ms), prefill.push_back(r.prefill_tok_s), decode.push_back(r.decode_tok_s);
    loads_decode.push_back(static_cast<double>(r.loads_decode));
  }
  std::vector<double> exrep = rt.expert_stats().exrep_per_layer(man.num_experts);
  double exrep_mean = exrep.empty() ? 0 : std::accumulate(exrep.begin(), exrep.end(), 0.0) / exrep.size();
  double expert_mb = man.max_expert_bytes() / 1e6;
  const Run& last = m.runs.back();  // the breakdown of one run (the last), in ms per decoded token
  std::ostringstream os;
  os.precision(6);
  os << "{\"runner\": \"cosmoes-native\", \"bundle\": " << cosmoes::json::quote(a.bundle)
     << ", \"policy\": " << cosmoes::json::quote(rt.policy().name()) << ", \"budget_mb\": " << a.runtime.budget_mb
     << ", \"threads\": " << rt.threads() << ", \"quant\": " << cosmoes::json::quote(man.quant)
     << ", \"prompt_tokens\": " << prompt.size() << ", \"generated_tokens\": " << a.gen
     << ", \"warmup\": " << a.warmup << ", \"repeats\": " << a.repeats
     << ", \"verify_ms\": " << rt.verify_ms() << ", \"model_load_ms\": " << rt.load_ms()
     << ", \"ttft_ms\": " << median(ttft) << ", \"prefill_tok_s\": " << median(prefill)
     << ", \"decode_tok_s\": " << median(decode) << ", \"decode_tok_s_runs\": " << list(decode)
     << ", \"rss_baseline_mb\": " << m.baseline.rss_mb << ", \"arena_mb\": " << rt.arena_mb()
     << ", \"rss_after_load_mb\": " << m.after_load.rss_mb << ", \"rss_end_mb\": " << m.end.rss_mb
     << ", \"peak_rss_mb\": " << m.end.peak_mb << ", \"expert_loads\": " << m.loads
     << ", \"expert_evictions\": " << m.evictions << ", \"expert_load_ms\": " << m.load_ms
     << ", \"expert_load_ms_mean\": " << (m.loads ? m.load_ms / m.loads : 0.0)
     << ", \"expert_loads_decode\": " << median(loads_decode)
     << ", \"expert_resident_peak\": " << rt.expert_stats().resident_peak
     << ", \"expert_mb\": " << expert_mb << ", \"non_expert_mb\": " << man.non_expert_total() / 1e6
     << ", \"active_expert_mb\": " << man.active_expert_bytes() / 1e6
     << ", \"exrep_per_layer\": " << list(exrep) << ", \"exrep_mean\": " << exrep_mean
     << ", \"mem_read_gb_s\": " << m.mem_gbps << ", \"file_read_mb_s\": " << m.io_mbps
     << ", \"expert_read_ms\": " << (m.io_mbps > 0 ? expert_mb / m.io_mbps * 1e3 : 0.0)
     << ", \"decode_ms_per_token\": " << last.decode_ms << ", \"decode_breakdown_ms\": {\"embed\": "
     << last.decode_stages.embed << ", \"layers\": " << last.decode_stages.layers << ", \"experts\": "
     << last.decode_stages.experts << ", \"expert_loads\": " << last.decode_load_ms << ", \"head\": "
     << last.decode_stages.head << ", \"other\": "
     << last.decode_ms - last.decode_stages.embed - last.decode_stages.layers - last.decode_stages.experts -
            last.decode_stages.head - last.decode_load_ms
     << "}, \"tokens\": " << list(last.tokens) << "}";
  return os.str();
}

Measured measure(cosmoes::Runtime& rt, const std::vector<int64_t>& prompt, const Args& a) {
  Measured m;
  m.after_load = cosmoes::process_memory();
  for (int64_t w = 0; w < a.warmup; ++w) run_once(rt, prompt, a);
  auto& st = rt.expert_stats();
  int64_t loads0 = st.loads, evictions0 = st.evictions;
  double load_ms0 = st.load_ms;
  for (int64_t r = 0; r < a.repeats; ++r) m.runs.push_back(run_once(rt, prompt, a));
  m.loads = st.loads - loads0, m.evictions = st.evictions - evictions0, m.load_ms = st.load_ms - load_ms0;
  m.end = cosmoes::process_memory();
  if (a.probe) {  // after the peak is read: the probe's own buffer must not count as the model's memory
    m.mem_gbps = cosmoes::memory_read_gbps(rt.threads());
    const auto& experts = rt.manifest().is_moe ? rt.manifest().program("experts") : rt.manifest().program("backbone");
    m.io_mbps = cosmoes::file_read_mbps(rt.manifest().path(experts), 256ll << 20);
  }
  return m;
}

int run_main(int argc, char** argv) {
  Args a = parse_args(argc, argv);
  cosmoes::Memory baseline = cosmoes::process_memory();  // the process before any program: libraries, heap
  cosmoes::Runtime rt(a.bundle, a.runtime);
  std::vector<int64_t> prompt = make_prompt(a, rt.manifest().vocab_size);
  if (static_cast<int64_t>(prompt.size()) + a.gen - 1 > rt.manifest().max_seq_len)
    throw Error("prompt (" + std::to_string(prompt.size()) + " tokens) + " + std::to_string(a.gen) +
                " new tokens exceed the bundle's max_seq_len " + std::to_string(rt.manifest().max_seq_len));
  Measured m = measure(rt, prompt, a);
  m.baseline = baseline;
  std::printf("%s\n", list(m.runs.back().tokens).c_str());
  if (!a.stats_json.empty()) {
    std::string text = stats_json(a, rt, prompt, m) + "\n";
    if (a.stats_json == "-") {
      std::fputs(text.c_str(), stdout);
    } else {
      std::string tmp = a.stats_json + ".tmp";
      FILE* f = std::fopen(tmp.c_str(), "w");
      if (!f || std::fputs(text.c_str(), f) < 0 || std::fclose(f) != 0 || std::rename(tmp.c_str(), a.stats_json.c_str()))
        throw Error("cannot write statistics to " + a.stats_json);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run_main(argc, argv);
  } catch (const Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: internal: %s\n", e.what());
    return 3;
  }
}
