"""The project's operators inside exported graphs: attention over the used slots of a static KV cache in one call
(issue #21), with a torch reference for export and eager use; the runtimes run the native kernel
(export/runtime/attention.cpp), registered with ExecuTorch under the same name.

`cosmoes::cached_attention(q, k_cache, v_cache, L)`: q (1, H, T, d) holds the queries of positions L-T..L-1,
k_cache / v_cache (H_kv, S, d) fp32 or fp16 hold positions 0..L-1 (this call's already written); query head h reads
kv head h // (H / H_kv). Out: softmax(q kᵀ / √d, causal) v as (1, T, H·d) fp32. Reading the caches in place is the
point: the graph it replaces copied the L used slots of both caches (slice_copy) and ran as several partitions.
"""

from __future__ import annotations

import math

import torch

_LIB = torch.library.Library("cosmoes", "FRAGMENT")
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


__all__ = ["cached_attention_reference"]
