// A bundle's manifest.json as the native runtime needs it, and the checks run before ExecuTorch sees a file (§3.4.2).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace cosmoes {

constexpr int kBundleFormatVersion = 8;  // cosmoes/export/manifest.py FORMAT_VERSION

// What a manifest may ask of the runtime. A bundle can come from anywhere, so every number is checked against these
// before anything is allocated or indexed by it; each is far above any model the paper describes (Table 1: 19
// layers, 8 experts, dim 1536, the Llama-3 vocabulary of 128256) yet keeps every size the runtime derives (a
// layer x expert table, a sequence's positions, summed byte counts) small and free of integer overflow.
namespace limits {
constexpr int64_t kVocab = int64_t{1} << 24;         // config.vocab_size
constexpr int64_t kDim = int64_t{1} << 16;           // config.dim
constexpr int64_t kFfnDim = int64_t{1} << 20;        // config.ffn_dim
constexpr int64_t kLayers = 1024;                    // config.n_layers
constexpr int64_t kHeads = 65536;                    // config.n_heads, n_kv_heads (also bounded by dim)
constexpr int64_t kExperts = 1024;                   // config.num_experts (per layer)
constexpr int64_t kExpertTable = int64_t{1} << 16;   // n_layers x num_experts (fits json::kMaxBytes)
constexpr int64_t kSeqLen = int64_t{1} << 20;        // max_seq_len (max_chunk is 1..max_seq_len)
constexpr int64_t kThreads = 1024;                   // threads (0 = one per core)
constexpr int64_t kBytes = int64_t{1} << 40;         // any byte count: a program file, an expert, a weight kind
constexpr int64_t kPrograms = 16;                    // entries of "programs"
constexpr int64_t kByteKinds = 64;                   // entries of "non_expert_bytes"
constexpr int64_t kPlannedBuffers = 64;              // memory.planned_bytes ids per program (schema.py's bound)
constexpr size_t kNameLength = 255;                  // a program's file name, a method name (NAME_MAX)
constexpr int64_t kMinGroup = 32;                    // group_size: a positive multiple (recipes.MIN_GROUP)
}  // namespace limits

// The values cosmoes/export/recipes.py allows (its targets' recipes, QUANT_MODES less the refused 4w,
// EMBEDDING_QUANT_MODES): a manifest naming anything else was not written by cosmoes export.
inline const char* const kTargets[] = {"android", "host", "ios"};
inline const char* const kQuants[] = {"none", "8da4w", "8da8w"};
inline const char* const kEmbeddingQuants[] = {"none", "int8", "int4"};

struct ProgramFile {
  std::string name;  // "backbone" | "experts"
  std::string file;  // a plain file name inside the bundle directory (no '/', no '..')
  int64_t bytes = 0;
  std::string sha256;
  std::vector<std::string> methods;
};

struct ExpertEntry {
  std::string program;  // expert_layout xnnpack: the method of programs.experts that holds the expert
  std::string method;
  int64_t offset = -1;  // expert_layout int4: the segment's byte offset in expert_file
  std::string sha256;   // ... and its sha256
  int64_t bytes = 0;    // stored weight bytes of this expert
};

// One packed linear of an int4 expert segment (cosmoes/export/segments.py expert_matrices, the same order and
// offsets): out x in weights, the input padded to a multiple of the group; its nibbles then its scales.
struct MatrixLayout {
  int64_t rows = 0, in = 0, padded = 0, group = 0;
  int64_t nibbles_at = 0, scales_at = 0;  // byte offsets inside the segment
};

// The matrices of one SwiGLU expert (w1, w3, w2; each as down then up when wd_rank > 0) and the segment's bytes.
std::vector<MatrixLayout> expert_matrices(int64_t dim, int64_t ffn_dim, int64_t wd_rank, int64_t group,
                                          int64_t* segment_bytes);

struct BundleManifest {
  std::string dir;
  std::string target, quant, quant_embedding;
  int64_t max_seq_len = 0, max_chunk = 0, threads = 1;
  // model config (cosmoes.config.ModelConfig)
  int64_t vocab_size = 0, dim = 0, n_layers = 0, num_experts = 0, top_k = 0;
  int64_t n_heads = 0, n_kv_heads = 0, head_dim = 0, ffn_dim = 0;
  double router_temperature = 1.0;
  bool norm_topk_prob = true;
  bool is_moe = false;  // config.num_experts > 0
  int64_t wd_rank = 0;  // config.wd_rank (0: full-rank experts)
  int64_t group_size = 0;  // 0: none
  std::string expert_layout = "none";  // none | int4 (segments of expert_file) | xnnpack (methods of experts.pte)
  ProgramFile expert_file;  // layout int4: experts.bin (name "expert_file", no methods)
  int64_t alignment = 0;    // every segment offset is a multiple of it
  std::vector<ProgramFile> programs;
  std::vector<std::vector<ExpertEntry>> experts;  // [layer][expert]; empty for dense models
  std::map<std::string, int64_t> non_expert_bytes;
  // memory: the KV caches (fp32, all layers) per position and the planned buffer that holds them; each program's
  // memory plan (bytes per buffer id), which the runtime holds against the program it opens
  int64_t kv_bytes_per_position = 0;
  std::string kv_program;
  int64_t kv_buffer_id = 0;
  std::map<std::string, std::vector<int64_t>> planned_bytes;
  std::string tokenizer;  // directory inside the bundle; "" when the bundle ships none

  int64_t non_expert_total() const;
  int64_t max_expert_bytes() const;
  int64_t active_expert_bytes() const;  // top_k experts of every layer (the largest ones)
  const ProgramFile& program(const std::string& name) const;
  bool packed_experts() const { return expert_layout == "int4"; }
  // The file the experts are read from: expert_file (int4), experts.pte (xnnpack), backbone.pte (a dense model).
  std::string experts_path() const {
    return packed_experts() ? path(expert_file) : path(program(is_moe ? "experts" : "backbone"));
  }
  std::string path(const ProgramFile& p) const { return dir + "/" + p.file; }
};

// Reads and validates <dir>/manifest.json: format and version; every field's type and range (limits above); the
// rules between fields (attention heads, top_k, the expert table against n_layers x num_experts, every method the
// runtime will call listed by its program); every program a plain file inside `dir` (a symbolic link must stay
// inside it too) with its recorded size, an ExecuTorch header and (check_sha) its sha256. Nothing is opened
// before the manifest passed. Throws cosmoes::Error with one line naming the file, the field and its value.
BundleManifest load_bundle_manifest(const std::string& dir, bool check_sha);

// The bundle's tokenizer directory, checked to lie inside the bundle (a symbolic link may not lead out); throws
// cosmoes::Error when the bundle ships none.
std::string tokenizer_dir(const BundleManifest& m);

// The methods of each program that the runtime calls for this manifest (embed, context, layer_i [+ layer_i_ffn],
// head; the experts' methods), by program name.
std::map<std::string, std::vector<std::string>> required_methods(const BundleManifest& m);

}  // namespace cosmoes
