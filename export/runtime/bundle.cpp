// Reading and validating manifest.json (written by cosmoes/export/manifest.py) before any program is opened.
#include "bundle.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "errors.h"
#include "json.h"
#include "sha256.h"

namespace cosmoes {
namespace {

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot read " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool is_dir(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

int64_t file_size(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return -1;
  return static_cast<int64_t>(st.st_size);
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

void read_config(const json::Value& cfg, BundleManifest& m) {
  m.vocab_size = cfg.at("vocab_size").as_int("config.vocab_size");
  m.dim = cfg.at("dim").as_int("config.dim");
  m.n_layers = cfg.at("n_layers").as_int("config.n_layers");
  m.num_experts = cfg.at("num_experts").as_int("config.num_experts");
  m.top_k = cfg.at("top_k").as_int("config.top_k");
  m.router_temperature = cfg.at("router_temperature").as_number("config.router_temperature");
  m.norm_topk_prob = cfg.at("norm_topk_prob").as_bool("config.norm_topk_prob");
}

void read_programs(const json::Value& root, BundleManifest& m) {
  for (const auto& [name, p] : root.at("programs").object) {
    ProgramFile pf;
    pf.name = name;
    pf.file = p.at("file").as_string("file");
    pf.bytes = p.at("bytes").as_int("bytes");
    pf.sha256 = p.at("sha256").as_string("sha256");
    for (const auto& method : p.at("methods").array) pf.methods.push_back(method.as_string("methods"));
    m.programs.push_back(pf);
  }
}

void read_experts(const json::Value& root, BundleManifest& m) {
  const auto& layers = root.at("experts");
  if (layers.type != json::Value::Type::Object || layers.object.empty()) return;
  m.is_moe = true;
  m.experts.assign(m.n_layers, std::vector<ExpertEntry>(m.num_experts));
  for (int64_t i = 0; i < m.n_layers; ++i) {
    const auto& layer = layers.at(std::to_string(i));
    for (int64_t e = 0; e < m.num_experts; ++e) {
      const auto& x = layer.at(std::to_string(e));
      m.experts[i][e] = {x.at("program").as_string("program"), x.at("method").as_string("method"),
                         x.at("bytes").as_int("bytes")};
    }
  }
}

BundleManifest parse_manifest(const std::string& dir, const std::string& path) {
  json::Value root;
  try {
    root = json::parse(read_text(path));
  } catch (const Error& e) {
    throw Error("corrupt bundle manifest " + path + ": " + e.what());
  }
  if (!root.has("format") || root.at("format").type != json::Value::Type::String ||
      root.at("format").string != "cosmoes-executorch-bundle")
    throw Error(path + " is not a cosmoes bundle manifest");
  BundleManifest m;
  m.dir = dir;
  try {
    int64_t version = root.at("format_version").as_int("format_version");
    if (version > kBundleFormatVersion)
      throw Error("bundle format " + std::to_string(version) + " is newer than this runtime supports (" +
                  std::to_string(kBundleFormatVersion) + "); rebuild the runner from a newer cosmoes");
    if (version < kBundleFormatVersion)
      throw Error("bundle format " + std::to_string(version) + " is older than this runtime supports (" +
                  std::to_string(kBundleFormatVersion) + "): re-export it with `cosmoes export`");
    m.target = root.at("target").as_string("target");
    m.quant = root.at("quant").as_string("quant");
    m.quant_embedding = root.at("quant_embedding").as_string("quant_embedding");
    m.max_seq_len = root.at("max_seq_len").as_int("max_seq_len");
    m.max_chunk = root.at("max_chunk").as_int("max_chunk");
    m.threads = root.has("threads") ? root.at("threads").as_int("threads") : 1;
    read_config(root.at("config"), m);
    read_programs(root, m);
    read_experts(root, m);
    for (const auto& [kind, bytes] : root.at("non_expert_bytes").object) m.non_expert_bytes[kind] = bytes.as_int(kind);
  } catch (const Error& e) {
    std::string what = e.what();
    if (what.rfind("bundle format", 0) == 0) throw;
    throw Error("corrupt bundle manifest " + path + ": " + what);
  }
  return m;
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

const ProgramFile& BundleManifest::program(const std::string& name) const {
  for (const auto& p : programs)
    if (p.name == name) return p;
  throw Error("bundle " + dir + " has no program '" + name + "'");
}

BundleManifest load_bundle_manifest(const std::string& dir, bool check_sha) {
  if (!is_dir(dir)) throw Error("bundle not found: " + dir);
  std::string path = dir + "/manifest.json";
  if (file_size(path) < 0) throw Error("not a cosmoes bundle (no manifest.json): " + dir);
  BundleManifest m = parse_manifest(dir, path);
  for (const auto& p : m.programs) {
    std::string file = m.path(p);
    int64_t size = file_size(file);
    if (size < 0) throw Error("bundle file missing: " + file);
    if (size != p.bytes)
      throw Error("bundle file " + file + " has " + std::to_string(size) + " bytes, the manifest says " +
                  std::to_string(p.bytes) + " (truncated or replaced); re-export the bundle");
    check_pte_header(file);
    if (check_sha && sha256_file(file) != p.sha256)
      throw Error("bundle file " + file + " is corrupt (sha256 differs from the manifest); re-export the bundle");
  }
  return m;
}

}  // namespace cosmoes
