// cosmoes_runner: generate from a bundle and report latency, memory and expert traffic as JSON.
//
// The measuring and the JSON schema live in the library (runtime/stats.h), shared with every other front end;
// this file is the command line around them.
//
//   cosmoes_runner BUNDLE [--policy all|swap|lru:N | --budget-mb MB] [--threads N]
//                  [--prompt TEXT | --prompt-ids 1,2,3 | --prompt-file ids.txt | --prompt-len N] [--gen N]
//                  [--temperature T --top-p P --seed S] [--warmup N] [--repeats N]
//                  [--stats-json PATH] [--probe] [--no-sha] [--cold-experts] [--prefetch]
//
// With --prompt, the text is encoded with the bundle's tokenizer and the continuation is streamed to stdout as it is
// generated (the prompt first, as `cosmoes generate` prints it), stopping at the end-of-text token; otherwise the
// generated ids of the last repeat are printed on stdout (one line). Any problem is one "error: ..." line on stderr
// and exit status 2.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <new>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "errors.h"
#include "runtime.h"
#include "stats.h"
#include "sysinfo.h"
#include "tokenizer.h"

namespace {

using cosmoes::Error;

struct Args {
  std::string stats_json;
  cosmoes::RuntimeOptions runtime;
  cosmoes::BenchOptions bench;  // bundle, gen, warm-up, repeats, sampling, probe
  std::vector<int64_t> prompt;
  std::string prompt_text;
  bool has_text = false;
  std::string prompt_file;
  int64_t prompt_len = 0;
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
  cosmoes::BenchOptions& b = a.bench;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw Error(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "--policy") a.runtime.policy = value();
    else if (flag == "--budget-mb") a.runtime.budget_mb = to_double(flag, value());
    else if (flag == "--threads") a.runtime.threads = static_cast<int>(std::min<int64_t>(to_int(flag, value()), 1 << 20));
    else if (flag == "--prompt") a.prompt_text = value(), a.has_text = true;
    else if (flag == "--prompt-ids") a.prompt = parse_ids(value(), flag);
    else if (flag == "--prompt-file") a.prompt_file = value();
    else if (flag == "--prompt-len") a.prompt_len = to_int(flag, value());
    else if (flag == "--gen") b.gen = to_int(flag, value());
    else if (flag == "--temperature") b.sampling.temperature = to_double(flag, value());
    else if (flag == "--top-p") b.sampling.top_p = to_double(flag, value());
    else if (flag == "--seed") b.sampling.seed = static_cast<uint64_t>(to_int(flag, value()));
    else if (flag == "--warmup") b.warmup = to_int(flag, value());
    else if (flag == "--repeats") b.repeats = to_int(flag, value());
    else if (flag == "--stats-json") a.stats_json = value();
    else if (flag == "--probe") b.probe = true;
    else if (flag == "--no-sha") a.runtime.check_sha = false;
    else if (flag == "--cold-experts") a.runtime.cold_experts = true;
    else if (flag == "--prefetch") a.runtime.prefetch = true;
    else if (!flag.empty() && flag[0] == '-') throw Error("unknown option " + flag);
    else if (b.bundle.empty()) b.bundle = flag;
    else throw Error("unexpected argument " + flag);
  }
  if (b.bundle.empty()) throw Error("usage: cosmoes_runner BUNDLE [options] (see the header of runner/main.cpp)");
  if (b.gen < 1) throw Error("--gen must be at least 1");
  if (b.repeats < 1 || b.warmup < 0) throw Error("--repeats must be >= 1 and --warmup >= 0");
  if (a.runtime.threads < 0 || a.runtime.threads > 1024) throw Error("--threads must be between 0 and 1024");
  b.budget_mb = a.runtime.budget_mb;
  return a;
}

std::vector<int64_t> make_prompt(Args& a, int64_t vocab, int64_t max_seq_len) {
  if (!a.prompt_file.empty()) {
    std::ifstream in(a.prompt_file);
    if (!in) throw Error("cannot read prompt file " + a.prompt_file);
    std::stringstream ss;
    ss << in.rdbuf();
    a.prompt = parse_ids(ss.str(), a.prompt_file);
  }
  if (a.prompt.empty()) {  // synthetic ids: reproducible, but real text routes differently (see cosmoes bench)
    if (a.prompt_len < 1) throw Error("give a prompt: --prompt-ids, --prompt-file or --prompt-len N");
    if (a.prompt_len > max_seq_len)  // before allocating the ids
      throw Error("--prompt-len " + std::to_string(a.prompt_len) + " exceeds the bundle's max_seq_len " +
                  std::to_string(max_seq_len));
    std::mt19937_64 rng(a.bench.sampling.seed);
    for (int64_t i = 0; i < a.prompt_len; ++i) a.prompt.push_back(static_cast<int64_t>(rng() % vocab));
  }
  return a.prompt;
}

void check_fits(const std::vector<int64_t>& prompt, int64_t gen, int64_t max_seq_len) {
  if (gen > max_seq_len || static_cast<int64_t>(prompt.size()) + gen - 1 > max_seq_len)  // (no overflow)
    throw Error("prompt (" + std::to_string(prompt.size()) + " tokens) + " + std::to_string(gen) +
                " new tokens exceed the bundle's max_seq_len " + std::to_string(max_seq_len));
}

// "-" is stdout; a file is written whole or not at all (.tmp + rename), so a reader never sees half a line.
void write_stats(const std::string& path, const std::string& text) {
  if (path == "-") {
    std::fputs(text.c_str(), stdout);
    return;
  }
  std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "w");
  if (!f || std::fputs(text.c_str(), f) < 0 || std::fclose(f) != 0 || std::rename(tmp.c_str(), path.c_str()))
    throw Error("cannot write statistics to " + path);
}

// The bundle's tokenizer for --prompt: the prompt's ids, and a sink that prints each token's text as it completes.
struct TextMode {
  std::unique_ptr<cosmoes::Tokenizer> tokenizer;
  cosmoes::Utf8Stream stream;

  TextMode(const cosmoes::Runtime& rt, Args& a) {
    if (!cosmoes::is_utf8(a.prompt_text)) throw Error("--prompt is not valid UTF-8");
    tokenizer = std::make_unique<cosmoes::Tokenizer>(cosmoes::tokenizer_dir(rt.manifest()));
    a.prompt = tokenizer->encode(a.prompt_text, true);
    a.bench.stop = tokenizer->eos();
  }
  cosmoes::TokenSink sink(const std::string& prompt_text) {
    std::fputs(prompt_text.c_str(), stdout);
    std::fflush(stdout);
    return [this](int64_t id) {
      std::fputs(stream.push(tokenizer->token_bytes(id)).c_str(), stdout);
      std::fflush(stdout);
      return true;
    };
  }
  void finish() { std::printf("%s\n", stream.finish().c_str()); }
};

int run_main(int argc, char** argv) {
  Args a = parse_args(argc, argv);
  cosmoes::Memory baseline = cosmoes::process_memory();  // the process before any program: libraries, heap
  cosmoes::Runtime rt(a.bench.bundle, a.runtime);
  std::unique_ptr<TextMode> text;
  if (a.has_text) text = std::make_unique<TextMode>(rt, a);
  std::vector<int64_t> prompt = make_prompt(a, rt.manifest().vocab_size, rt.manifest().max_seq_len);
  check_fits(prompt, a.bench.gen, rt.manifest().max_seq_len);
  cosmoes::SessionStats s =
      cosmoes::measure(rt, prompt, a.bench, baseline, text ? text->sink(a.prompt_text) : nullptr);
  if (text) text->finish();
  else std::printf("%s\n", cosmoes::tokens_json(s.runs.back().tokens).c_str());
  if (!a.stats_json.empty()) write_stats(a.stats_json, cosmoes::stats_json(rt, prompt, a.bench, s) + "\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  cosmoes::report_executorch_aborts();
  try {
    return run_main(argc, argv);
  } catch (const Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  } catch (const std::bad_alloc&) {  // a size no check bounded (ExecuTorch's own allocations): a refusal too
    std::fprintf(stderr, "error: out of memory loading or running the bundle\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: internal: %s\n", e.what());
    return 3;
  }
}
