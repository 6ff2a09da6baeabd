// SHA-256 of a file (FIPS 180-4), to check bundle programs against manifest.json before ExecuTorch reads them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace cosmoes {

// Lower-case hex digest of the file's bytes; throws cosmoes::Error if it cannot be read.
std::string sha256_file(const std::string& path);

struct Range {
  int64_t offset, bytes;
};

// The file's digest, as sha256_file, and in the same single read the digest of each byte range (ranges must not
// overlap; bytes past the end of the file are simply not there, so such a range hashes what the file holds of it).
std::string sha256_file_and_ranges(const std::string& path, const std::vector<Range>& ranges,
                                   std::vector<std::string>* range_digests);

}  // namespace cosmoes
