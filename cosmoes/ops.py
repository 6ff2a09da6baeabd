"""The project's operators inside exported graphs (issue #21), each with a torch reference for export and eager use;
the runtimes run the native kernels (export/runtime/ops.cpp), registered with ExecuTorch under the same names.

`cosmoes::int4_linear(x, nibbles, scales, in_features, out_features, group)`: x (..., in) through an int4 matrix
packed as cosmoes.int4 packs it, used in place from the program's constant data; the reference is cosmoes.int4.linear,
whose bits the native kernels give.

`cosmoes::cached_attention(q, k_cache, v_cache, L)`: q (1, H, T, d) holds the queries of positions L-T..L-1,
k_cache / v_cache (H_kv, S, d) fp32 or fp16 hold positions 0..L-1 (this call's already written); query head h reads
kv head h // (H / H_kv). Out: softmax(q kᵀ / √d, causal) v as (1, T, H·d) fp32. Reading the caches in place is the
point: the graph it replaces copied the L used slots of both caches (slice_copy) and ran as several partitions.
"""

from __future__ import annotations

import math

import torch

from cosmoes import int4

_LIB = torch.library.Library("cosmoes", "FRAGMENT")
_LIB.define("int4_linear(Tensor x, Tensor nibbles, Tensor scales, int in_features, int out_features, int group) "
            "-> Tensor")
_LIB.define("int4_linear.out(Tensor x, Tensor nibbles, Tensor scales, int in_features, int out_features, int group, *, "
            "Tensor(a!) out) -> Tensor(a!)")


@torch.library.impl(_LIB, "int4_linear", "CompositeExplicitAutograd")
def _int4_linear(x, nibbles, scales, in_features, out_features, group):
    p = int4.PackedLinear(nibbles, scales, in_features, out_features, group)
    return int4.linear(x.reshape(-1, in_features), p).reshape(*x.shape[:-1], out_features)


@torch.library.impl(_LIB, "int4_linear.out", "CompositeExplicitAutograd")
def _int4_linear_out(x, nibbles, scales, in_features, out_features, group, *, out):
    out.copy_(_int4_linear(x, nibbles, scales, in_features, out_features, group))
    return out


@torch.library.register_fake("cosmoes::int4_linear")
def _int4_linear_fake(x, nibbles, scales, in_features, out_features, group):
    return x.new_empty(*x.shape[:-1], out_features, dtype=torch.float32)


@torch.library.register_fake("cosmoes::int4_linear.out")
def _int4_linear_out_fake(x, nibbles, scales, in_features, out_features, group, *, out):
    return out


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


_LIB.define("cached_attention(Tensor q, Tensor k_cache, Tensor v_cache, SymInt L) -> Tensor")
_LIB.define("cached_attention.out(Tensor q, Tensor k_cache, Tensor v_cache, SymInt L, *, Tensor(a!) out) "
            "-> Tensor(a!)")


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


@torch.library.impl(_LIB, "cached_attention.out", "CompositeExplicitAutograd")
def _cached_attention_out(q, k_cache, v_cache, L, *, out):
    out.copy_(_cached_attention(q, k_cache, v_cache, L))
    return out


@torch.library.register_fake("cosmoes::cached_attention")
def _cached_attention_fake(q, k_cache, v_cache, L):
    _check(q, k_cache, v_cache)
    return q.new_empty(1, q.shape[2], q.shape[1] * q.shape[3], dtype=torch.float32)


@torch.library.register_fake("cosmoes::cached_attention.out")
def _cached_attention_out_fake(q, k_cache, v_cache, L, *, out):
    return out


__all__ = ["Int4Linear", "cached_attention_reference"]
