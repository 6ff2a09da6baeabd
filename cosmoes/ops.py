"""The project's operators inside exported graphs (issue #21), each with a torch reference for export and eager use;
the runtimes run the native kernels (export/runtime/ops.cpp), registered with ExecuTorch under the same names.

`cosmoes::int4_linear(x, nibbles, scales, in_features, out_features, group)`: x (..., in) through an int4 matrix
packed as cosmoes.int4 packs it, used in place from the program's constant data; the reference is cosmoes.int4.linear,
whose bits the native kernels give.

`cosmoes::cached_attention(q, k_cache, v_cache, L)`: q (1, H, T, d) holds the queries of positions L-T..L-1,
k_cache / v_cache (H_kv, S, d) fp32 or fp16 hold positions 0..L-1 (this call's already written); query head h reads
kv head h // (H / H_kv). Out: softmax(q kᵀ / √d, causal) v as (1, T, H·d) fp32. Reading the caches in place is the
point: the graph it replaces copied the L used slots of both caches (slice_copy) and ran as several partitions.

`cosmoes::rms_norm(x, weight, eps)`: the model's RMSNorm over the last dim, fp32. `cosmoes::heads(x, start, heads,
head_dim, cos, sin)`: columns start .. start + heads·head_dim of x (1, T, F) as (1, heads, T, head_dim), RoPE applied
(rotate-half, the model's apply_rope) when cos / sin (T, head_dim) are given; it splits one fused QKV projection into
queries, keys and values. Each replaces a run of small element-wise ops that lowered to several XNNPACK partitions
and portable kernels per layer (a third of a wearable layer's decode time was their per-call cost, issue #21).

`cosmoes::fp32_linear(x, weight)`: x (..., in) @ weight (out, in)ᵀ in fp32, the products summed in double: the
routers (and the next layer's router a layer computes for prefetch), so that an int4 bundle's layers need no XNNPACK
at all and both runtimes, which run this one kernel, pick the same experts.
"""

from __future__ import annotations

import math

import torch

from cosmoes import int4

_LIB = torch.library.Library("cosmoes", "FRAGMENT")


def _out_variant(name: str, args: str, functional) -> None:
    """cosmoes::<name>.out(<args>, *, out): the form ExecuTorch's lowering calls and the runtimes' kernels implement;
    in torch it writes the functional op's result into out."""
    _LIB.define(f"{name}.out({args}, *, Tensor(a!) out) -> Tensor(a!)")

    def out_impl(*a, out, **kw):
        out.copy_(functional(*a, **kw))
        return out

    torch.library.impl(_LIB, f"{name}.out", "CompositeExplicitAutograd")(out_impl)
    torch.library.register_fake(f"cosmoes::{name}.out")(lambda *a, out, **kw: out)


_INT4_LINEAR = "Tensor x, Tensor nibbles, Tensor scales, int in_features, int out_features, int group"
_LIB.define(f"int4_linear({_INT4_LINEAR}) -> Tensor")


@torch.library.impl(_LIB, "int4_linear", "CompositeExplicitAutograd")
def _int4_linear(x, nibbles, scales, in_features, out_features, group):
    p = int4.PackedLinear(nibbles, scales, in_features, out_features, group)
    return int4.linear(x.reshape(-1, in_features), p).reshape(*x.shape[:-1], out_features)


@torch.library.register_fake("cosmoes::int4_linear")
def _int4_linear_fake(x, nibbles, scales, in_features, out_features, group):
    return x.new_empty(*x.shape[:-1], out_features, dtype=torch.float32)


_out_variant("int4_linear", _INT4_LINEAR, _int4_linear)


class Int4Linear(torch.nn.Module):
    """A linear as cosmoes::int4_linear over its packed weights (constants of the exported program)."""

    def __init__(self, weight: torch.Tensor, group: int):
        super().__init__()
        p = int4.pack_linear(weight, group)
        self.in_features, self.out_features, self.group = p.in_features, p.out_features, p.group
        self.register_buffer("nibbles", p.nibbles)
        self.register_buffer("scales", p.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.cosmoes.int4_linear(x, self.nibbles, self.scales, self.in_features, self.out_features,
                                             self.group)


_CACHED_ATTENTION = "Tensor q, Tensor k_cache, Tensor v_cache, SymInt L"
_LIB.define(f"cached_attention({_CACHED_ATTENTION}) -> Tensor")


def cached_attention_reference(q_1HTd: torch.Tensor, k_HSd: torch.Tensor, v_HSd: torch.Tensor,
                               L: int) -> torch.Tensor:
    """The operator's maths in torch (fp32 throughout; an fp16 cache is widened first)."""
    _, H, T, d = q_1HTd.shape
    kv = k_HSd.shape[0]
    k_HLd, v_HLd = k_HSd[:, :L].float(), v_HSd[:, :L].float()
    q_GNd = q_1HTd.float().reshape(kv, (H // kv) * T, d) * (1.0 / math.sqrt(d))
    positions_T = torch.arange(L - T, L)
    bias_TL = torch.zeros(T, L).masked_fill(torch.arange(L)[None, :] > positions_T[:, None], float("-inf"))
    scores = (torch.bmm(q_GNd, k_HLd.transpose(1, 2)).view(kv, H // kv, T, L) + bias_TL).view(kv, -1, L)
    out_GNd = torch.bmm(torch.softmax(scores, dim=-1), v_HLd)
    return out_GNd.view(kv, H // kv, T, d).permute(2, 0, 1, 3).reshape(1, T, H * d)


def _check(q, k_cache, v_cache) -> None:
    torch._check(q.dim() == 4 and k_cache.dim() == 3 and k_cache.shape == v_cache.shape)
    torch._check(q.shape[1] % k_cache.shape[0] == 0)


@torch.library.impl(_LIB, "cached_attention", "CompositeExplicitAutograd")
def _cached_attention(q, k_cache, v_cache, L):
    _check(q, k_cache, v_cache)
    return cached_attention_reference(q, k_cache, v_cache, L)


@torch.library.register_fake("cosmoes::cached_attention")
def _cached_attention_fake(q, k_cache, v_cache, L):
    _check(q, k_cache, v_cache)
    return q.new_empty(1, q.shape[2], q.shape[1] * q.shape[3], dtype=torch.float32)


_out_variant("cached_attention", _CACHED_ATTENTION, _cached_attention)


_RMS_NORM = "Tensor x, Tensor weight, float eps"
_LIB.define(f"rms_norm({_RMS_NORM}) -> Tensor")


@torch.library.impl(_LIB, "rms_norm", "CompositeExplicitAutograd")
def _rms_norm(x, weight, eps):
    from cosmoes.model import rms_norm

    torch._check(weight.dim() == 1 and x.shape[-1] == weight.shape[0])
    return rms_norm(x.float(), weight, eps)


@torch.library.register_fake("cosmoes::rms_norm")
def _rms_norm_fake(x, weight, eps):
    torch._check(weight.dim() == 1 and x.shape[-1] == weight.shape[0])
    return x.new_empty(x.shape, dtype=torch.float32)


_out_variant("rms_norm", _RMS_NORM, _rms_norm)


_HEADS = "Tensor x, int start, int heads, int head_dim, Tensor? cos=None, Tensor? sin=None"
_LIB.define(f"heads({_HEADS}) -> Tensor")


def heads_reference(x_1TF: torch.Tensor, start: int, heads: int, head_dim: int, cos_Td: torch.Tensor | None = None,
                    sin_Td: torch.Tensor | None = None) -> torch.Tensor:
    """Columns start .. start + heads * head_dim of x as (1, heads, T, head_dim), rotated when cos / sin are given."""
    from cosmoes.model import apply_rope

    B, T, _ = x_1TF.shape
    x_1HTd = x_1TF[..., start:start + heads * head_dim].reshape(B, T, heads, head_dim).transpose(1, 2)
    if cos_Td is None:
        return x_1HTd.contiguous()
    return apply_rope(x_1HTd, cos_Td[None], sin_Td[None])


def _check_heads(x, start, heads, head_dim, cos, sin) -> None:
    torch._check(x.dim() == 3 and x.shape[0] == 1 and heads >= 1 and head_dim >= 1 and start >= 0)
    torch._check(start + heads * head_dim <= x.shape[2])
    torch._check((cos is None) == (sin is None))
    if cos is not None:
        torch._check(head_dim % 2 == 0 and cos.shape == sin.shape and cos.dim() == 2)
        torch._check(cos.shape[0] == x.shape[1] and cos.shape[1] == head_dim)


@torch.library.impl(_LIB, "heads", "CompositeExplicitAutograd")
def _heads(x, start, heads, head_dim, cos=None, sin=None):
    _check_heads(x, start, heads, head_dim, cos, sin)
    return heads_reference(x, start, heads, head_dim, cos, sin)


@torch.library.register_fake("cosmoes::heads")
def _heads_fake(x, start, heads, head_dim, cos=None, sin=None):
    _check_heads(x, start, heads, head_dim, cos, sin)
    return x.new_empty(1, heads, x.shape[1], head_dim, dtype=torch.float32)


_out_variant("heads", _HEADS, _heads)


_FP32_LINEAR = "Tensor x, Tensor weight"
_LIB.define(f"fp32_linear({_FP32_LINEAR}) -> Tensor")


def _check_fp32_linear(x, weight) -> None:
    torch._check(weight.dim() == 2 and x.dim() >= 1 and x.shape[-1] == weight.shape[1])


@torch.library.impl(_LIB, "fp32_linear", "CompositeExplicitAutograd")
def _fp32_linear(x, weight):
    _check_fp32_linear(x, weight)
    return (x.double() @ weight.double().T).float()


@torch.library.register_fake("cosmoes::fp32_linear")
def _fp32_linear_fake(x, weight):
    _check_fp32_linear(x, weight)
    return x.new_empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32)


_out_variant("fp32_linear", _FP32_LINEAR, _fp32_linear)


class NativeLinear(torch.nn.Module):
    """A bias-free fp32 linear (a router) as cosmoes::fp32_linear, sharing the linear's weight."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.cosmoes.fp32_linear(x, self.weight)


class NativeRMSNorm(torch.nn.Module):
    """An RMSNorm as cosmoes::rms_norm, sharing the norm's weight."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.cosmoes.rms_norm(x, self.weight, self.eps)


__all__ = ["Int4Linear", "NativeLinear", "NativeRMSNorm", "cached_attention_reference", "heads_reference"]
