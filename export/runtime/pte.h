// A check of a .pte's instruction table that ExecuTorch's own loader leaves out (see pte.cpp for why).
#pragma once

#include <string>

namespace cosmoes {

// Reads the program flatbuffer at the start of `path` and throws cosmoes::Error, naming the file and method, when
// a kernel call names an operator that does not exist or whose name cannot be resolved. Every read is bounds
// checked, so any file is safe to pass.
void check_operator_table(const std::string& path);

}  // namespace cosmoes
