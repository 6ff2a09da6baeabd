// libcosmoes_ops: the project's graph operators for a process that runs bundles through ExecuTorch's Python
// bindings (cosmoes.runtime.python loads it with ctypes; it shares their libexecutorch, so one registry).
#include "ops.h"

extern "C" __attribute__((visibility("default"))) int cosmoes_register_ops() { return cosmoes::register_ops() ? 0 : 1; }
