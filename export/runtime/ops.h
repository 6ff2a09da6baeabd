// The project's graph operators as ExecuTorch kernels (cosmoes/ops.py defines them for export): attention over the
// KV cache in place (attention.h), int4 linears over the program's constant data (int4.h), and a layer's RMSNorm and
// head split with RoPE (layer_ops.h).
#pragma once

namespace cosmoes {

// Registers cosmoes::cached_attention.out, int4_linear.out, rms_norm.out and heads.out with ExecuTorch's kernel
// registry, once per process (the runtime does when it starts; the Python runtime through libcosmoes_ops's
// cosmoes_register_ops). False if the registry refused them.
bool register_ops();

}  // namespace cosmoes
