"""The constants of the files cosmoes writes and reads back (config.json, manifest.json), with no imports.

The lowest layer: the dataclasses (cosmoes.config, cosmoes.export.manifest), the schema that checks the files
(cosmoes.schema) and the runtimes all take these from here, so none of them needs another to know a format.
"""

# manifest.json: 2 = layers take RoPE tables + causal bias from a "context" method and attend over the used cache
# slots only; 3 = a "memory" section (KV bytes per position, the KV caches' planned buffer, the programs' memory
# plans) that the runtimes check against the programs and report resident memory by; 4 = "expert_layout": experts
# as int4 segments of experts.bin ("expert_file") used in place, or as XNNPACK methods of experts.pte; 5 = the int4
# nibbles in panels of 16 rows (one SIMD lane per row: no horizontal sums, prefill tiles of tokens)
FORMAT_NAME = "cosmoes-executorch-bundle"
FORMAT_VERSION = 8
# 6 = layers attend through the runtime's operator cosmoes::cached_attention, reading the KV caches in place, whose
# element type memory.kv_dtype names; 7 = layers and the head call the runtime's operators cosmoes::rms_norm and
# cosmoes::heads (one fused QKV projection split into heads, with RoPE); 8 = an MoE layer but the last also returns
# the next layer's router logits on its residual stream after attention (what a runtime prefetches by), routers are
# cosmoes::fp32_linear, and with int4 experts the backbone is lowered with no delegate
KV_DTYPES = {"fp32": 4, "fp16": 2}  # KV-cache element types and their bytes
EXPERT_LAYOUTS = ("none", "int4", "xnnpack")
# experts.bin int4 matrices (cosmoes/int4.py, export/runtime/int4.h): rows stored in panels of INT4_PANEL, each
# panel in slices of INT4_CHUNK columns (4 bytes per row)
INT4_PANEL = 16
INT4_CHUNK = 8


def int4_stored_rows(rows: int) -> int:
    """An int4 matrix's rows as stored: whole panels of the kernels."""
    return -(-rows // INT4_PANEL) * INT4_PANEL

# manifest.json: what a bundle may say it was exported for and with (cosmoes/export/recipes/ has one recipe per
# target; tests/export/test_bundle.py holds the two equal)
TARGETS = ("android", "host", "ios")
QUANT_MODES = ("none", "8da4w", "8da8w", "4w")
EMBEDDING_QUANT_MODES = ("none", "int8", "int4")
# XNNPACK's 4-bit kernels take groups that are multiples of 32 only (per-channel too: the partitioner asserts it).
MIN_GROUP = 32

MAX_THREADS = 1024  # the most threads any runtime is asked for (a recipe, a phone); 0 means one per core
MAX_SEQ_LEN = 1 << 20  # longest sequence (and KV cache) a config or bundle may declare

# config.json of a checkpoint: transformers-style field name -> ModelConfig field
HF_NAMES = {
    "vocab_size": "vocab_size", "hidden_size": "dim", "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "intermediate_size": "ffn_dim",
    "num_experts": "num_experts", "num_experts_per_tok": "top_k", "norm_topk_prob": "norm_topk_prob",
    "router_temperature": "router_temperature", "wd_rank": "wd_rank", "rms_norm_eps": "norm_eps",
    "rope_theta": "rope_theta", "max_position_embeddings": "max_seq_len", "tie_word_embeddings": "tie_embeddings",
    "preset_name": "name",
}
