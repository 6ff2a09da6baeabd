// cosmoes_sha256_check: the runtime's SHA-256 on its own, for the tests (against Python's hashlib, with the CPU's
// SHA instructions and with COSMOES_SHA=portable) and to time it.
//   cosmoes_sha256_check FILE...         prints "DIGEST  FILE" per file
//   cosmoes_sha256_check --bench FILE    MB/s of one pass over the file
#include <chrono>
#include <cstdio>
#include <string>

#include "errors.h"
#include "sha256.h"

int main(int argc, char** argv) {
  try {
    if (argc == 3 && std::string(argv[1]) == "--bench") {
      std::FILE* f = std::fopen(argv[2], "rb");
      if (!f) throw cosmoes::Error(std::string("cannot read ") + argv[2]);
      std::fseek(f, 0, SEEK_END);
      const double mb = std::ftell(f) / 1e6;
      std::fclose(f);
      auto t0 = std::chrono::steady_clock::now();
      cosmoes::sha256_file(argv[2]);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("%.0f MB/s\n", mb / s);
      return 0;
    }
    if (argc < 2) {
      std::fprintf(stderr, "usage: cosmoes_sha256_check FILE... | --bench FILE\n");
      return 2;
    }
    for (int i = 1; i < argc; ++i) std::printf("%s  %s\n", cosmoes::sha256_file(argv[i]).c_str(), argv[i]);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
