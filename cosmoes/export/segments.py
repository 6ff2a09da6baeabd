"""The packed expert file (experts.bin): each expert one int4 segment used in place by the runtimes (§3.4.2–3.4.3).

An expert is data, not a program. Its linears are packed at export time in the layout the runtimes' kernels read
(cosmoes/int4.py: int4 nibbles in panels of 16 rows, fp32 scales group-major), one segment per expert, page-aligned,
with its offset, size and sha256 in the manifest. A runtime maps the file and points the kernel at a segment: a
load is the page-ins of its bytes, an eviction gives the pages back, and nothing is copied or re-packed.

Segment layout (both runtimes derive it from the config and the group size; the manifest records offset and bytes):
matrices in the order of `expert_matrices`, each its nibbles (stored x padded/2 bytes, stored = rows rounded up to
16) then its scales (padded/group x stored fp32), every part starting at a multiple of PART_ALIGN bytes.
"""

from __future__ import annotations

import hashlib
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cosmoes.formats import INT4_CHUNK as CHUNK
from cosmoes.formats import INT4_PANEL as PANEL
from cosmoes.formats import int4_stored_rows as stored_rows

SEGMENT_FILE = "experts.bin"
LAYOUT = "int4"  # manifest expert_layout of a bundle whose experts are segments of SEGMENT_FILE
# Segment start: a page on every target (iPhones, and Android 15+ devices with 16 KB pages; 4 KB elsewhere, where a
# segment starts on 4 of them), so an expert's pages are its own and eviction gives back its bytes only.
ALIGNMENT = 16384
PART_ALIGN = 64  # a cache line: every matrix part starts on one


@dataclass(frozen=True)
class MatrixLayout:
    """One packed linear of an expert: out x in weights, input padded to a multiple of the group."""

    name: str
    rows: int  # out_features
    in_features: int
    padded: int
    group: int
    nibbles_at: int  # byte offset inside the segment
    scales_at: int

    @property
    def stored(self) -> int:
        return stored_rows(self.rows)

    @property
    def nibble_bytes(self) -> int:
        return self.stored * self.padded // 2

    @property
    def scale_bytes(self) -> int:
        return self.padded // self.group * self.stored * 4


def _up(n: int, to: int) -> int:
    return -(-n // to) * to


def expert_matrices(dim: int, ffn_dim: int, wd_rank: int | None, group: int) -> tuple[list[MatrixLayout], int]:
    """The matrices of one SwiGLU expert (w1, w3, w2; a weight-decomposed expert's .down then .up of each) and the
    segment's size in bytes."""
    shapes = [("w1", ffn_dim, dim), ("w3", ffn_dim, dim), ("w2", dim, ffn_dim)]
    if wd_rank:
        shapes = [part for name, out, inp in shapes
                  for part in ((f"{name}.down", wd_rank, inp), (f"{name}.up", out, wd_rank))]
    out, at = [], 0
    for name, rows, inp in shapes:
        padded = _up(inp, group)
        nibbles_at = _up(at, PART_ALIGN)
        scales_at = _up(nibbles_at + stored_rows(rows) * padded // 2, PART_ALIGN)
        m = MatrixLayout(name, rows, inp, padded, group, nibbles_at, scales_at)
        at = scales_at + m.scale_bytes
        out.append(m)
    return out, at


def layout_of(config: dict, group: int) -> tuple[list[MatrixLayout], int]:
    """`expert_matrices` for a manifest's config dict (ModelConfig fields)."""
    return expert_matrices(config["dim"], config["ffn_dim"], config.get("wd_rank"), group)


def _expert_linears(expert) -> list:
    """The expert's nn.Linear weights in `expert_matrices` order."""
    out = []
    for name in ("w1", "w3", "w2"):
        lin = getattr(expert, name)
        out += [lin.down, lin.up] if hasattr(lin, "down") else [lin]
    return out


def pack_expert(expert, layout: list[MatrixLayout], size: int) -> bytes:
    """One expert's segment: its linears quantised to int4 and laid out as `layout` says."""
    import torch

    from cosmoes.int4 import pack_linear

    buf = bytearray(size)
    for m, lin in zip(layout, _expert_linears(expert), strict=True):
        w = lin.weight.detach().float()
        if tuple(w.shape) != (m.rows, m.in_features):
            raise ValueError(f"expert matrix {m.name} is {tuple(w.shape)}, the layout says {(m.rows, m.in_features)}")
        p = pack_linear(w, m.group)
        nibbles = p.nibbles.contiguous().numpy().tobytes()
        scales = p.scales.to(torch.float32).contiguous().numpy().tobytes()
        buf[m.nibbles_at:m.nibbles_at + len(nibbles)] = nibbles
        buf[m.scales_at:m.scales_at + len(scales)] = scales
    return bytes(buf)


def write_segments(model, path: Path, group: int, progress=None) -> dict[int, dict[int, dict]]:
    """Write every MoE layer's experts to ``path``, page-aligned; {layer: {expert: {offset, bytes, sha256}}}."""
    cfg = model.config
    layout, size = expert_matrices(cfg.dim, cfg.ffn_dim, cfg.wd_rank, group)
    table: dict[int, dict[int, dict]] = {}
    with open(path, "wb") as f:
        for i, block in enumerate(model.layers):
            for e, expert in enumerate(block.feed_forward.experts):
                table.setdefault(i, {})[e] = _write_one(f, pack_expert(expert, layout, size))
            if progress:
                progress(f"packed layer {i} experts ({i + 1}/{cfg.n_layers})")
    return table


def _write_one(f: BinaryIO, segment: bytes) -> dict:
    offset = _up(f.tell(), ALIGNMENT)
    f.write(b"\0" * (offset - f.tell()))
    f.write(segment)
    return {"offset": offset, "bytes": len(segment), "sha256": hashlib.sha256(segment).hexdigest()}


class SegmentFile:
    """experts.bin mapped privately (copy-on-write, never written): an expert's matrices as tensor views in place."""

    def __init__(self, path: Path, config: dict, group: int):
        self.path = path
        self.layout, self.size = layout_of(config, group)
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if hasattr(mmap, "MADV_RANDOM"):
            self._map.madvise(mmap.MADV_RANDOM)  # an expert's pages, not a read-ahead window past it

    def expert(self, offset: int) -> list:
        """The expert at ``offset`` as PackedLinears viewing the mapped file (no copy)."""
        import torch

        from cosmoes.int4 import PackedLinear

        out = []
        for m in self.layout:
            nib = torch.frombuffer(self._map, dtype=torch.uint8, count=m.nibble_bytes, offset=offset + m.nibbles_at)
            sc = torch.frombuffer(self._map, dtype=torch.float32, count=m.scale_bytes // 4,
                                  offset=offset + m.scales_at)
            out.append(PackedLinear(nib.view(m.stored // PANEL, m.padded // CHUNK, PANEL, CHUNK // 2),
                                    sc.view(m.padded // m.group, m.stored), m.in_features, m.rows, m.group))
        return out

    def release(self, offset: int) -> None:
        """Give an evicted expert's pages back (the page cache keeps them for a warm reload)."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start, end = _up(offset, page), (offset + self.size) // page * page
        if end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)


def expert_ffn_from(matrices: list, wd: bool):
    """A callable running one expert over [x_ND] like an ExecuTorch method (returns [y_ND])."""
    from cosmoes.int4 import expert_ffn

    if wd:
        w1, w3, w2 = (tuple(matrices[i:i + 2]) for i in (0, 2, 4))
    else:
        w1, w3, w2 = matrices
    return lambda inputs: [expert_ffn(inputs[0], w1, w3, w2)]


__all__ = ["SEGMENT_FILE", "LAYOUT", "ALIGNMENT", "MatrixLayout", "expert_matrices", "layout_of", "pack_expert",
           "write_segments", "SegmentFile", "expert_ffn_from"]
