"""export/runtime/arena.cpp: the planned buffers (KV caches, activations) are reserved, not resident, at load, and
become resident as positions fill (issue #20). A bundle with a long context shows it: a short run touches a small
part of its arena, a long one most of its KV cache."""

from __future__ import annotations

import json
import shutil

import pytest

from cosmoes.runtime.native import build_runner, run_local
from tests.conftest import MICRO, MICRO_CHUNK

CONTEXT = 2048


@pytest.fixture(scope="module")
def long_context_bundle(micro_checkpoint, tmp_path_factory):
    from cosmoes.export.bundle import ExportConfig, export_bundle

    # the micro model declared as trained for CONTEXT positions (export refuses a context beyond training)
    work = tmp_path_factory.mktemp("arena")
    checkpoint = work / "checkpoint"
    shutil.copytree(micro_checkpoint, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps(config | {"max_position_embeddings": CONTEXT}))
    out = work / "micro-long"
    export_bundle(checkpoint, out, ExportConfig(target="host", quant="none", max_chunk=MICRO_CHUNK,
                                                max_seq_len=CONTEXT))
    return out


def _stats(bundle, tmp_path, prompt_len: int, gen: int) -> dict:
    build_runner()
    args = ["--policy", "swap", "--threads", "1", "--prompt-len", str(prompt_len), "--gen", str(gen)]
    return run_local(bundle, args, tmp_path / f"stats-{prompt_len}.json").stats


def test_arena_grows_with_the_positions_filled(long_context_bundle, tmp_path):
    kv_bytes = 2 * MICRO.n_layers * CONTEXT * MICRO.kv_heads * (MICRO.dim // MICRO.n_heads) * 4  # fp32 K and V
    short = _stats(long_context_bundle, tmp_path, 8, 8)
    long = _stats(long_context_bundle, tmp_path, 1500, 400)
    assert short["arena_mb"] == long["arena_mb"] >= kv_bytes / 1e6
    # 16 positions of 2048: a few pages per buffer, nowhere near the reserved KV cache
    assert short["arena_resident_mb"] < 0.25 * short["arena_mb"]
    # 1900 positions: most of the KV cache is now resident, and never more than was reserved
    assert long["arena_resident_mb"] - short["arena_resident_mb"] > 0.7 * kv_bytes / 1e6
    assert long["arena_resident_mb"] <= long["arena_mb"]
    # the statistics' kinds split the same pages: the KV caches grow with the positions, activations do not
    kv_short, kv_long = short["resident_mb"]["kv_cache"]["anon"], long["resident_mb"]["kv_cache"]["anon"]
    # (positions-major per head: 16 positions are one page per head of keys and of values)
    assert kv_short < 0.05 * kv_bytes / 1e6 and kv_long > 0.7 * kv_bytes / 1e6
    assert kv_long + long["resident_mb"]["activations"]["anon"] == pytest.approx(long["arena_resident_mb"], abs=0.01)
