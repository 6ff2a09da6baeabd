// Quiets pytorch/tokenizers' log lines (linked with the wheel's compiled library; see cmake/tokenizers.cmake).
//
// Its default logger prints every Info line to stderr, from the moment the library loads ("Registering override
// fallback regex"), ahead of a front end's own output: a refusal would no longer be one line. The library calls
// its logger through the PLT, so this definition, exported by the binary that links the library, takes its place.
// Failures still reach the user: every tokenizer error becomes the runtime's own one-line message.
//
// The header that declares the logger also defines it inline, so this file declares the two names itself.
#include <cstdarg>
#include <cstddef>
#include <cstdint>

namespace tokenizers {
enum class LogLevel : uint8_t;
namespace internal {

void vlogf(LogLevel, const char*, const char*, size_t, const char*, va_list) {}

}  // namespace internal
}  // namespace tokenizers
