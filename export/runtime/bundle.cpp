// Reading and validating manifest.json (written by cosmoes/export/manifest.py) before any program is opened.
#include "bundle.h"

#include "int4.h"

#include <sys/stat.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cctype>
#include <fstream>
#include <set>
#include <sstream>

#include "errors.h"
#include "json.h"
#include "sha256.h"

namespace cosmoes {
namespace {

using json::Value;

bool is_dir(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

int64_t file_size(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return -1;
  return static_cast<int64_t>(st.st_size);
}

// The whole file, refused before reading when it is larger than any manifest the JSON reader accepts.
std::string read_manifest_text(const std::string& path) {
  int64_t size = file_size(path);
  if (size > static_cast<int64_t>(json::kMaxBytes))
    throw Error(path + " has " + std::to_string(size) + " bytes, more than a manifest may (" +
                std::to_string(json::kMaxBytes) + ")");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot read " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string real_path(const std::string& path) {
  char buf[PATH_MAX];
  return ::realpath(path.c_str(), buf) ? std::string(buf) : std::string();
}

// A .pte starts with a flatbuffer whose identifier is "ET" + two digits, then the extended header "eh00".
void check_pte_header(const std::string& path) {
  unsigned char head[12] = {0};
  FILE* f = std::fopen(path.c_str(), "rb");
  size_t n = f ? std::fread(head, 1, sizeof head, f) : 0;
  if (f) std::fclose(f);
  bool ok = n == sizeof head && head[4] == 'E' && head[5] == 'T' && head[6] >= '0' && head[6] <= '9' &&
            head[7] >= '0' && head[7] <= '9' && std::equal(head + 8, head + 12, "eh00");
  if (!ok) throw Error(path + " is not an ExecuTorch program (.pte); re-export the bundle");
}

// A word as a POSIX shell reads it back (Python's shlex.quote): bare when it is only safe characters.
std::string shell_quote(const std::string& s) {
  bool safe = !s.empty() && std::all_of(s.begin(), s.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || (c != 0 && std::strchr("@%+=:,./-_", c) != nullptr);
  });
  if (safe) return s;
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\"'\"'") : std::string(1, c);
  return out + "'";
}

std::string range(int64_t lo, int64_t hi) { return "must be between " + std::to_string(lo) + " and " + std::to_string(hi); }

// Typed access to manifest.json's fields; every failure names the file, the field's path and the value found.
class Fields {
 public:
  explicit Fields(std::string file) : file_(std::move(file)) {}

  [[noreturn]] void fail(const std::string& field, const Value& v, const std::string& rule) const {
    throw Error(file_ + ": " + field + " = " + json::describe(v) + " " + rule);
  }
  [[noreturn]] void fail(const std::string& field, const std::string& problem) const {
    throw Error(file_ + ": " + field + " " + problem);
  }

  const Value& get(const Value& parent, const std::string& key, const std::string& field) const {
    auto it = parent.object.find(key);
    if (it == parent.object.end()) fail(field, "is missing");
    return it->second;
  }
  const Value& object(const Value& parent, const std::string& key, const std::string& field) const {
    const Value& v = get(parent, key, field);
    if (v.type != Value::Type::Object) fail(field, v, "must be an object");
    return v;
  }
  int64_t integer(const Value& v, const std::string& field, int64_t lo, int64_t hi) const {
    if (v.type != Value::Type::Number || v.number != std::floor(v.number) || std::fabs(v.number) > json::kMaxExactInt)
      fail(field, v, "must be an integer");
    auto x = static_cast<int64_t>(v.number);
    if (x < lo || x > hi) fail(field, v, range(lo, hi));
    return x;
  }
  int64_t integer(const Value& parent, const std::string& key, const std::string& field, int64_t lo,
                  int64_t hi) const {
    return integer(get(parent, key, field), field, lo, hi);
  }
  const std::string& string(const Value& v, const std::string& field) const {
    if (v.type != Value::Type::String) fail(field, v, "must be a string");
    return v.string;
  }
  const std::string& string(const Value& parent, const std::string& key, const std::string& field) const {
    return string(get(parent, key, field), field);
  }
  bool boolean(const Value& parent, const std::string& key, const std::string& field) const {
    const Value& v = get(parent, key, field);
    if (v.type != Value::Type::Bool) fail(field, v, "must be true or false");
    return v.boolean;
  }
  double positive(const Value& parent, const std::string& key, const std::string& field) const {
    const Value& v = get(parent, key, field);
    if (v.type != Value::Type::Number || !(v.number > 0)) fail(field, v, "must be a positive number");
    return v.number;
  }
  // A method or program file name: printable, bounded, and (for files) one path component inside the bundle.
  const std::string& name(const Value& v, const std::string& field, bool is_file) const {
    const std::string& s = string(v, field);
    bool printable = std::none_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) < 0x20; });
    if (s.empty() || s.size() > limits::kNameLength || !printable)
      fail(field, v, "must be 1 to " + std::to_string(limits::kNameLength) + " printable characters");
    if (is_file && (s.find('/') != std::string::npos || s.find('\\') != std::string::npos ||
                    s.find("..") != std::string::npos))
      fail(field, v, "must be a plain file name inside the bundle directory (no '/', no '..')");
    return s;
  }

 private:
  std::string file_;
};

template <size_t N>
const std::string& one_of(const Fields& f, const Value& root, const std::string& key, const char* const (&allowed)[N]) {
  const Value& v = f.get(root, key, key);
  const std::string& s = f.string(v, key);
  std::string list;
  for (const char* a : allowed) {
    if (s == a) return s;
    list += std::string(list.empty() ? "" : ", ") + a;
  }
  f.fail(key, v, "must be one of " + list);
}

// group_size: null (no grouped quantisation) or a positive multiple of 32; 8da4w needs one.
int64_t check_group_size(const Fields& f, const Value& root, const std::string& quant) {
  const Value& v = f.get(root, "group_size", "group_size");
  if (v.is_null()) {
    if (quant == "8da4w") f.fail("group_size", v, "must be set for quant 8da4w");
    return 0;
  }
  int64_t g = f.integer(v, "group_size", limits::kMinGroup, limits::kFfnDim);
  if (g % limits::kMinGroup) f.fail("group_size", v, "must be a multiple of " + std::to_string(limits::kMinGroup));
  return g;
}

void read_header(const Fields& f, const Value& root, BundleManifest& m) {
  m.target = one_of(f, root, "target", kTargets);
  m.quant = one_of(f, root, "quant", kQuants);
  m.quant_embedding = one_of(f, root, "quant_embedding", kEmbeddingQuants);
  m.group_size = check_group_size(f, root, m.quant);
  // null: the bundle ships no tokenizer; else a directory inside the bundle (the runtime itself takes token ids)
  if (root.has("tokenizer") && !root.at("tokenizer").is_null())
    m.tokenizer = f.name(root.at("tokenizer"), "tokenizer", true);
  m.max_seq_len = f.integer(root, "max_seq_len", "max_seq_len", 1, limits::kSeqLen);
  const Value& chunk = f.get(root, "max_chunk", "max_chunk");
  m.max_chunk = f.integer(chunk, "max_chunk", INT64_MIN, INT64_MAX);
  if (m.max_chunk < 1 || m.max_chunk > m.max_seq_len)
    f.fail("max_chunk", chunk, "must be between 1 and max_seq_len (" + std::to_string(m.max_seq_len) + ")");
  m.threads = root.has("threads") ? f.integer(root, "threads", "threads", 0, limits::kThreads) : 1;
}

void read_heads(const Fields& f, const Value& cfg, BundleManifest& m) {
  m.n_heads = f.integer(cfg, "n_heads", "config.n_heads", 1, limits::kHeads);
  const Value& kv = f.get(cfg, "n_kv_heads", "config.n_kv_heads");  // null: as many as n_heads (no GQA)
  m.n_kv_heads = kv.is_null() ? m.n_heads : f.integer(kv, "config.n_kv_heads", 1, limits::kHeads);
  const Value& dim = f.get(cfg, "dim", "config.dim");
  if (m.dim % m.n_heads)
    f.fail("config.dim", dim, "must be a multiple of n_heads (" + std::to_string(m.n_heads) + ")");
  m.head_dim = m.dim / m.n_heads;
  if (m.head_dim % 2)
    f.fail("config.dim", dim, "gives an odd head_dim (dim / n_heads = " + std::to_string(m.head_dim) +
                                  "); RoPE needs it even");
  if (m.n_heads % m.n_kv_heads)
    f.fail("config.n_heads", f.get(cfg, "n_heads", ""),
           "must be a multiple of n_kv_heads (" + std::to_string(m.n_kv_heads) + ")");
}

void read_config(const Fields& f, const Value& root, BundleManifest& m) {
  const Value& cfg = f.object(root, "config", "config");
  m.vocab_size = f.integer(cfg, "vocab_size", "config.vocab_size", 1, limits::kVocab);
  m.dim = f.integer(cfg, "dim", "config.dim", 1, limits::kDim);
  m.n_layers = f.integer(cfg, "n_layers", "config.n_layers", 1, limits::kLayers);
  m.ffn_dim = f.integer(cfg, "ffn_dim", "config.ffn_dim", 1, limits::kFfnDim);
  read_heads(f, cfg, m);
  m.num_experts = f.integer(cfg, "num_experts", "config.num_experts", 0, limits::kExperts);
  if (cfg.has("wd_rank") && !cfg.at("wd_rank").is_null())
    m.wd_rank = f.integer(cfg, "wd_rank", "config.wd_rank", 1, limits::kFfnDim);
  m.is_moe = m.num_experts > 0;
  const Value& top_k = f.get(cfg, "top_k", "config.top_k");
  m.top_k = f.integer(top_k, "config.top_k", INT64_MIN, INT64_MAX);
  if (m.is_moe && (m.top_k < 1 || m.top_k > m.num_experts))
    f.fail("config.top_k", top_k, "must be between 1 and num_experts (" + std::to_string(m.num_experts) + ")");
  if (m.is_moe && m.n_layers * m.num_experts > limits::kExpertTable)
    f.fail("config.num_experts", f.get(cfg, "num_experts", ""),
           "x n_layers (" + std::to_string(m.n_layers) + ") must be at most " + std::to_string(limits::kExpertTable));
  const Value& seq = f.get(cfg, "max_seq_len", "config.max_seq_len");
  if (f.integer(seq, "config.max_seq_len", 1, limits::kSeqLen) != m.max_seq_len)
    f.fail("config.max_seq_len", seq, "must equal max_seq_len (" + std::to_string(m.max_seq_len) + ")");
  m.router_temperature = f.positive(cfg, "router_temperature", "config.router_temperature");
  m.norm_topk_prob = f.boolean(cfg, "norm_topk_prob", "config.norm_topk_prob");
}

void read_programs(const Fields& f, const Value& root, BundleManifest& m) {
  const Value& programs = f.object(root, "programs", "programs");
  if (static_cast<int64_t>(programs.object.size()) > limits::kPrograms)
    f.fail("programs", "has " + std::to_string(programs.object.size()) + " entries, at most " +
                           std::to_string(limits::kPrograms) + " are allowed");
  for (const auto& [name, p] : programs.object) {
    const std::string field = "programs." + name;
    if (p.type != Value::Type::Object) f.fail(field, p, "must be an object");
    ProgramFile pf;
    pf.name = name;
    pf.file = f.name(f.get(p, "file", field + ".file"), field + ".file", true);
    pf.bytes = f.integer(p, "bytes", field + ".bytes", 1, limits::kBytes);
    const Value& sha = f.get(p, "sha256", field + ".sha256");
    pf.sha256 = f.string(sha, field + ".sha256");
    if (pf.sha256.size() != 64 || pf.sha256.find_first_not_of("0123456789abcdef") != std::string::npos)
      f.fail(field + ".sha256", sha, "must be 64 lowercase hex digits");
    const Value& methods = f.get(p, "methods", field + ".methods");
    if (methods.type != Value::Type::Array) f.fail(field + ".methods", methods, "must be an array");
    for (size_t i = 0; i < methods.array.size(); ++i)
      pf.methods.push_back(f.name(methods.array[i], field + ".methods." + std::to_string(i), false));
    m.programs.push_back(pf);
  }
}

// One expert's entry: its program must be "experts" (the only program the runtime loads experts from) and list the
// method; no two experts may share a method, or evicting one would unload the other.
// An int4 expert's entry: a segment of exactly the size the config and group give, aligned, inside expert_file.
ExpertEntry read_segment(const Fields& f, const Value& x, const std::string& field, const BundleManifest& m,
                         int64_t segment_bytes) {
  if (x.type != Value::Type::Object) f.fail(field, x, "must be an object");
  ExpertEntry e;
  if (x.has("method") || x.has("program")) f.fail(field + ".method", "must not be given for expert_layout int4");
  const Value& offset = f.get(x, "offset", field + ".offset");
  e.offset = f.integer(offset, field + ".offset", 0, limits::kBytes);
  const Value& bytes = f.get(x, "bytes", field + ".bytes");
  e.bytes = f.integer(bytes, field + ".bytes", 1, limits::kBytes);
  if (e.bytes != segment_bytes)
    f.fail(field + ".bytes", bytes, "must be " + std::to_string(segment_bytes) + " (an int4 expert of this config, group " +
                                        std::to_string(m.group_size) + ")");
  if (e.offset % m.alignment)
    f.fail(field + ".offset", offset, "must be a multiple of expert_file.alignment " + std::to_string(m.alignment));
  if (e.offset + e.bytes > m.expert_file.bytes)
    f.fail(field + ".offset", offset, "puts the segment past the end of " + m.expert_file.file + " (" +
                                          std::to_string(m.expert_file.bytes) + " bytes)");
  const Value& sha = f.get(x, "sha256", field + ".sha256");
  e.sha256 = f.string(sha, field + ".sha256");
  if (e.sha256.size() != 64 || e.sha256.find_first_not_of("0123456789abcdef") != std::string::npos)
    f.fail(field + ".sha256", sha, "must be 64 lowercase hex digits");
  return e;
}

ExpertEntry read_expert(const Fields& f, const Value& x, const std::string& field, const BundleManifest& m,
                        std::set<std::string>& used) {
  if (x.type != Value::Type::Object) f.fail(field, x, "must be an object");
  ExpertEntry e;
  const Value& program = f.get(x, "program", field + ".program");
  e.program = f.string(program, field + ".program");
  if (e.program != "experts") f.fail(field + ".program", program, "must be \"experts\"");
  const Value& method = f.get(x, "method", field + ".method");
  e.method = f.name(method, field + ".method", false);
  const auto& listed = m.program("experts").methods;
  if (std::find(listed.begin(), listed.end(), e.method) == listed.end())
    f.fail(field + ".method", method, "is not among programs.experts.methods");
  if (!used.insert(e.method).second) f.fail(field + ".method", method, "is already another expert's method");
  e.bytes = f.integer(x, "bytes", field + ".bytes", 1, limits::kBytes);  // every expert holds weights
  return e;
}

void check_segments_apart(const Fields& f, const BundleManifest& m);

// Exactly layers "0".."n_layers-1", each with experts "0".."num_experts-1" for an MoE; nothing for a dense model.
void read_experts(const Fields& f, const Value& root, BundleManifest& m) {
  const Value& layers = f.object(root, "experts", "experts");
  int64_t want = m.is_moe ? m.n_layers : 0;
  if (static_cast<int64_t>(layers.object.size()) != want)
    f.fail("experts", "has " + std::to_string(layers.object.size()) + " layer(s), config.n_layers = " +
                          std::to_string(m.n_layers) + " and num_experts = " + std::to_string(m.num_experts) +
                          " need " + std::to_string(want));
  if (!m.is_moe) return;
  std::set<std::string> used;
  int64_t segment_bytes = 0;
  if (m.packed_experts()) expert_matrices(m.dim, m.ffn_dim, m.wd_rank, m.group_size, &segment_bytes);
  m.experts.assign(m.n_layers, std::vector<ExpertEntry>(m.num_experts));
  for (int64_t i = 0; i < m.n_layers; ++i) {
    const std::string field = "experts." + std::to_string(i);
    const Value& layer = f.object(layers, std::to_string(i), field);
    if (static_cast<int64_t>(layer.object.size()) != m.num_experts)
      f.fail(field, "has " + std::to_string(layer.object.size()) + " expert(s), config.num_experts = " +
                        std::to_string(m.num_experts));
    for (int64_t e = 0; e < m.num_experts; ++e) {
      const std::string key = std::to_string(e);
      const Value& x = f.get(layer, key, field + "." + key);
      m.experts[i][e] = m.packed_experts() ? read_segment(f, x, field + "." + key, m, segment_bytes)
                                           : read_expert(f, x, field + "." + key, m, used);
    }
  }
  if (m.packed_experts()) check_segments_apart(f, m);
}

// No two segments overlap: evicting one expert's pages must never take another's.
void check_segments_apart(const Fields& f, const BundleManifest& m) {
  std::vector<std::pair<int64_t, std::string>> starts;
  for (size_t i = 0; i < m.experts.size(); ++i)
    for (size_t e = 0; e < m.experts[i].size(); ++e)
      starts.push_back({m.experts[i][e].offset, "experts." + std::to_string(i) + "." + std::to_string(e)});
  std::sort(starts.begin(), starts.end());
  const int64_t bytes = m.experts[0][0].bytes;  // all equal (read_segment)
  for (size_t j = 1; j < starts.size(); ++j)
    if (starts[j].first < starts[j - 1].first + bytes)
      f.fail(starts[j].second + ".offset", "overlaps another expert's segment");
}

// expert_layout and, for int4, expert_file: {file, bytes, sha256, alignment}.
void read_expert_layout(const Fields& f, const Value& root, BundleManifest& m) {
  static const char* const layouts[] = {"none", "int4", "xnnpack"};
  m.expert_layout = one_of(f, root, "expert_layout", layouts);
  if (m.is_moe == (m.expert_layout == "none"))
    f.fail("expert_layout", f.get(root, "expert_layout", ""),
           m.is_moe ? "must be int4 or xnnpack for an MoE model (config.num_experts > 0)"
                    : "must be \"none\" for a dense model");
  const bool has_file = root.has("expert_file") && !root.at("expert_file").is_null();
  if (has_file != m.packed_experts())
    f.fail("expert_file", std::string("must be ") + (m.packed_experts() ? "given" : "null") + " for expert_layout " +
                              m.expert_layout);
  if (!has_file) return;
  if (m.quant != "8da4w") f.fail("expert_layout", f.get(root, "expert_layout", ""), "holds 8da4w experts, but quant is " + m.quant);
  const Value& x = f.object(root, "expert_file", "expert_file");
  m.expert_file.name = "expert_file";
  m.expert_file.file = f.name(f.get(x, "file", "expert_file.file"), "expert_file.file", true);
  m.expert_file.bytes = f.integer(x, "bytes", "expert_file.bytes", 1, limits::kBytes);
  const Value& sha = f.get(x, "sha256", "expert_file.sha256");
  m.expert_file.sha256 = f.string(sha, "expert_file.sha256");
  if (m.expert_file.sha256.size() != 64 ||
      m.expert_file.sha256.find_first_not_of("0123456789abcdef") != std::string::npos)
    f.fail("expert_file.sha256", sha, "must be 64 lowercase hex digits");
  m.alignment = f.integer(x, "alignment", "expert_file.alignment", 64, int64_t{1} << 20);
}

void read_non_expert_bytes(const Fields& f, const Value& root, BundleManifest& m) {
  const Value& kinds = f.object(root, "non_expert_bytes", "non_expert_bytes");
  if (static_cast<int64_t>(kinds.object.size()) > limits::kByteKinds)
    f.fail("non_expert_bytes", "has " + std::to_string(kinds.object.size()) + " entries, at most " +
                                   std::to_string(limits::kByteKinds) + " are allowed");
  for (const auto& [kind, bytes] : kinds.object)
    m.non_expert_bytes[kind] = f.integer(bytes, "non_expert_bytes." + kind, 0, limits::kBytes);
}

void require_program(const Fields& f, const BundleManifest& m, const std::string& name, const std::string& who) {
  for (const auto& p : m.programs)
    if (p.name == name) return;
  f.fail("programs", "lacks \"" + name + "\", which " + who + " needs");
}

// memory: the KV bytes per position must be what the config implies, and the KV buffer one of the plan's ids of
// exactly max_seq_len positions; the plan itself is compared with the program when it opens (runtime.cpp).
void read_memory(const Fields& f, const Value& root, BundleManifest& m) {
  const Value& mem = f.object(root, "memory", "memory");
  m.kv_bytes_per_position = f.integer(mem, "kv_bytes_per_position", "memory.kv_bytes_per_position", 1,
                                      limits::kBytes);
  const std::string kv_dtype = mem.has("kv_dtype") ? f.string(mem, "kv_dtype", "memory.kv_dtype") : "fp32";
  if (kv_dtype != "fp32" && kv_dtype != "fp16")
    f.fail("memory.kv_dtype", f.get(mem, "kv_dtype", "memory.kv_dtype"), "must be \"fp32\" or \"fp16\"");
  const int64_t per_position = m.n_layers * 2 * m.n_kv_heads * m.head_dim * (kv_dtype == "fp16" ? 2 : 4);
  if (m.kv_bytes_per_position != per_position)
    f.fail("memory.kv_bytes_per_position", f.get(mem, "kv_bytes_per_position", ""),
           "must be " + std::to_string(per_position) + " (" + kv_dtype +
               " keys and values of config.n_layers layers)");
  const Value& kv = f.object(mem, "kv_buffer", "memory.kv_buffer");
  m.kv_program = f.string(kv, "program", "memory.kv_buffer.program");
  m.kv_buffer_id = f.integer(kv, "id", "memory.kv_buffer.id", 0, limits::kPlannedBuffers - 1);
  const Value& plans = f.object(mem, "planned_bytes", "memory.planned_bytes");
  for (const auto& [program, sizes] : plans.object) {
    const std::string field = "memory.planned_bytes." + program;
    require_program(f, m, program, field);
    if (sizes.type != Value::Type::Array || static_cast<int64_t>(sizes.array.size()) > limits::kPlannedBuffers)
      f.fail(field, sizes, "must be a list of at most " + std::to_string(limits::kPlannedBuffers) + " byte counts");
    auto& out = m.planned_bytes[program];
    for (size_t i = 0; i < sizes.array.size(); ++i)
      out.push_back(f.integer(sizes.array[i], field + "[" + std::to_string(i) + "]", 0, limits::kBytes));
  }
  auto plan = m.planned_bytes.find(m.kv_program);
  if (plan == m.planned_bytes.end() || m.kv_buffer_id >= static_cast<int64_t>(plan->second.size()))
    f.fail("memory.kv_buffer", "is not a buffer of memory.planned_bytes");
  if (plan->second[m.kv_buffer_id] != per_position * m.max_seq_len)
    f.fail(std::string("memory.planned_bytes.") + m.kv_program, "buffer " + std::to_string(m.kv_buffer_id) +
           " has " + std::to_string(plan->second[m.kv_buffer_id]) + " bytes, not the " +
           std::to_string(per_position * m.max_seq_len) + " of the KV caches for max_seq_len " +
           std::to_string(m.max_seq_len));
}

// Every method the runtime will call is listed by its program (the programs themselves are checked when opened).
void check_required_methods(const Fields& f, const BundleManifest& m) {
  for (const auto& [program, methods] : required_methods(m)) {
    const auto& listed = m.program(program).methods;
    for (const auto& method : methods)
      if (std::find(listed.begin(), listed.end(), method) == listed.end())
        f.fail("programs." + program + ".methods", "lacks \"" + method + "\", which the runtime calls");
  }
}

// The command that writes a current bundle from what an older manifest says of its source and target (as
// cosmoes/schema.py's reexport_command words it).
std::string reexport_command(const Value& root, const std::string& dir) {
  auto text = [](const Value& obj, const char* key) -> std::string {
    if (obj.type != Value::Type::Object || !obj.has(key) || obj.at(key).type != Value::Type::String) return "";
    return obj.at(key).string;
  };
  const Value none;
  const Value& source = root.has("source") ? root.at("source") : none;
  std::string what = text(source, "checkpoint");
  if (what.empty()) what = text(source, "preset");
  std::string cmd = "cosmoes export " + (what.empty() ? std::string("CHECKPOINT") : shell_quote(what));
  std::string target = text(root, "target");
  for (const char* t : kTargets)
    if (target == t) cmd += " --target " + target;
  return "`" + cmd + " --out " + shell_quote(dir) + "`";
}

void check_format(const Fields& f, const Value& root, const std::string& path, const std::string& dir) {
  if (!root.has("format") || root.at("format").type != Value::Type::String ||
      root.at("format").string != "cosmoes-executorch-bundle")
    throw Error(path + " is not a cosmoes bundle manifest");
  int64_t version = f.integer(root, "format_version", "format_version", INT32_MIN, INT32_MAX);
  if (version > kBundleFormatVersion)
    throw Error("bundle format " + std::to_string(version) + " is newer than this runtime supports (" +
                std::to_string(kBundleFormatVersion) + "); rebuild the runner from a newer cosmoes");
  if (version < kBundleFormatVersion)
    throw Error("bundle format " + std::to_string(version) + " is older than this runtime supports (" +
                std::to_string(kBundleFormatVersion) + "): re-export it: " + reexport_command(root, dir));
}

BundleManifest parse_manifest(const std::string& dir, const std::string& path) {
  Value root;
  try {
    root = json::parse(read_manifest_text(path));
  } catch (const Error& e) {
    throw Error("corrupt bundle manifest " + path + ": " + e.what());
  }
  Fields f(path);
  if (root.type != Value::Type::Object) f.fail("the document", root, "must be an object");
  check_format(f, root, path, dir);
  BundleManifest m;
  m.dir = dir;
  read_header(f, root, m);
  read_config(f, root, m);
  read_programs(f, root, m);
  require_program(f, m, "backbone", "every bundle");
  read_expert_layout(f, root, m);
  if (m.expert_layout == "xnnpack") require_program(f, m, "experts", "expert_layout xnnpack");
  read_experts(f, root, m);
  read_non_expert_bytes(f, root, m);
  read_memory(f, root, m);
  check_required_methods(f, m);
  return m;
}

// The program's file, as a regular file inside the bundle: a symbolic link may not lead out of it.
void check_program_path(const BundleManifest& m, const ProgramFile& p, const std::string& manifest) {
  std::string file = m.path(p);
  struct stat st;
  if (::lstat(file.c_str(), &st) != 0) throw Error("bundle file missing: " + file);
  if (S_ISLNK(st.st_mode)) {
    std::string target = real_path(file), inside = real_path(m.dir) + "/";
    if (target.empty()) throw Error("bundle file missing: " + file + " (a broken symbolic link)");
    if (target.compare(0, inside.size(), inside) != 0)
      throw Error(manifest + ": programs." + p.name + ".file = " + json::quote(p.file) +
                  " is a symbolic link to " + target + ", outside the bundle directory");
  }
  if (file_size(file) < 0) throw Error("bundle file " + file + " is not a regular file");
}

void check_program_file(const BundleManifest& m, const ProgramFile& p, bool check_sha) {
  std::string file = m.path(p);
  int64_t size = file_size(file);
  if (size != p.bytes)
    throw Error("bundle file " + file + " has " + std::to_string(size) + " bytes, the manifest says " +
                std::to_string(p.bytes) + " (truncated or replaced); re-export the bundle");
  if (p.name != "expert_file") check_pte_header(file);
  if (!check_sha) return;
  if (p.name != "expert_file") {
    if (sha256_file(file) != p.sha256)
      throw Error("bundle file " + file + " is corrupt (sha256 differs from the manifest); re-export the bundle");
    return;
  }
  // the segment file: its digest and every segment's, from one read of it
  std::vector<Range> ranges;
  for (const auto& layer : m.experts)
    for (const auto& e : layer) ranges.push_back({e.offset, e.bytes});
  std::vector<std::string> digests;
  if (sha256_file_and_ranges(file, ranges, &digests) != p.sha256)
    throw Error("bundle file " + file + " is corrupt (sha256 differs from the manifest); re-export the bundle");
  const size_t per_layer = m.experts.empty() ? 1 : m.experts[0].size();
  for (size_t k = 0; k < digests.size(); ++k) {
    const std::string layer = std::to_string(k / per_layer), e = std::to_string(k % per_layer);
    if (digests[k] != m.experts[k / per_layer][k % per_layer].sha256)
      throw Error("bundle file " + file + ": the segment of expert " + e + " in layer " + layer +
                  " is corrupt (sha256 differs from experts." + layer + "." + e + ".sha256); re-export the bundle");
  }
}

}  // namespace

int64_t BundleManifest::non_expert_total() const {
  int64_t total = 0;
  for (const auto& kv : non_expert_bytes) total += kv.second;
  return total;
}

int64_t BundleManifest::max_expert_bytes() const {
  int64_t most = 0;
  for (const auto& layer : experts)
    for (const auto& e : layer) most = std::max(most, e.bytes);
  return most;
}

int64_t BundleManifest::active_expert_bytes() const {
  int64_t total = 0;
  for (const auto& layer : experts) {
    std::vector<int64_t> sizes;
    for (const auto& e : layer) sizes.push_back(e.bytes);
    std::sort(sizes.rbegin(), sizes.rend());
    for (int64_t k = 0; k < top_k && k < static_cast<int64_t>(sizes.size()); ++k) total += sizes[k];
  }
  return total;
}

std::vector<MatrixLayout> expert_matrices(int64_t dim, int64_t ffn_dim, int64_t wd_rank, int64_t group,
                                          int64_t* segment_bytes) {
  auto up = [](int64_t n, int64_t to) { return (n + to - 1) / to * to; };
  constexpr int64_t kPartAlign = 64;  // segments.py PART_ALIGN
  std::vector<std::pair<int64_t, int64_t>> shapes = {{ffn_dim, dim}, {ffn_dim, dim}, {dim, ffn_dim}};  // w1 w3 w2
  if (wd_rank > 0) {
    std::vector<std::pair<int64_t, int64_t>> parts;
    for (auto [out, in] : shapes) parts.insert(parts.end(), {{wd_rank, in}, {out, wd_rank}});
    shapes = parts;
  }
  std::vector<MatrixLayout> out;
  int64_t at = 0;
  for (auto [rows, in] : shapes) {
    MatrixLayout l;
    l.rows = rows, l.in = in, l.group = group, l.padded = up(in, group);
    l.nibbles_at = up(at, kPartAlign);
    const int64_t stored = int4::stored_rows(rows);
    l.scales_at = up(l.nibbles_at + stored * l.padded / 2, kPartAlign);
    at = l.scales_at + l.padded / group * stored * 4;
    out.push_back(l);
  }
  if (segment_bytes) *segment_bytes = at;
  return out;
}

const ProgramFile& BundleManifest::program(const std::string& name) const {
  for (const auto& p : programs)
    if (p.name == name) return p;
  throw Error("bundle " + dir + " has no program '" + name + "'");
}

std::map<std::string, std::vector<std::string>> required_methods(const BundleManifest& m) {
  std::map<std::string, std::vector<std::string>> need;
  auto& backbone = need["backbone"];
  backbone = {"embed", "context", "head"};
  for (int64_t i = 0; i < m.n_layers; ++i) {
    backbone.push_back("layer_" + std::to_string(i));
    if (!m.is_moe) backbone.push_back("layer_" + std::to_string(i) + "_ffn");
  }
  for (const auto& layer : m.experts)
    for (const auto& e : layer)
      if (!e.program.empty()) need[e.program].push_back(e.method);
  return need;
}

BundleManifest load_bundle_manifest(const std::string& dir, bool check_sha) {
  if (!is_dir(dir)) throw Error("bundle not found: " + dir);
  std::string path = dir + "/manifest.json";
  if (file_size(path) < 0) throw Error("not a cosmoes bundle (no manifest.json): " + dir);
  BundleManifest m = parse_manifest(dir, path);
  std::vector<ProgramFile> files = m.programs;
  if (m.packed_experts()) files.push_back(m.expert_file);
  for (const auto& p : files) check_program_path(m, p, path);  // every name first, then any file's bytes
  for (const auto& p : files) check_program_file(m, p, check_sha);
  return m;
}

std::string tokenizer_dir(const BundleManifest& m) {
  const std::string none = "bundle " + m.dir + " has no tokenizer; re-export it from a checkpoint with one";
  if (m.tokenizer.empty()) throw Error(none);
  std::string dir = m.dir + "/" + m.tokenizer, target = real_path(dir), inside = real_path(m.dir) + "/";
  struct stat st;
  if (target.empty() || ::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) throw Error(none);
  if (target.compare(0, inside.size(), inside) != 0)
    throw Error(m.dir + "/manifest.json: tokenizer = " + json::quote(m.tokenizer) + " leads to " + target +
                ", outside the bundle directory");
  return dir;
}

}  // namespace cosmoes
