// The one exception type of the runtime: a user-facing problem stated in one line (bad bundle, bad option).
#pragma once

#include <stdexcept>
#include <string>

namespace cosmoes {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace cosmoes
