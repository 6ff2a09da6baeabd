// A bundle's manifest.json as the native runtime needs it, and the checks run before ExecuTorch sees a file (§3.4.2).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace cosmoes {

constexpr int kBundleFormatVersion = 2;  // cosmoes/export/manifest.py FORMAT_VERSION

struct ProgramFile {
  std::string name;  // "backbone" | "experts"
  std::string file;  // relative to the bundle directory
  int64_t bytes = 0;
  std::string sha256;
  std::vector<std::string> methods;
};

struct ExpertEntry {
  std::string program;
  std::string method;
  int64_t bytes = 0;  // stored weight bytes of this expert
};

struct BundleManifest {
  std::string dir;
  std::string target, quant, quant_embedding;
  int64_t max_seq_len = 0, max_chunk = 0, threads = 1;
  // model config (cosmoes.config.ModelConfig)
  int64_t vocab_size = 0, dim = 0, n_layers = 0, num_experts = 0, top_k = 0;
  double router_temperature = 1.0;
  bool norm_topk_prob = true;
  bool is_moe = false;
  std::vector<ProgramFile> programs;
  std::vector<std::vector<ExpertEntry>> experts;  // [layer][expert]; empty for dense models
  std::map<std::string, int64_t> non_expert_bytes;

  int64_t non_expert_total() const;
  int64_t max_expert_bytes() const;
  int64_t active_expert_bytes() const;  // top_k experts of every layer (the largest ones)
  const ProgramFile& program(const std::string& name) const;
  std::string path(const ProgramFile& p) const { return dir + "/" + p.file; }
};

// Reads and validates <dir>/manifest.json: format and version, every program present with its recorded size, an
// ExecuTorch header, and (check_sha) its sha256. Throws cosmoes::Error with one line naming the problem.
BundleManifest load_bundle_manifest(const std::string& dir, bool check_sha);

}  // namespace cosmoes
