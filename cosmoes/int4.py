"""int8-dynamic-activation x int4-grouped-weight linears: the experts' arithmetic, bit for bit what the native
kernels compute (export/runtime/int4.cpp), for export and the Python runtime (§3.4.2 offloaded experts).

Weights: per row and group of g columns (g a multiple of 32), scale s = amax / 7.5 and q = clamp(round(w / s), -8, 7),
stored as nibbles q + 8 in panels of 16 rows (rows padded with zeros to a multiple of 16): per panel, per chunk of 8
columns, 64 bytes, 4 per row, byte j of a row holding column j low and column j + 4 high. A SIMD lane is then one
row, and a broadcast of 4 activation bytes feeds every row at once (dpbusd, sdot by lane). fp32 scales are
group-major ([G, padded rows], 0 for the padding rows). Activations: per token, sa = amax / 127 and q = clamp(round(x / sa), -127, 127).
Output: acc = 0; for each group in order acc = acc + float(Σ qa·qw) * s (a rounded multiply, then a rounded add);
y = acc * sa. Fixing that order is what lets two implementations agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cosmoes.formats import INT4_CHUNK as CHUNK
from cosmoes.formats import INT4_PANEL as PANEL
from cosmoes.formats import int4_stored_rows as stored_rows

BLOCK = 32  # the group is a multiple of this


@dataclass
class PackedLinear:
    """An out x in linear packed as int4: nibbles uint8 [stored/16, padded/8, 16, 4] (stored = out rounded up to 16),
    scales fp32 [padded/group, stored]."""

    nibbles: torch.Tensor
    scales: torch.Tensor
    in_features: int
    out_features: int
    group: int

    @property
    def stored(self) -> int:
        return self.scales.shape[1]

    @property
    def padded(self) -> int:
        return self.nibbles.numel() * 2 // self.stored


def pack_linear(weight: torch.Tensor, group: int) -> PackedLinear:
    """Quantise an fp32 [out, in] weight to int4 groups of ``group`` columns (zero-padded to a multiple)."""
    if group % BLOCK or group <= 0:
        raise ValueError(f"group must be a positive multiple of {BLOCK}, got {group}")
    out, inp = weight.shape
    padded, stored = -(-inp // group) * group, stored_rows(out)
    w = torch.nn.functional.pad(weight.detach().float(), (0, padded - inp, 0, stored - out))
    w = w.view(stored, padded // group, group)
    scale = w.abs().amax(dim=2) / 7.5
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale[..., None] > 0, torch.round(w / safe[..., None]), torch.zeros_like(w)).clamp(-8, 7)
    # [panel, row, chunk, low/high, 4] -> bytes [panel, chunk, row, 4]
    u = (q.to(torch.int16) + 8).to(torch.uint8).view(stored // PANEL, PANEL, padded // CHUNK, 2, CHUNK // 2)
    nibbles = (u[:, :, :, 0] | (u[:, :, :, 1] << 4)).permute(0, 2, 1, 3)
    return PackedLinear(nibbles.contiguous(), scale.t().contiguous(), inp, out, group)


def weights_int(p: PackedLinear) -> torch.Tensor:
    """The signed int4 values [stored, padded] as int32 (the padding rows are -8 times a zero scale)."""
    b = p.nibbles.reshape(p.stored // PANEL, p.padded // CHUNK, PANEL, CHUNK // 2).to(torch.int32)
    rows = torch.stack([b & 0xF, b >> 4], dim=3).permute(0, 2, 1, 3, 4)  # [panel, row, chunk, low/high, 4]
    return rows.reshape(p.stored, p.padded) - 8


def unpack(p: PackedLinear) -> torch.Tensor:
    """The dequantised fp32 weight [out, in] (for measuring quantisation error)."""
    q = weights_int(p).view(p.stored, -1, p.group).float()
    return (q * p.scales.t()[..., None]).reshape(p.stored, p.padded)[:p.out_features, :p.in_features]


def quantize_activations(x_NK: torch.Tensor, padded: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 (as int32 [N, padded], zero beyond K) and the fp32 scales [N]."""
    x = x_NK.float()
    sa_N = x.abs().amax(dim=1) / 127
    safe = torch.where(sa_N > 0, sa_N, torch.ones_like(sa_N))
    q = torch.where(sa_N[:, None] > 0, torch.round(x / safe[:, None]), torch.zeros_like(x)).clamp(-127, 127)
    return torch.nn.functional.pad(q.to(torch.int32), (0, padded - x.shape[1])), sa_N


def linear(x_NK: torch.Tensor, p: PackedLinear) -> torch.Tensor:
    """y [N, out] = x Wᵀ through int8 x int4 group sums, accumulated in the fixed fp32 order."""
    if x_NK.shape[-1] != p.in_features:
        raise ValueError(f"input width {x_NK.shape[-1]} does not match the linear's {p.in_features}")
    qa, sa_N = quantize_activations(x_NK, p.padded)
    G = p.padded // p.group
    # exact integer group sums: float64 holds |Σ| < 2^24 exactly, and matmul is far faster than int32 reductions
    qa_NGg = qa.view(-1, G, p.group).double()
    qw_OGg = weights_int(p)[:p.out_features].view(p.out_features, G, p.group).double()
    isum_GNO = torch.einsum("ngk,ogk->gno", qa_NGg, qw_OGg).float()
    acc = torch.zeros(qa.shape[0], p.out_features)
    for g in range(G):
        acc = acc + isum_GNO[g] * p.scales[g, :p.out_features]
    return acc * sa_N[:, None]


def silu(v: torch.Tensor) -> torch.Tensor:
    """v / (1 + e^-v) computed in float64 and rounded once, so torch and the C library agree."""
    d = v.double()
    return (d / (1.0 + torch.exp(-d))).float()


def _project(x: torch.Tensor, w) -> torch.Tensor:
    if isinstance(w, tuple):  # weight-decomposed: down then up, the rank-r result re-quantised
        return linear(linear(x, w[0]), w[1])
    return linear(x, w)


def expert_ffn(x_ND: torch.Tensor, w1, w3, w2) -> torch.Tensor:
    """One SwiGLU expert: w2(silu(w1 x) * w3 x); each w a PackedLinear or a (down, up) pair of them."""
    return _project(silu(_project(x_ND, w1)) * _project(x_ND, w3), w2)


__all__ = ["PackedLinear", "pack_linear", "unpack", "weights_int", "quantize_activations", "linear", "silu",
           "expert_ffn", "stored_rows"]
