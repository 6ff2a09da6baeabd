"""Split a CoSMoEs Transformer into exportable stages and quantise it for ExecuTorch (§3.4.2 expert offloading).

Every stage is an nn.Module that *shares* the model's submodules (no copies, no edits to cosmoes/model.py):
- EmbedStage:   ids (1, T) -> h (1, T, D)
- ContextStage: what every layer of one call shares, computed once per call: (positions_T (T,), positions_L (L,))
                -> (RoPE cos (T, d), sin (T, d), causal bias (T, L)); L = tokens in context after this call
- LayerStage:   attention over a static KV cache (mutable buffers, see StaticKVCache) + ffn_norm + router
                (h (1, T, D), cos, sin, bias (T, L)) -> (h after attention, ffn input, router logits (1, T, E)
                [, the next layer's router logits on h after attention (1, T, E): its experts foretold, to prefetch])
- ExpertStage:  one SwiGLU expert (or a dense layer's FFN), x (N, D) -> y (N, D); N = tokens routed to it
- HeadStage:    final norm + output projection, h (1, T, D) -> logits (1, T, V)
Routing (softmax(tau R) + top-k, Eq. 2) runs between calls in the runtime, so the exported graphs have no
data-dependent control flow and each expert is a method of its own that can be loaded and freed alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.export import Dim

from cosmoes.errors import CosmoesError
from cosmoes.formats import MIN_GROUP
from cosmoes.model import Transformer, rope_cos_sin
# (importing cosmoes.ops also defines the torch.ops.cosmoes operators the stages call)
from cosmoes.ops import Int4Linear, NativeLinear, NativeRMSNorm


class StaticKVCache(nn.Module):
    """One layer's KV cache for batch 1 as mutable buffers, positions-major per head: keys and values (H_kv, S, d),
    S = max_seq_len.

    Positions-major, so that memory grows with the context: the runtimes reserve the buffers and a page becomes
    resident when a position in it is first written (a transposed key cache (H_kv, d, S) had one row per head
    dimension, and its first position touched a page in every row: half of a 2048-position cache from the first
    token). The position update is an index_put that the reinplace pass turns into an in-place write. Buffer names
    carry the layer index because share_mutable_buffers identifies state by name across methods.
    """

    def __init__(self, layer_idx: int, kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.k_name, self.v_name = f"k_cache_{layer_idx}", f"v_cache_{layer_idx}"
        shape = (kv_heads, max_seq_len, head_dim)
        self.register_buffer(self.k_name, torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer(self.v_name, torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, k_1HTd: torch.Tensor, v_1HTd: torch.Tensor, L: int):
        """Write this call's keys/values at positions L-T..L-1; the whole caches (k_HSd, v_HSd), read in place by
        cosmoes::cached_attention over their first L slots."""
        T = k_1HTd.shape[2]
        positions_T = torch.arange(L - T, L, dtype=torch.long)
        k_HSd, v_HSd = getattr(self, self.k_name), getattr(self, self.v_name)
        # index_put_ itself, not `cache[:, positions] = ...`: Python's setitem drops the value's leading size-1
        # dims, so with one kv head (MQA) the traced values lose their head dim and ExecuTorch's index_put_ kernel,
        # which does not broadcast values of lower rank, fails an ET_CHECK.
        torch.ops.aten.index_put_(k_HSd, [None, positions_T], k_1HTd[0].to(k_HSd.dtype))
        torch.ops.aten.index_put_(v_HSd, [None, positions_T], v_1HTd[0].to(v_HSd.dtype))
        return k_HSd, v_HSd


def causal_bias(positions_T: torch.Tensor, positions_L: torch.Tensor) -> torch.Tensor:
    """(T, L) additive mask: 0 where the query at positions_T[t] may see the key at positions_L[l], else -inf."""
    return torch.zeros(positions_T.shape[0], positions_L.shape[0]).masked_fill(
        positions_L[None, :] > positions_T[:, None], float("-inf"))


class EmbedStage(nn.Module):
    def __init__(self, model: Transformer):
        super().__init__()
        self.tok_embeddings = model.tok_embeddings

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(ids_BT)


class ContextStage(nn.Module):
    """RoPE tables and the causal bias of one call, shared by all its layers (computing them in every layer costs
    ~20 % of a decode step's attention). positions_L's length is what tells the layers how much cache to read."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.head_dim, self.theta = model.config.head_dim, model.config.rope_theta

    def forward(self, positions_T: torch.Tensor, positions_L: torch.Tensor):
        cos_1Td, sin_1Td = rope_cos_sin(positions_T[None], self.head_dim, self.theta)
        return cos_1Td[0], sin_1Td[0], causal_bias(positions_T, positions_L)


class LayerStage(nn.Module):
    """Pre-norm attention (with its KV cache) and the router of one block; the FFN runs elsewhere.

    The norms, the split into heads and RoPE are the project's operators (cosmoes.ops), one call each, and a block
    that went through `fuse_qkv` projects queries, keys and values in one matrix. An MoE block that has a next one
    also applies that block's ffn_norm and router to its own residual stream after attention: the next layer's
    experts foretold one MoE FFN and one attention ahead of their use, so a runtime can start reading them
    (the residual stream changes little from one layer to the next; docs/export.md measures how often it is right).
    """

    def __init__(self, model: Transformer, layer_idx: int, kv_dtype: str = "fp32"):
        super().__init__()
        cfg = model.config
        block = model.layers[layer_idx]
        self.attention_norm, self.ffn_norm = NativeRMSNorm(block.attention_norm), NativeRMSNorm(block.ffn_norm)
        self.attention = block.attention
        self.heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.router = NativeLinear(block.feed_forward.router) if cfg.is_moe else None
        ahead = cfg.is_moe and layer_idx + 1 < cfg.n_layers
        nxt = model.layers[layer_idx + 1] if ahead else None
        self.ahead_norm = NativeRMSNorm(nxt.ffn_norm) if ahead else None
        self.ahead_router = NativeLinear(nxt.feed_forward.router) if ahead else None
        dtype = {"fp32": torch.float32, "fp16": torch.float16}[kv_dtype]
        self.cache = StaticKVCache(layer_idx, cfg.kv_heads, cfg.max_seq_len, cfg.head_dim, dtype)

    def project(self, x_1TD: torch.Tensor, cos_Td: torch.Tensor, sin_Td: torch.Tensor):
        """Queries (1, H, T, d) and keys (1, H_kv, T, d) rotated, values (1, H_kv, T, d)."""
        H, H_kv, d = self.heads, self.kv_heads, self.head_dim
        attn = self.attention
        if hasattr(attn, "wqkv"):
            qkv = attn.wqkv(x_1TD)
            q_in, k_in, v_in = (qkv, 0), (qkv, H * d), (qkv, (H + H_kv) * d)
        else:
            q_in, k_in, v_in = (attn.wq(x_1TD), 0), (attn.wk(x_1TD), 0), (attn.wv(x_1TD), 0)
        heads = torch.ops.cosmoes.heads
        return (heads(*q_in, H, d, cos_Td, sin_Td), heads(*k_in, H_kv, d, cos_Td, sin_Td), heads(*v_in, H_kv, d))

    def forward(self, h_1TD: torch.Tensor, cos_Td: torch.Tensor, sin_Td: torch.Tensor, bias_TL: torch.Tensor):
        q, k, v = self.project(self.attention_norm(h_1TD), cos_Td, sin_Td)
        L = bias_TL.shape[1]
        k_HSd, v_HSd = self.cache.update(k, v, L)
        # one call over the cache in place (the graph it replaces copied the used slots and ran in 8 partitions)
        h_1TD = h_1TD + self.attention.wo(torch.ops.cosmoes.cached_attention(q, k_HSd, v_HSd, L))
        x_1TD = self.ffn_norm(h_1TD)
        if self.router is None:
            return h_1TD, x_1TD
        if self.ahead_router is None:
            return h_1TD, x_1TD, self.router(x_1TD)
        return h_1TD, x_1TD, self.router(x_1TD), self.ahead_router(self.ahead_norm(h_1TD))


class ExpertStage(nn.Module):
    """One expert (or a dense FFN): the tokens the runtime gathered for it in, its output out."""

    def __init__(self, ffn: nn.Module):
        super().__init__()
        self.ffn = ffn

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.ffn(x_ND)


class HeadStage(nn.Module):
    def __init__(self, model: Transformer):
        super().__init__()
        self.norm, self.output = NativeRMSNorm(model.norm), model.output

    def forward(self, h_BTD: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h_BTD))


@dataclass
class Stage:
    """One method to export: its module, example inputs, torch.export dynamic shapes and where it goes."""

    name: str
    module: nn.Module
    example_inputs: tuple
    dynamic_shapes: tuple
    program: str  # "backbone" or "experts"
    kind: str  # embedding | attention | dense_ffn | head | expert (for the manifest's byte accounting)
    layer: int | None = None
    expert: int | None = None


def expert_method(layer: int, expert: int) -> str:
    return f"layer_{layer}_expert_{expert}"


def split_model(model: Transformer, max_chunk: int = 128, experts: bool = True, kv_dtype: str = "fp32") -> list[Stage]:
    """The model as a list of exportable stages; stages share (not copy) the model's weights.

    experts=False leaves the MoE experts out (they are packed as data segments instead, cosmoes.export.segments).

    max_chunk bounds the tokens per call: ExecuTorch plans activations for the upper bound of a dynamic
    dim, so T = max_seq_len would reserve T x S attention scores and T x vocab logits (1 GB for a phone
    model's head at 2048 tokens). The runtime feeds longer prompts in chunks.
    """
    cfg = model.config
    chunk = min(max_chunk, cfg.max_seq_len)
    # Prefill length is dynamic up to the chunk size; decode is the T=1 case of the same method.
    # The context length L (cache slots attended) is dynamic up to max_seq_len.
    T, N, L = Dim("T", min=1, max=chunk), Dim("N", min=1, max=chunk), Dim("L", min=1, max=cfg.max_seq_len)
    h, x = torch.zeros(1, 2, cfg.dim), torch.zeros(2, cfg.dim)
    # example L (3) below max_seq_len and above T (2): an example at a bound would specialise the export to it
    # (distinct tensors: torch.export would treat one tensor passed twice as one input)
    cos, sin, bias = torch.zeros(2, cfg.head_dim), torch.ones(2, cfg.head_dim), torch.zeros(2, 3)
    stages = [Stage("embed", EmbedStage(model), (torch.zeros(1, 2, dtype=torch.long),), ({1: T},), "backbone",
                    "embedding"),
              Stage("context", ContextStage(model), (torch.tensor([1, 2]), torch.arange(3)), ({0: T}, {0: L}),
                    "backbone", "attention")]  # its few RoPE constants count as attention bytes
    for i, block in enumerate(model.layers):
        stages.append(Stage(f"layer_{i}", LayerStage(model, i, kv_dtype), (h, cos, sin, bias),
                            ({1: T}, {0: T}, {0: T}, {0: T, 1: L}), "backbone", "attention", layer=i))
        if not cfg.is_moe:
            stages.append(Stage(f"layer_{i}_ffn", ExpertStage(block.feed_forward), (x,), ({0: N},), "backbone",
                                "dense_ffn", layer=i))
            continue
        for e, expert in enumerate(block.feed_forward.experts if experts else ()):
            stages.append(Stage(expert_method(i, e), ExpertStage(expert), (x,), ({0: N},), "experts", "expert",
                                layer=i, expert=e))
    stages.append(Stage("head", HeadStage(model), (h,), ({1: T},), "backbone", "head"))
    return stages


# -- quantisation (torchao; the configs ExecuTorch's own LLM export uses for XNNPACK) ---------------------------

# XNNPACK's 4-bit kernels take groups that are multiples of 32 only (per-channel included: the partitioner
# asserts it), so the candidates stop at 32; widths that no candidate divides are zero-padded (PaddedLinear).
GROUP_CANDIDATES = (256, 128, 64, MIN_GROUP)


@dataclass
class QuantReport:
    """What quantize_model did: the group size used, linears padded to it, and linears left in fp32 (routers)."""

    group_size: int | None
    padded_linears: dict[str, list[int]] = field(default_factory=dict)  # fqn -> [in_features, padded]
    fp32_linears: list[str] = field(default_factory=list)


class PaddedLinear(nn.Module):
    """A linear whose input width is zero-padded to a multiple of the quantisation group.

    Zero weight columns times zero input columns add nothing, so the output is unchanged in fp32; after
    4-bit quantisation the last group simply holds fewer real weights. The pad runs inside the XNNPACK
    delegate (static constant pad). Costs (padded - in) / in extra weight bytes, e.g. 432 -> 448: 3.7 %.
    """

    def __init__(self, linear: nn.Linear, padded_in: int):
        super().__init__()
        self.pad = padded_in - linear.in_features
        self.linear = nn.Linear(padded_in, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(nn.functional.pad(linear.weight, (0, self.pad)))
            if linear.bias is not None:
                self.linear.bias.copy_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(nn.functional.pad(x, (0, self.pad)))


def fuse_qkv(model: Transformer) -> None:
    """Replace (in place) each block's wq, wk, wv by one `wqkv` with their rows stacked: one projection per layer.

    Rows are quantised on their own (per group of columns), so the fused matrix holds the same numbers as the three.
    """
    for block in model.layers:
        attn = block.attention
        weight = torch.cat([attn.wq.weight, attn.wk.weight, attn.wv.weight])
        attn.wqkv = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            attn.wqkv.weight.copy_(weight)
        del attn.wq, attn.wk, attn.wv


def quantised_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears that linear quantisation touches: all but the routers (kept fp32, see quantize_model)."""
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, nn.Linear) and not fqn.endswith("router")}


def choose_group_size(model: nn.Module, preferred: int) -> int:
    """The largest of ``preferred`` and its smaller powers of two (down to 32) that divides every quantised width.

    4-bit group-wise quantisation needs in_features % group_size == 0 for each linear; one group size for the
    whole model keeps kernels and manifest simple. If none divides every width, 32 is used and the linears it
    does not divide are zero-padded (see `PaddedLinear`).
    """
    if preferred < MIN_GROUP or preferred % MIN_GROUP:
        raise CosmoesError(f"group size {preferred} is not supported by XNNPACK's 4-bit kernels: use a multiple of "
                           f"{MIN_GROUP} ({', '.join(map(str, reversed(GROUP_CANDIDATES)))})")
    widths = {m.in_features for m in quantised_linears(model).values()}
    for g in (c for c in (preferred, *GROUP_CANDIDATES) if c <= preferred):
        if all(w % g == 0 for w in widths):
            return g
    return MIN_GROUP


def pad_linears(model: nn.Module, group_size: int, skip_experts: bool = False) -> dict[str, list[int]]:
    """Replace (in place) every quantised linear whose width ``group_size`` does not divide by a PaddedLinear."""
    padded = {}
    for fqn, linear in quantised_linears(model).items():
        if skip_experts and _is_expert(fqn):
            continue
        if linear.in_features % group_size:
            width = -(-linear.in_features // group_size) * group_size
            parent_name, _, child = fqn.rpartition(".")
            setattr(model.get_submodule(parent_name), child, PaddedLinear(linear, width))
            padded[fqn] = [linear.in_features, width]
    return padded


def _linear_config(mode: str, group_size: int | None):
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    if mode == "8da4w":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))
    if mode == "8da8w":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    raise CosmoesError(f"unsupported linear quantisation {mode!r}")


def _embedding_config(mode: str, dim: int, group_size: int | None):
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    # Lowered (by ExecuTorch's quant fusion) to quantized_decomposed::embedding_byte / embedding_4bit.
    if mode == "int8":
        return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    if mode == "int4":
        grouped = group_size is not None and dim % group_size == 0
        granularity = PerGroup(group_size) if grouped else PerAxis(0)
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=granularity)
    raise CosmoesError(f"unsupported embedding quantisation {mode!r}")


def quantize_model(model: Transformer, mode: str, group_size: int | None = 32,
                   quant_embedding: str = "none", skip_experts: bool = False,
                   int4_backbone: bool = False) -> QuantReport:
    """Quantise the model in place for ExecuTorch/XNNPACK and report what was done.

    Routers stay fp32 (D x E, negligible in size) so expert selection follows the trained router rather than
    quantisation noise; embeddings stay fp32 unless ``quant_embedding`` is int8/int4. ``group_size`` is the
    preferred 8da4w group; the group used follows `choose_group_size`, and linears it does not divide are padded.
    skip_experts leaves the MoE experts' linears as they are (packed apart, cosmoes.export.segments).
    int4_backbone (8da4w) packs the attention projections and the output head for the experts' int4 kernel
    (cosmoes::int4_linear, used in place from the program's constants) instead of XNNPACK's: measured faster on the
    AVX2 host (docs/export.md).
    """
    from torchao.quantization import quantize_

    report = QuantReport(group_size=None)
    if mode == "8da4w":
        report.group_size = choose_group_size(model, group_size or 32)
        if int4_backbone:
            _pack_backbone_int4(model, report.group_size)
        report.padded_linears = pad_linears(model, report.group_size, skip_experts)
    if mode != "none":
        keep = (lambda m, fqn: _is_quantised_linear(m, fqn) and not _is_expert(fqn)) if skip_experts \
            else _is_quantised_linear
        quantize_(model, _linear_config(mode, report.group_size), filter_fn=keep)
        report.fp32_linears = [fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear)
                               and not _is_quantised_linear(m, fqn)]
    if quant_embedding != "none":
        cfg = _embedding_config(quant_embedding, model.config.dim, report.group_size or group_size)
        quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
    return report


def _pack_backbone_int4(model: Transformer, group: int) -> None:
    model.output = Int4Linear(model.output.weight, group)
    for block in model.layers:
        for name in ("wqkv", "wq", "wk", "wv", "wo"):
            if hasattr(block.attention, name):
                setattr(block.attention, name, Int4Linear(getattr(block.attention, name).weight, group))


def _is_quantised_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and not fqn.endswith("router")


def _is_expert(fqn: str) -> bool:
    return ".experts." in fqn


__all__ = ["StaticKVCache", "causal_bias", "ContextStage", "EmbedStage", "LayerStage", "ExpertStage", "HeadStage",
           "Stage", "expert_method", "split_model", "QuantReport", "PaddedLinear", "fuse_qkv", "quantised_linears",
           "choose_group_size", "pad_linears", "quantize_model"]
