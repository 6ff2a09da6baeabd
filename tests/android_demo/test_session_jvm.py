"""The Android library module on the host JVM: the Kotlin CosmoesSession and BenchRun over the JNI shim and the real
libcosmoes give the Python runtime's and the runner's tokens and text, the library's own error lines, a stop on
cancel, and the statistics `cosmoes bench` reads. (Android itself cannot run here; the module has no android.*
imports, so the code tested is the code the app ships.)"""

import json
import shutil

import pytest

from cosmoes.bench.harness import bench_prompt, derived
from cosmoes.errors import CosmoesError
from cosmoes.export.manifest import load_manifest
from cosmoes.runtime.capi import NativeSession
from cosmoes.runtime.native import generate_native
from cosmoes.runtime.python import BundleRuntime
from cosmoes.tokenizer import default_tokenizer
from tests.android_demo.jvm import build_or_skip

PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
DRIVER = "org.cosmoes.testing.SessionDriverKt"
BENCH = "org.cosmoes.testing.FakeBenchActivityKt"
# what `cosmoes bench` reads from a run's statistics (its table's columns and harness.derived)
BENCH_KEYS = {"policy", "decode_tok_s", "ttft_ms", "prefill_tok_s", "peak_rss_mb", "expert_loads",
              "expert_loads_decode", "expert_load_ms_mean", "expert_evict_ms_mean", "exrep_mean", "active_expert_mb",
              "prompt_tokens", "generated_tokens", "arena_mb", "rss_baseline_mb", "tokens", "threads"}


@pytest.fixture(scope="module")
def jvm():
    return build_or_skip()


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


def drive(jvm, *args) -> dict:
    proc = jvm.java(DRIVER, *map(str, args))
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


@pytest.mark.parametrize("policy", ["all", "swap"])
def test_kotlin_session_gives_the_python_runtimes_tokens_and_text(jvm, tokenizer, micro_bundle_8da4w, policy):
    prompt = PROMPT + " 🙂"  # a 4-byte character crosses the JNI boundary as UTF-8, not modified UTF-8
    ids = BundleRuntime(micro_bundle_8da4w, policy=policy, threads=1).generate(
        tokenizer(prompt)["input_ids"], 24, eos_id=tokenizer.eos_token_id)
    got = drive(jvm, "generate", micro_bundle_8da4w, policy, 24, prompt)
    assert got["stats"]["tokens"] == [i for i in ids if i != tokenizer.eos_token_id]
    assert "".join(got["pieces"]) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all(got["pieces"])  # "" pieces (a character still in progress) are not streamed
    assert got["stats"]["policy"] == policy and got["stats"]["resident_per_layer"]


@pytest.mark.parametrize("policy", ["all", "swap"])
def test_generate_ids_gives_the_runners_tokens(jvm, tokenizer, micro_bundle_8da4w, policy):
    prompt = tokenizer(PROMPT)["input_ids"]
    runner = generate_native(micro_bundle_8da4w, prompt, 30, policy=policy)
    got = drive(jvm, "ids", micro_bundle_8da4w, policy, 30, ",".join(map(str, prompt)))
    assert got["ids"] == runner.tokens == got["stats"]["tokens"]
    assert got["stats"]["expert_loads"] == runner.stats["expert_loads"]
    assert got["stats"]["resident_per_layer"] == runner.stats["resident_per_layer"]
    config = load_manifest(micro_bundle_8da4w).config  # all keeps every expert, swap the last token's top_k
    per_layer = config["num_experts"] if policy == "all" else config["top_k"]
    assert got["stats"]["resident_per_layer"] == [per_layer] * config["n_layers"]


def _library_error(bundle, **options) -> str:
    with pytest.raises(CosmoesError) as caught:
        NativeSession(bundle, **options)
    return str(caught.value)


def test_missing_and_corrupt_bundles_raise_the_librarys_line(jvm, micro_bundle_8da4w, tmp_path):
    missing = tmp_path / "nowhere 🙂"  # the message names the path: 4-byte characters come back intact
    got = drive(jvm, "open", missing)
    assert got == {"error": _library_error(missing), "status": 2} and "🙂" in got["error"]
    broken = tmp_path / "broken"
    shutil.copytree(micro_bundle_8da4w, broken)
    manifest = broken / "manifest.json"
    manifest.write_text(manifest.read_text()[:200])  # cut mid-object
    got = drive(jvm, "open", broken)
    assert got == {"error": _library_error(broken), "status": 2} and "manifest.json" in got["error"]
    got = drive(jvm, "open", micro_bundle_8da4w, "fifo")  # an option the library refuses: status 1
    assert got == {"error": _library_error(micro_bundle_8da4w, policy="fifo"), "status": 1}


def test_cancelling_the_flow_stops_generation(jvm, tokenizer, micro_bundle_8da4w):
    got = drive(jvm, "cancel", micro_bundle_8da4w, "swap", 40, PROMPT)
    # the rendezvous hands the first piece over, then the next token's send fails: generation ends there
    assert 1 <= len(got["cancelled_tokens"]) <= 3 < 40
    assert tokenizer.decode(got["cancelled_tokens"], skip_special_tokens=True).startswith(got["first"])
    # the session is intact: the same prompt again, to the end this time
    full = BundleRuntime(micro_bundle_8da4w, policy="swap", threads=1).generate(
        tokenizer(PROMPT)["input_ids"], 40, eos_id=tokenizer.eos_token_id)
    assert "".join(got["again"]) == tokenizer.decode(full, skip_special_tokens=True)
    assert got["again"][0] == got["first"]
    assert got["after_close"] == {"error": "the session is closed", "status": 5}


def test_bench_run_writes_the_statistics_cosmoes_bench_reads(jvm, micro_bundle_8da4w, tmp_path):
    manifest = load_manifest(micro_bundle_8da4w)
    prompt = bench_prompt(micro_bundle_8da4w, manifest, 20)
    (tmp_path / "prompt.txt").write_text(" ".join(map(str, prompt)) + "\n")  # as `cosmoes bench` writes it
    stats_path = tmp_path / "out" / "stats.json"
    proc = jvm.java(BENCH, f"bundle={micro_bundle_8da4w}", f"prompt={tmp_path / 'prompt.txt'}",
                    f"stats={stats_path}", "policy=swap", "threads=1", "gen=12", "warmup=1", "repeats=3")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    stats = json.loads(stats_path.read_text())
    assert BENCH_KEYS <= stats.keys() and stats["client"] == "android-app" and stats["prompt_kind"] == "ids"
    assert stats["device"]["kind"] == "jvm-stand-in" and stats["repeats"] == 3 and len(stats["decode_tok_s_runs"]) == 3
    runner = generate_native(micro_bundle_8da4w, prompt, 12, policy="swap")
    assert stats["tokens"] == runner.tokens and stats["prompt_tokens"] == 20 and stats["generated_tokens"] == 12
    assert derived(stats, manifest)["peak_rss_vs_active"] > 0  # the harness' own arithmetic takes it
    assert not list(stats_path.parent.glob("*.tmp"))


def test_bench_run_reports_failures_in_the_stats_file(jvm, micro_bundle_8da4w, tmp_path):
    (tmp_path / "prompt.txt").write_text("Once upon a time")
    stats_path = tmp_path / "stats.json"
    missing = tmp_path / "no-bundle"
    proc = jvm.java(BENCH, f"bundle={missing}", f"prompt={tmp_path / 'prompt.txt'}", f"stats={stats_path}")
    assert proc.returncode == 1
    assert json.loads(stats_path.read_text()) == {"error": _library_error(missing)}
    got = drive(jvm, "extras", f"bundle={micro_bundle_8da4w}", "prompt=p", "stats=s", "gen=0")
    assert got == {"error": "extra 'gen' must be an integer >= 1, got '0'", "status": 1}
    got = drive(jvm, "extras", "prompt=p", "stats=s")
    assert got == {"error": "extra 'bundle' is missing", "status": 1}
