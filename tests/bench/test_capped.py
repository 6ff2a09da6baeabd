"""benchmarks/capped.py: the cap adds up from the bundle's own figures, and the ratio is taken against the fastest
llama.cpp configuration that survived the cap (the cgroup runs themselves need root and llama.cpp: run by hand)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from capped import default_cap, main, render  # noqa: E402

from cosmoes.export.bundle import inspect_bundle  # noqa: E402


def test_the_cap_is_swap_weights_plus_the_runs_kv_cache_plus_the_stated_overhead(micro_bundle_8da4w):
    info = inspect_bundle(micro_bundle_8da4w)
    cap, why = default_cap(micro_bundle_8da4w, 8, 48.0)
    assert cap == int(info["resident"]["swap"] + info["footprint"]["kv_cache"]["per_position"] * 8 + 48e6)
    assert "KV cache of 8 positions" in why and "runtime overhead 48 MB" in why
    assert cap < info["resident"]["swap"] + info["footprint"]["kv_cache"]["reserved"] + 48e6  # not max_seq_len's


def _row(system, cap, decode, error=None):
    return {"system": system, "cap": cap, "runs": 2, "failed": 2 if error else 0, "decode_tok_s": decode,
            "prefill_tok_s": None if error else 100.0, "peak_mb": None if error else 190.0,
            **({"error": error} if error else {})}


def test_the_ratio_is_against_the_fastest_llama_cpp_that_ran():
    rows = [_row("cosmoes", "capped", 90.0), _row("llama.cpp", "capped", None, "killed (out of memory under the cap)"),
            _row("llama.cpp mmap", "capped", 6.0), _row("cosmoes", "uncapped", 100.0),
            _row("llama.cpp", "uncapped", 250.0), _row("llama.cpp mmap", "uncapped", 160.0)]
    text = render(rows, "# header")
    assert "| cosmoes swap / best llama.cpp decode, capped (llama.cpp mmap) | 15.00 | >= 3.0 |" in text
    assert "| cosmoes swap / best llama.cpp decode, uncapped (llama.cpp) | 0.40 | - |" in text
    assert "| llama.cpp | capped | - | - | - | 2 (killed (out of memory under the cap)) |" in text


def test_no_llama_cpp_run_is_said_not_divided():
    rows = [_row("cosmoes", "capped", 90.0), _row("llama.cpp", "capped", None, "killed"),
            _row("llama.cpp mmap", "capped", None, "killed")]
    assert "| cosmoes swap / best llama.cpp decode, capped | - | no llama.cpp configuration ran |" in render(rows, "#")


def test_a_missing_input_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--bundle", str(tmp_path / "nope"), "--gguf", str(tmp_path / "x.gguf"), "--out", str(tmp_path)])
    assert str(e.value) == f"error: --bundle {tmp_path / 'nope'}: no such file or directory"
