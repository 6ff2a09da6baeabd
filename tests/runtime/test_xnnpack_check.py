"""export/runtime/xnnpack.cpp: a .pte whose XNNPACK delegate payload was altered in place (its manifest size and sha256
rewritten to match, so only the program itself can refuse it) is refused before any method loads, with exit status
2 and one `error:` line naming the file and what is wrong: never a signal (issue #14).

Each case patches a few bytes of the micro bundle's experts.pte, found by walking the program and XNNPACK
flatbuffers here (field ids from executorch's schema/program.fbs and backends/xnnpack/serialization/schema.fbs)."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from cosmoes.artifacts import MANIFEST_NAME
from cosmoes.runtime.native import build_runner


class Flat:
    """Reads of a little-endian flatbuffer at `base` within `data` (positions returned are absolute)."""

    def __init__(self, data: bytes, base: int = 0):
        self.b, self.base = data, base

    def u(self, at: int, n: int) -> int:
        return int.from_bytes(self.b[at:at + n], "little")

    def field(self, table: int, fid: int) -> int:
        vtable = table - struct.unpack_from("<i", self.b, table)[0]
        if 4 + 2 * fid + 2 > self.u(vtable, 2):
            return 0
        off = self.u(vtable + 4 + 2 * fid, 2)
        return table + off if off else 0

    def follow(self, at: int) -> int:
        return at + self.u(at, 4)

    def root(self) -> int:
        return self.follow(self.base)

    def target(self, table: int, fid: int) -> int:
        at = self.field(table, fid)
        return self.follow(at) if at else 0

    def scalar(self, table: int, fid: int, n: int) -> int:
        at = self.field(table, fid)
        return self.u(at, n) if at else 0

    def tables(self, table: int, fid: int) -> list[int]:
        vec = self.target(table, fid)
        return [self.follow(vec + 4 + 4 * i) for i in range(self.u(vec, 4))] if vec else []


def first_graph(data: bytes) -> tuple[Flat, Flat, int]:
    """The program, the first XNNPACK delegate's graph and its payload's start."""
    program = Flat(data)
    root = program.root()
    segments = program.tables(root, 4)
    segment_base = struct.unpack_from("<Q", data, 24)[0]
    for plan in program.tables(root, 1):
        for delegate in program.tables(plan, 7):
            ref = program.target(delegate, 1)
            assert program.scalar(ref, 0, 1) == 1, "the exporter puts XNNPACK payloads in segments"
            start = segment_base + program.scalar(segments[program.scalar(ref, 1, 4)], 0, 8)
            assert data[start + 4:start + 8] == b"XH00"
            return program, Flat(data, start + struct.unpack_from("<I", data, start + 10)[0]), start
    raise AssertionError("no XNNPACK delegate in experts.pte")


def values(graph: Flat) -> list[int]:
    """Each value's XNNTensorValue table (the base tensor of a quantized one)."""
    out = []
    for v in graph.tables(graph.root(), 2):
        t = graph.target(v, 1)
        out.append(graph.target(t, 0) if graph.scalar(v, 0, 1) == 2 else t)
    return out


def first_constant(graph: Flat) -> int:
    return next(t for t in values(graph) if graph.scalar(t, 3, 4))


def put(data: bytearray, at: int, value: int, n: int = 4) -> None:
    assert at, "the field to patch is absent"
    data[at:at + n] = value.to_bytes(n, "little")


# -- the corruptions: each patches `data` in place and returns the phrase the refusal must contain ----------------

def dim_times_four(data: bytearray) -> str:
    _, g, _ = first_graph(bytes(data))
    t = first_constant(g)
    dims = g.target(t, 2)
    put(data, dims + 4, 4 * g.u(dims + 4, 4))
    return "bytes of constant data but its buffer holds"


def dim_huge(data: bytearray) -> str:
    _, g, _ = first_graph(bytes(data))
    put(data, g.target(first_constant(g), 2) + 4, 0x7FFFFFFF)
    return "(at most 16 GiB)"


def named_segment_shrunk(data: bytearray) -> str:
    """The named data segment the first constant's key points at, 4 bytes shorter in the program's segment table."""
    program, g, _ = first_graph(bytes(data))
    entry = g.tables(g.root(), 8)[g.scalar(first_constant(g), 3, 4)]
    key_at = g.target(entry, 2)
    key = bytes(data[key_at + 4:key_at + 4 + g.u(key_at, 4)])
    root = program.root()
    for named in program.tables(root, 7):
        k = program.target(named, 0)
        if bytes(data[k + 4:k + 4 + program.u(k, 4)]) == key:
            segment = program.tables(root, 4)[program.scalar(named, 1, 4)]
            put(data, program.field(segment, 1), program.scalar(segment, 1, 8) - 4, 8)
            return "bytes of constant data but its buffer holds"
    raise AssertionError("the constant's named key is not in the program's named data")


def constant_offset_past_end(data: bytearray) -> str:
    """The first constant's entry loses its named_key (its vtable slot zeroed): its offset, UINT64_MAX as the
    exporter writes it for named data, then points past the payload's constant data."""
    _, g, _ = first_graph(bytes(data))
    entry = g.tables(g.root(), 8)[g.scalar(first_constant(g), 3, 4)]
    vtable = entry - struct.unpack_from("<i", data, entry)[0]
    put(data, vtable + 4 + 2 * 2, 0, 2)
    return "bytes of constant data"


def node_writes_a_constant(data: bytearray) -> str:
    """The first fully-connected node's output id becomes its filter's."""
    _, g, _ = first_graph(bytes(data))
    for node in g.tables(g.root(), 1):
        if g.scalar(node, 0, 1) == 2:  # XNNFullyConnected: input1, filter, bias, output
            fc = g.target(node, 1)
            put(data, g.field(fc, 3), g.scalar(fc, 1, 4))
            return "a constant, input or other node's output"
    raise AssertionError("no fully-connected node")


def external_id_past_arguments(data: bytearray) -> str:
    _, g, _ = first_graph(bytes(data))
    # an external input or output whose id the exporter wrote (flatc leaves out an id of 0)
    external = next(t for t in values(g) if g.scalar(t, 5, 4) & 3 and g.field(t, 4))
    put(data, g.field(external, 4), 7)
    return "is external value 7"


def group_size_zero(data: bytearray) -> str:
    """A 4-bit blockwise weight's group size 0 (XNNCompiler divides by it)."""
    _, g, _ = first_graph(bytes(data))
    for v in g.tables(g.root(), 2):
        q = g.target(v, 1)
        if g.scalar(v, 0, 1) == 2 and g.scalar(q, 1, 1) == 4:  # XNNQuantizedTensorValue, PerChannelGroupQuant
            put(data, g.field(g.target(q, 2), 2), 0)
            return "blockwise quantization that does not fit"
    raise AssertionError("no blockwise-quantized value")


FP32_CASES = [dim_times_four, dim_huge, named_segment_shrunk, constant_offset_past_end, node_writes_a_constant,
              external_id_past_arguments]


@pytest.fixture(scope="module")
def runner():
    return build_runner()


def run_altered(runner, bundle: Path, tmp_path: Path, corrupt) -> tuple[subprocess.CompletedProcess, str]:
    """A copy of `bundle` whose experts.pte `corrupt` patched, the manifest's size and sha256 rewritten to match."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    entry = manifest["programs"]["experts"]
    path = copy / entry["file"]
    data = bytearray(path.read_bytes())
    expected = corrupt(data) if corrupt else ""
    path.write_bytes(data)
    entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    proc = subprocess.run([str(runner), str(copy), "--prompt-ids", "1,2,3,4", "--gen", "2", "--policy", "all"],
                          capture_output=True, text=True, timeout=120)
    return proc, expected


def assert_refused(proc: subprocess.CompletedProcess, expected: str) -> None:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr[-500:]}"
    assert len(errors) == 1, proc.stderr
    assert "experts.pte is a corrupt ExecuTorch program" in errors[0] and "XNNPACK" in errors[0], errors[0]
    assert expected in errors[0], errors[0]


def test_unaltered_copy_runs(runner, micro_bundle_fp32, tmp_path):
    proc, _ = run_altered(runner, micro_bundle_fp32, tmp_path, None)
    assert proc.returncode == 0, proc.stderr[-500:]


@pytest.mark.parametrize("corrupt", FP32_CASES, ids=lambda f: f.__name__)
def test_altered_payload_is_refused(runner, micro_bundle_fp32, tmp_path, corrupt):
    assert_refused(*run_altered(runner, micro_bundle_fp32, tmp_path, corrupt))


@pytest.mark.parametrize("corrupt", [group_size_zero, dim_times_four], ids=lambda f: f.__name__)
def test_altered_quantized_payload_is_refused(runner, micro_bundle_8da4w_xnnpack, tmp_path, corrupt):
    assert_refused(*run_altered(runner, micro_bundle_8da4w_xnnpack, tmp_path, corrupt))
