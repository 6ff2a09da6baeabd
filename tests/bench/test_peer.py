"""benchmarks/peer.py: cosmoes rows come from the real runner, a llama.cpp that cannot run is a failed row with its
reason (the cosmoes rows stay), and the ratios divide only figures that exist. (llama.cpp itself is built and run
by hand: minutes of compiling.)"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from peer import gguf_bytes_per_token, main, ratios, render  # noqa: E402


def _row(system, threads, decode, prefill=100.0, rss=50.0, error=None):
    return {"system": system, "isa": "avx2", "threads": threads, "runs": 2, "failed": 2 if error else 0,
            "decode_tok_s": None if error else decode, "prefill_tok_s": None if error else prefill,
            "peak_rss_mb": None if error else rss, "roofline": None, "roofline_with_kv": None,
            **({"error": error} if error else {})}


def test_ratios_are_cosmoes_over_llama_cpp_and_two_threads_over_one():
    rows = [_row("cosmoes all", 1, 90.0, 300.0, 40.0), _row("llama.cpp", 1, 60.0, 150.0, 50.0),
            _row("cosmoes all", 2, 150.0, 500.0, 41.0), _row("llama.cpp", 2, 100.0, 250.0, 50.0)]
    got = {name: value for name, value, _ in ratios(rows)}
    assert got["cosmoes all / llama.cpp decode, avx2, 1 thread"] == pytest.approx(1.5)
    assert got["cosmoes all / llama.cpp prefill, avx2, 2 threads"] == pytest.approx(2.0)
    assert got["cosmoes all / llama.cpp peak RSS, avx2, 1 thread"] == pytest.approx(0.8)
    assert got["cosmoes all decode 2 / 1 threads, avx2"] == pytest.approx(150 / 90)
    assert got["llama.cpp decode 2 / 1 threads, avx2"] == pytest.approx(100 / 60)


def test_a_failed_llama_cpp_is_a_row_with_its_reason_and_no_ratio():
    rows = [_row("cosmoes all", 1, 90.0), _row("llama.cpp", 1, None, error="llama.cpp build: cmake configure failed")]
    text = render(rows, "# header")
    assert "| llama.cpp | avx2 | 1 | - | - | - | - | 2 (llama.cpp build: cmake configure failed) |" in text
    assert "| cosmoes all / llama.cpp decode, avx2, 1 thread | - | not measured |" in text
    assert "| cosmoes all | avx2 | 1 | 90.0 |" in text


def test_gguf_bytes_count_one_embedding_row_and_top_k_experts(micro_checkpoint, tmp_path):
    from gguf import GGUFReader
    from gguf_peer import write_gguf

    path = tmp_path / "m.gguf"
    write_gguf(str(micro_checkpoint), path)
    tensors = GGUFReader(path).tensors
    total = sum(int(t.n_bytes) for t in tensors)
    emb = next(t for t in tensors if t.name == "token_embd.weight")
    exps = sum(int(t.n_bytes) for t in tensors if "_exps." in t.name)
    per_token = gguf_bytes_per_token(path, 2, 8)
    assert per_token == pytest.approx(total - emb.n_bytes + emb.n_bytes / emb.shape[-1] - exps + exps * 2 / 8)


def test_one_run_writes_cosmoes_rows_beside_a_llama_cpp_that_did_not_run(micro_bundle_8da4w, tmp_path):
    out = tmp_path / "peer"
    main([str(micro_bundle_8da4w), "--threads", "1", "--threads", "2", "--rounds", "1", "--repeats", "1",
          "--prompt-len", "8", "--gen", "4", "--no-llamacpp", "--isa", "scalar", "--out", str(out)])
    report = json.loads((out / "peer.json").read_text())
    rows = {(r["system"], r["threads"]): r for r in report["rows"]}
    for t in (1, 2):
        assert rows[("cosmoes all", t)]["decode_tok_s"] > 0 and rows[("cosmoes all", t)]["failed"] == 0
        assert rows[("cosmoes all", t)]["kernels"] == "scalar"  # the cap reached the runner
        assert rows[("llama.cpp", t)]["failed"] == 1 and "--no-llamacpp" in rows[("llama.cpp", t)]["error"]
    assert (out / "peer.png").stat().st_size > 0 and "cosmoes against llama.cpp" in (out / "peer.md").read_text()


def test_a_childs_peak_rss_is_its_own_not_the_forked_parents():
    import numpy as np
    from llamacpp import _run_measured

    parent = np.ones(80_000_000)  # 640 MB resident here; ru_maxrss would hand it to the exec'd child
    code = "import time; b = bytearray(150_000_000); time.sleep(0.3)"
    rc, _, _, peak_mb = _run_measured([sys.executable, "-c", code], timeout=60)
    assert rc == 0 and 150 < peak_mb < 400 < parent.nbytes / 1e6
