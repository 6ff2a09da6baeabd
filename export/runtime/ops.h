// The project's graph operators as ExecuTorch kernels (cosmoes/ops.py defines them for export): attention over the
// KV cache in place (attention.h) and int4 linears over the program's constant data (int4.h).
#pragma once

namespace cosmoes {

// Registers cosmoes::cached_attention.out and cosmoes::int4_linear.out with ExecuTorch's kernel registry, once per
// process (the runtime does when it starts; the Python runtime through libcosmoes_ops's cosmoes_register_ops). False
// if the registry refused them.
bool register_ops();

}  // namespace cosmoes
