// The C API of include/cosmoes/cosmoes.h over the runtime: sessions, text generation, statistics, the tokenizer.
//
// Every entry point catches everything: a C caller (an app over JNI, Swift) gets a status and a one-line message
// per thread, never a C++ exception. Handles are looked up in a registry before use, so a closed or foreign handle
// is an error instead of a use after free, and closing waits for a generation running on another thread.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "cosmoes/cosmoes.h"
#include "errors.h"
#include "json.h"
#include "runtime.h"
#include "stats.h"
#include "sysinfo.h"
#include "tokenizer.h"

#ifndef COSMOES_VERSION
#define COSMOES_VERSION "0.0.0"
#endif

namespace {

using cosmoes::Error;
using cosmoes::json::Value;

thread_local std::string last_error;
thread_local int last_status = COSMOES_OK;

// A refusal of the caller's own argument (not of the bundle): reported as COSMOES_INVALID_ARGUMENT.
struct ArgumentError : Error {
  using Error::Error;
};
struct TooLongError : Error {
  using Error::Error;
};
struct BundleError : Error {
  using Error::Error;
};

// Runs `body`, turning every exception into a status and the thread's message; `failure` is the status of a
// cosmoes::Error that is not the caller's fault (a bad bundle when opening, a runtime failure when generating).
template <typename F>
int guarded_status(int failure, F&& body) {
  try {
    body();
    last_error.clear();
    return COSMOES_OK;
  } catch (const ArgumentError& e) {
    last_error = e.what();
    return COSMOES_INVALID_ARGUMENT;
  } catch (const TooLongError& e) {
    last_error = e.what();
    return COSMOES_TOO_LONG;
  } catch (const BundleError& e) {
    last_error = e.what();
    return COSMOES_BAD_BUNDLE;
  } catch (const Error& e) {
    last_error = e.what();
    return failure;
  } catch (const std::bad_alloc&) {
    last_error = "out of memory";
    return COSMOES_RUNTIME_ERROR;
  } catch (const std::exception& e) {
    last_error = std::string("internal error: ") + e.what();
    return COSMOES_RUNTIME_ERROR;
  } catch (...) {
    last_error = "internal error: an unknown exception";
    return COSMOES_RUNTIME_ERROR;
  }
}

// guarded_status, remembered for cosmoes_last_status (cosmoes_open returns NULL, not a status).
template <typename F>
int guarded(int failure, F&& body) {
  last_status = guarded_status(failure, std::forward<F>(body));
  return last_status;
}

void require(const void* p, const char* name) {
  if (!p) throw ArgumentError(std::string(name) + " is NULL");
}

// A JSON object of options ("" or NULL: {}); any key outside `known` is refused, naming the valid ones.
Value parse_object(const char* text, const char* what, const std::vector<std::string>& known) {
  Value v;
  v.type = Value::Type::Object;
  if (!text || !*text) return v;
  try {
    v = cosmoes::json::parse(text);
  } catch (const Error& e) {
    throw ArgumentError(std::string(what) + " is not valid JSON: " + e.what());
  }
  if (v.type != Value::Type::Object) throw ArgumentError(std::string(what) + " must be a JSON object");
  for (const auto& [key, value] : v.object) {
    bool ok = false;
    for (const auto& k : known) ok = ok || k == key;
    if (!ok) {
      std::string valid;
      for (const auto& k : known) valid += (valid.empty() ? "" : ", ") + k;
      throw ArgumentError(std::string(what) + ": unknown key \"" + key + "\" (valid: " + valid + ")");
    }
  }
  return v;
}

std::string show(double x) {
  std::ostringstream os;
  os << x;
  return os.str();
}

double number(const Value& obj, const std::string& key, const char* what, double fallback, double lo, double hi) {
  if (!obj.has(key)) return fallback;
  const Value& v = obj.at(key);
  if (v.type != Value::Type::Number || !std::isfinite(v.number) || v.number < lo || v.number > hi)
    throw ArgumentError(std::string(what) + "." + key + " = " + cosmoes::json::describe(v) + " must be a number in [" + show(lo) +
                        ", " + show(hi) + "]");
  return v.number;
}

int64_t integer(const Value& obj, const std::string& key, const char* what, int64_t fallback, int64_t lo, int64_t hi) {
  double x = number(obj, key, what, static_cast<double>(fallback), static_cast<double>(lo), static_cast<double>(hi));
  if (x != std::floor(x))
    throw ArgumentError(std::string(what) + "." + key + " = " + cosmoes::json::describe(obj.at(key)) +
                        " must be an integer");
  return static_cast<int64_t>(x);
}

cosmoes::RuntimeOptions read_options(const char* json) {
  Value o = parse_object(json, "options", {"policy", "budget_mb", "threads", "check_sha", "prefetch"});
  cosmoes::RuntimeOptions r;
  if (o.has("policy")) {
    if (o.at("policy").type != Value::Type::String) throw ArgumentError("options.policy must be a string");
    r.policy = o.at("policy").string;
  }
  if (o.has("budget_mb") && !(o.at("budget_mb").type == Value::Type::Number && o.at("budget_mb").number > 0))
    throw ArgumentError("options.budget_mb = " + cosmoes::json::describe(o.at("budget_mb")) +
                        " must be a number > 0");
  r.budget_mb = number(o, "budget_mb", "options", 0.0, 0.0, 1e9);
  r.threads = static_cast<int>(integer(o, "threads", "options", 0, 0, 1024));
  if (o.has("check_sha")) {
    if (o.at("check_sha").type != Value::Type::Bool) throw ArgumentError("options.check_sha must be true or false");
    r.check_sha = o.at("check_sha").boolean;
  }
  if (o.has("prefetch")) {
    if (o.at("prefetch").type != Value::Type::Bool) throw ArgumentError("options.prefetch must be true or false");
    r.prefetch = o.at("prefetch").boolean;
  }
  return r;
}

struct Params {
  int64_t max_new_tokens = 64;
  cosmoes::SamplingOptions sampling;
};

Params read_params(const char* json) {
  Value p = parse_object(json, "params", {"max_new_tokens", "temperature", "top_p", "seed"});
  Params r;
  r.max_new_tokens = integer(p, "max_new_tokens", "params", 64, 1, int64_t{1} << 20);
  r.sampling.temperature = number(p, "temperature", "params", 0.0, 0.0, 1e6);
  r.sampling.top_p = number(p, "top_p", "params", 1.0, 0.0, 1.0);
  if (r.sampling.top_p <= 0) throw ArgumentError("params.top_p must be greater than 0");
  r.sampling.seed = static_cast<uint64_t>(integer(p, "seed", "params", 0, 0, int64_t{1} << 53));
  return r;
}

}  // namespace

struct cosmoes_session {
  std::mutex busy;  // one call at a time; close waits for a running generation
  std::string bundle;
  double budget_mb = 0;
  cosmoes::Memory baseline, after_load;
  std::unique_ptr<cosmoes::Runtime> rt;
  std::unique_ptr<cosmoes::Tokenizer> tokenizer;  // null when the bundle ships none
  // the last generation, for cosmoes_stats_json
  bool ran = false;
  std::vector<int64_t> prompt;
  cosmoes::BenchOptions asked;
  cosmoes::SessionStats stats;

  // Generates after `prompt`, measuring the run as the runner's statistics do.
  void run(std::vector<int64_t> ids, const Params& p, int64_t stop, const cosmoes::TokenSink& sink) {
    const auto& m = rt->manifest();
    if (ids.empty()) throw ArgumentError("the prompt is empty");
    for (int64_t id : ids)
      if (id < 0 || id >= m.vocab_size)
        throw ArgumentError("prompt id " + std::to_string(id) + " is outside the vocabulary (0.." +
                            std::to_string(m.vocab_size - 1) + ")");
    if (p.max_new_tokens > m.max_seq_len || static_cast<int64_t>(ids.size()) + p.max_new_tokens - 1 > m.max_seq_len)
      throw TooLongError("prompt (" + std::to_string(ids.size()) + " tokens) + " +
                         std::to_string(p.max_new_tokens) + " new tokens exceed the bundle's max_seq_len " +
                         std::to_string(m.max_seq_len));
    const cosmoes::ExpertCounters before = cosmoes::ExpertCounters::of(rt->expert_stats());
    ran = false;
    cosmoes::RunStats r = cosmoes::time_run(*rt, ids, p.max_new_tokens, p.sampling, stop, sink);
    stats = cosmoes::SessionStats{};
    stats.baseline = baseline, stats.after_load = after_load, stats.end = cosmoes::process_memory();
    stats.traffic = cosmoes::traffic_between(before, cosmoes::ExpertCounters::of(rt->expert_stats()));
    stats.runs.push_back(std::move(r));
    asked = cosmoes::BenchOptions{};
    asked.bundle = bundle, asked.budget_mb = budget_mb, asked.sampling = p.sampling;
    asked.gen = static_cast<int64_t>(stats.runs.back().tokens.size());
    prompt = std::move(ids);
    ran = true;
  }
};

struct cosmoes_tokenizer {
  std::unique_ptr<cosmoes::Tokenizer> tok;
};

namespace {

std::mutex registry_mutex;
std::map<const cosmoes_session*, std::shared_ptr<cosmoes_session>> sessions;

// The live session behind a handle (held while in use, so a concurrent close cannot free it mid-call).
std::shared_ptr<cosmoes_session> find(const cosmoes_session* handle) {
  require(handle, "session");
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = sessions.find(handle);
  if (it == sessions.end()) throw Error("the session is closed (or not a session cosmoes_open returned)");
  return it->second;
}

char* copy_out(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (!out) throw std::bad_alloc();
  std::memcpy(out, s.c_str(), s.size() + 1);
  return out;
}

}  // namespace

extern "C" {

const char* cosmoes_version(void) { return COSMOES_VERSION; }

const char* cosmoes_last_error(void) { return last_error.c_str(); }

int cosmoes_last_status(void) { return last_status; }

cosmoes_session* cosmoes_open(const char* bundle_dir, const char* options_json) {
  std::shared_ptr<cosmoes_session> s;
  int status = guarded(COSMOES_BAD_BUNDLE, [&] {
    require(bundle_dir, "bundle_dir");
    cosmoes::RuntimeOptions options = read_options(options_json);
    s = std::make_shared<cosmoes_session>();
    s->bundle = bundle_dir, s->budget_mb = options.budget_mb;
    s->baseline = cosmoes::process_memory();
    try {
      s->rt = std::make_unique<cosmoes::Runtime>(bundle_dir, options);
    } catch (const Error& e) {  // a policy or budget the bundle cannot take is the caller's option, named as such
      std::string what = e.what();
      if (what.find("expert cache policy") != std::string::npos || what.find("budget") != std::string::npos)
        throw ArgumentError(what);
      throw;
    }
    if (!s->rt->manifest().tokenizer.empty())
      s->tokenizer = std::make_unique<cosmoes::Tokenizer>(cosmoes::tokenizer_dir(s->rt->manifest()));
    s->after_load = cosmoes::process_memory();
    std::lock_guard<std::mutex> lock(registry_mutex);
    sessions[s.get()] = s;
  });
  return status == COSMOES_OK ? s.get() : nullptr;
}

int cosmoes_generate(cosmoes_session* session, const char* prompt, const char* params_json,
                     cosmoes_token_callback on_token, void* user) {
  std::shared_ptr<cosmoes_session> s;
  int found = guarded(COSMOES_CLOSED, [&] { s = find(session); });
  if (found != COSMOES_OK) return found;
  std::lock_guard<std::mutex> lock(s->busy);
  return guarded(COSMOES_RUNTIME_ERROR, [&] {
    require(prompt, "prompt");
    Params p = read_params(params_json);
    if (!cosmoes::is_utf8(prompt)) throw ArgumentError("the prompt is not valid UTF-8");
    if (!s->tokenizer) throw BundleError("bundle " + s->bundle + " has no tokenizer; generate from ids "
                                         "(cosmoes_generate_ids) or re-export it from a checkpoint with one");
    std::vector<int64_t> ids = s->tokenizer->encode(prompt, true);
    cosmoes::Utf8Stream stream;
    cosmoes::TokenSink sink = [&](int64_t id) {
      std::string piece = stream.push(s->tokenizer->token_bytes(id));
      return !on_token || on_token(piece.c_str(), static_cast<int32_t>(id), user) == 0;
    };
    s->run(std::move(ids), p, s->tokenizer->eos(), sink);
    std::string rest = stream.finish();  // an unfinished character at the very end: its U+FFFD
    if (!rest.empty() && on_token) on_token(rest.c_str(), -1, user);
  });
}

int cosmoes_generate_ids(cosmoes_session* session, const int32_t* prompt_ids, size_t n_prompt,
                         const char* params_json, int32_t* out_ids, size_t out_capacity, size_t* out_len) {
  std::shared_ptr<cosmoes_session> s;
  int found = guarded(COSMOES_CLOSED, [&] { s = find(session); });
  if (found != COSMOES_OK) return found;
  std::lock_guard<std::mutex> lock(s->busy);
  return guarded(COSMOES_RUNTIME_ERROR, [&] {
    require(prompt_ids, "prompt_ids");
    require(out_ids, "out_ids");
    if (out_len) *out_len = 0;
    if (n_prompt < 1) throw ArgumentError("n_prompt must be at least 1");
    if (n_prompt > static_cast<size_t>(s->rt->manifest().max_seq_len))
      throw TooLongError("the prompt has " + std::to_string(n_prompt) + " ids, more than the bundle's max_seq_len " +
                         std::to_string(s->rt->manifest().max_seq_len));
    Params p = read_params(params_json);
    if (out_capacity < static_cast<size_t>(p.max_new_tokens))
      throw ArgumentError("out_capacity (" + std::to_string(out_capacity) + ") is less than max_new_tokens (" +
                          std::to_string(p.max_new_tokens) + ")");
    s->run(std::vector<int64_t>(prompt_ids, prompt_ids + n_prompt), p, -1, nullptr);
    const auto& tokens = s->stats.runs.back().tokens;
    for (size_t i = 0; i < tokens.size(); ++i) out_ids[i] = static_cast<int32_t>(tokens[i]);
    if (out_len) *out_len = tokens.size();
  });
}

char* cosmoes_stats_json(cosmoes_session* session) {
  char* out = nullptr;
  std::shared_ptr<cosmoes_session> s;
  if (guarded(COSMOES_CLOSED, [&] { s = find(session); }) != COSMOES_OK) return nullptr;
  std::lock_guard<std::mutex> lock(s->busy);
  guarded(COSMOES_RUNTIME_ERROR, [&] {
    if (!s->ran) throw ArgumentError("no statistics yet: nothing was generated since the session opened");
    out = copy_out(cosmoes::stats_json(*s->rt, s->prompt, s->asked, s->stats));
  });
  return out;
}

void cosmoes_free(void* pointer) { std::free(pointer); }

void cosmoes_reset(cosmoes_session* session) {
  std::shared_ptr<cosmoes_session> s;
  if (guarded(COSMOES_CLOSED, [&] { s = find(session); }) != COSMOES_OK) return;
  std::lock_guard<std::mutex> lock(s->busy);
  guarded(COSMOES_RUNTIME_ERROR, [&] { s->rt->reset(); });
}

void cosmoes_close(cosmoes_session* session) {
  std::shared_ptr<cosmoes_session> s;
  guarded(COSMOES_CLOSED, [&] {
    if (!session) return;
    std::lock_guard<std::mutex> lock(registry_mutex);
    auto it = sessions.find(session);
    if (it == sessions.end()) throw Error("the session is already closed (or not a session cosmoes_open returned)");
    s = std::move(it->second);
    sessions.erase(it);
  });
  if (s) std::lock_guard<std::mutex> wait(s->busy);  // a generation still running on another thread finishes first
}  // the last reference goes here (or when that generation returns): the runtime and its experts are freed

cosmoes_tokenizer* cosmoes_tokenizer_open(const char* path) {
  cosmoes_tokenizer* t = nullptr;
  guarded(COSMOES_BAD_BUNDLE, [&] {
    require(path, "path");
    auto tok = std::make_unique<cosmoes::Tokenizer>(path);
    t = new cosmoes_tokenizer{std::move(tok)};
  });
  return t;
}

int cosmoes_tokenizer_encode(cosmoes_tokenizer* tokenizer, const char* text, int add_bos, int32_t* ids,
                             size_t capacity, size_t* n_ids) {
  return guarded(COSMOES_RUNTIME_ERROR, [&] {
    require(tokenizer, "tokenizer");
    require(text, "text");
    require(n_ids, "n_ids");
    *n_ids = 0;
    if (!cosmoes::is_utf8(text)) throw ArgumentError("the text is not valid UTF-8");
    std::vector<int64_t> out = tokenizer->tok->encode(text, add_bos != 0);
    *n_ids = out.size();
    if (out.size() > capacity) {
      if (capacity > 0) require(ids, "ids");
      throw ArgumentError("capacity " + std::to_string(capacity) + " is less than the " + std::to_string(out.size()) +
                          " ids of the text");
    }
    if (!out.empty()) require(ids, "ids");
    for (size_t i = 0; i < out.size(); ++i) ids[i] = static_cast<int32_t>(out[i]);
  });
}

char* cosmoes_tokenizer_decode(cosmoes_tokenizer* tokenizer, const int32_t* ids, size_t n_ids) {
  char* out = nullptr;
  guarded(COSMOES_RUNTIME_ERROR, [&] {
    require(tokenizer, "tokenizer");
    if (n_ids > 0) require(ids, "ids");
    std::vector<int64_t> v(ids, ids + n_ids);
    try {
      out = copy_out(tokenizer->tok->decode(v));
    } catch (const Error& e) {
      throw ArgumentError(e.what());  // an id outside the vocabulary
    }
  });
  return out;
}

int32_t cosmoes_tokenizer_eos(const cosmoes_tokenizer* tokenizer) {
  return tokenizer ? static_cast<int32_t>(tokenizer->tok->eos()) : -1;
}

void cosmoes_tokenizer_close(cosmoes_tokenizer* tokenizer) { delete tokenizer; }

}  // extern "C"
