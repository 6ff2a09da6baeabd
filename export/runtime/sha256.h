// SHA-256 of a file (FIPS 180-4), to check bundle programs against manifest.json before ExecuTorch reads them.
#pragma once

#include <string>

namespace cosmoes {

// Lower-case hex digest of the file's bytes; throws cosmoes::Error if it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace cosmoes
