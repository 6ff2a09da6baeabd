// libFuzzer target: any bytes as a bundle's manifest.json, opened and run one token the way cosmoes_runner does.
//
// The bundle directory (COSMOES_FUZZ_BUNDLE, made by fuzz/make_seed_bundle.py) holds small valid programs:
// backbone.pte + experts.pte of a tiny MoE and dense.pte of a tiny dense model, plus two symbolic links, one to a
// program inside the directory and one leading out of it. Each input is copied into a private copy of that
// directory as manifest.json; cosmoes::Runtime then validates it, opens the programs it names (checking their
// sizes, headers, sha256 and method signatures) and, if all of that passes, runs one token. A cosmoes::Error is
// the expected refusal; anything else (a crash, a sanitizer report, another exception) is a finding.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "errors.h"
#include "runtime.h"

namespace fs = std::filesystem;

namespace {

std::string g_dir;  // this process's bundle directory; each input replaces its manifest.json

// A private copy of the seed directory (links copied as links), so parallel fuzzers never share a manifest.json.
std::string make_bundle_dir() {
  const char* seed = std::getenv("COSMOES_FUZZ_BUNDLE");
  if (!seed || !fs::is_directory(seed)) {
    std::fprintf(stderr, "set COSMOES_FUZZ_BUNDLE to the directory fuzz/make_seed_bundle.py wrote (bundle/)\n");
    std::exit(1);
  }
  fs::path dir = fs::temp_directory_path() / ("cosmoes-fuzz-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::copy(seed, dir, fs::copy_options::recursive | fs::copy_options::copy_symlinks);
  return dir.string();
}

void write_manifest(const uint8_t* data, size_t size) {
  std::string path = g_dir + "/manifest.json";
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(data, 1, size, f) != size || std::fclose(f) != 0) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  g_dir = make_bundle_dir();
  std::atexit([] { fs::remove_all(g_dir); });
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  write_manifest(data, size);
  cosmoes::RuntimeOptions options;
  options.threads = 1;  // not the manifest's: a 1024-thread pool per input would only slow the search
  try {
    cosmoes::Runtime rt(g_dir, options);
    rt.prefill({0});  // one token through embed, context, every layer (and its experts) and head
  } catch (const cosmoes::Error&) {
    // a refusal with its one-line reason: what every bad manifest must produce
  }
  return 0;
}
