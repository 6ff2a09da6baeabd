"""cosmoes.runtime.native and the C++ runner in export/: the same tokens as the Python runtime for every policy, expert
traffic per policy, the memory budget, sampling, the statistics line and the bad-input paths."""

import json
import shutil
import subprocess

import pytest
import torch

from cosmoes.errors import CosmoesError
from cosmoes.artifacts import MANIFEST_NAME
from cosmoes.runtime.native import build_runner, generate_native, run_local
from cosmoes.runtime.python import BundleRuntime
from cosmoes.tokenizer import default_tokenizer

PROMPT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
          "must be in want of a wife.")


@pytest.fixture(scope="module")
def runner():
    return build_runner()


@pytest.fixture(scope="module")
def prompt_ids():
    ids = default_tokenizer()(PROMPT)["input_ids"]
    assert len(ids) > 16  # longer than the fixtures' max_chunk: prefill runs in several calls
    return ids


def _run(runner, bundle, *args):
    return subprocess.run([str(runner), str(bundle), *args], capture_output=True, text=True)


@pytest.mark.parametrize("policy", ["all", "swap", "lru:2", "lru:3"])
@pytest.mark.parametrize("bundle", ["micro_bundle_fp32", "micro_bundle_8da4w"])
def test_same_tokens_loads_and_exrep_as_python_runtime(runner, bundle, policy, prompt_ids, request):
    path = request.getfixturevalue(bundle)
    py = BundleRuntime(path, policy=policy, threads=1)
    expected = py.generate(prompt_ids, 24)
    native = generate_native(path, prompt_ids, 24, policy=policy, threads=1)
    assert native.tokens == expected
    assert native.stats["expert_loads"] == py.stats.loads
    assert native.stats["expert_evictions"] == py.stats.evictions
    assert native.stats["exrep_per_layer"] == pytest.approx(py.stats.exrep(), abs=1e-6)


def test_policies_bound_resident_experts(runner, micro_bundle_8da4w, prompt_ids):
    stats = {p: generate_native(micro_bundle_8da4w, prompt_ids, 16, policy=p).stats for p in ("all", "swap", "lru:3")}
    layers, experts = 2, 4
    assert stats["all"]["expert_evictions"] == 0 and stats["all"]["expert_loads"] <= layers * experts
    assert stats["lru:3"]["expert_resident_peak"] <= 3 * layers
    assert stats["swap"]["expert_loads"] > stats["all"]["expert_loads"] < stats["lru:3"]["expert_loads"]
    # swap keeps the current token's experts, plus the one a prefill chunk is running: at most k + 1 per layer
    assert stats["swap"]["expert_evictions"] > 0 and stats["swap"]["expert_resident_peak"] <= (2 + 1) * layers


def test_budget_picks_the_cache_size_and_names_the_minimum(runner, micro_bundle_8da4w, prompt_ids, tmp_path):
    manifest = json.loads((micro_bundle_8da4w / MANIFEST_NAME).read_text())
    non_expert = sum(manifest["non_expert_bytes"].values())
    expert = max(e["bytes"] for lay in manifest["experts"].values() for e in lay.values())
    ids = ",".join(map(str, prompt_ids))
    budget = (non_expert + 3 * 2 * expert) / 1e6  # room for three experts in each of the two layers
    res = run_local(micro_bundle_8da4w, ["--budget-mb", f"{budget + 1e-4}", "--prompt-ids", ids, "--gen", "4"],
                    tmp_path / "s.json")
    assert res.stats["policy"] == "lru:3"
    too_small = (non_expert + 2 * 2 * expert) / 1e6 - 0.001
    proc = _run(runner, micro_bundle_8da4w, "--budget-mb", f"{too_small}", "--prompt-ids", ids)
    assert proc.returncode == 2
    minimum = (non_expert + 2 * 2 * expert) / 1e6
    assert f"minimum of {minimum:.1f} MB" in proc.stderr and proc.stderr.count("\n") == 1


def test_sampling_is_seeded(runner, micro_bundle_8da4w, prompt_ids):
    a, b, c = (generate_native(micro_bundle_8da4w, prompt_ids, 16, temperature=1.0, top_p=0.9, seed=s).tokens
               for s in (1, 1, 2))
    assert a == b and a != c
    assert all(0 <= t < 8192 for t in a + c)


def test_sampled_tokens_stay_in_the_nucleus(runner, micro_bundle_8da4w, prompt_ids):
    from cosmoes.runtime.python import BundleRuntime

    probs = torch.softmax(BundleRuntime(micro_bundle_8da4w, policy="all").prefill(prompt_ids).double(), -1)
    ranked = torch.argsort(probs, descending=True)
    size = int((torch.cumsum(probs[ranked], 0) < 0.3).sum()) + 1  # the fewest tokens holding 30 % of the mass
    nucleus = set(ranked[:size].tolist())
    firsts = {generate_native(micro_bundle_8da4w, prompt_ids, 1, temperature=1.0, top_p=0.3, seed=s).tokens[0]
              for s in range(12)}
    assert firsts <= nucleus and len(firsts) > 1 < size
    greedy = generate_native(micro_bundle_8da4w, prompt_ids, 6).tokens
    assert generate_native(micro_bundle_8da4w, prompt_ids, 6, temperature=1.0, top_p=1e-9, seed=5).tokens == greedy


def test_statistics_line(runner, micro_bundle_8da4w, prompt_ids, tmp_path):
    args = ["--policy", "swap", "--prompt-ids", ",".join(map(str, prompt_ids)), "--gen", "8", "--warmup", "1",
            "--repeats", "2", "--probe"]
    s = run_local(micro_bundle_8da4w, args, tmp_path / "stats.json").stats
    assert s["policy"] == "swap" and s["threads"] >= 1 and s["generated_tokens"] == 8 == len(s["tokens"])
    assert s["prompt_tokens"] == len(prompt_ids) and len(s["decode_tok_s_runs"]) == 2
    assert 0 < s["rss_after_load_mb"] <= s["peak_rss_mb"]
    assert s["decode_tok_s"] > 0 and s["prefill_tok_s"] > 0 and s["ttft_ms"] > 0 and s["model_load_ms"] > 0
    assert s["expert_loads"] > 0 and s["expert_load_ms"] > 0 and len(s["exrep_per_layer"]) == 2
    assert s["mem_read_gb_s"] > 0 and s["file_read_mb_s"] > 0 and s["expert_read_ms"] > 0


def _copy(bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


@pytest.mark.parametrize("damage, message", [
    ("flip", "is corrupt (sha256 differs from the manifest)"),
    ("truncate", "(truncated or replaced)"),
    ("missing", "bundle file missing"),
    ("manifest", "corrupt bundle manifest"),
    ("version", "is newer than this runtime supports"),
    ("old-version", "is older than this runtime supports (2): re-export it"),
])
def test_damaged_bundles_are_one_line_errors(runner, micro_bundle_8da4w, tmp_path, damage, message):
    bundle = _copy(micro_bundle_8da4w, tmp_path)
    experts = bundle / "experts.pte"
    if damage == "flip":
        data = bytearray(experts.read_bytes())
        data[len(data) // 2] ^= 0xFF
        experts.write_bytes(bytes(data))
    elif damage == "truncate":
        experts.write_bytes(experts.read_bytes()[:1000])
    elif damage == "missing":
        experts.unlink()
    elif damage == "manifest":
        (bundle / MANIFEST_NAME).write_text('{"format": "cosmoes-executorch-bundle", "format_version": 1,')
    else:
        m = json.loads((bundle / MANIFEST_NAME).read_text())
        m["format_version"] = 99 if damage == "version" else 1
        (bundle / MANIFEST_NAME).write_text(json.dumps(m))
    proc = _run(runner, bundle, "--prompt-ids", "1,2,3")
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["--policy", "lru:1", "--prompt-ids", "1"], "lru needs N >= top_k = 2"),
    (["--policy", "fifo", "--prompt-ids", "1"], "unknown expert cache policy 'fifo'"),
    (["--prompt-ids", "1,99999"], "token id 99999 outside [0, 8192)"),
    (["--prompt-len", "60", "--gen", "10"], "exceed the bundle's max_seq_len 64"),
    (["--gen", "x"], "--gen expects an integer"),
])
def test_bad_options_are_one_line_errors(runner, micro_bundle_8da4w, args, message):
    proc = _run(runner, micro_bundle_8da4w, *args)
    assert proc.returncode == 2 and message in proc.stderr


def test_missing_bundle_through_python(runner, tmp_path):
    with pytest.raises(CosmoesError, match="bundle not found"):
        generate_native(tmp_path / "nope", [1, 2], 4)
