"""cosmoes.bench.harness and cosmoes.bench.devices: per-policy runs with results kept on failure, the eager comparison, the roofline
arithmetic, and the adb path against the stand-in adb in tests/fakes (no phone exists on CI)."""

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cosmoes.bench.harness import BenchConfig, derived, format_table, run_bench, sweep_policies
from cosmoes.cli import app
from cosmoes.errors import CosmoesError
from cosmoes.export.manifest import Manifest
from cosmoes.runtime.native import build_runner

FAKE_ADB = Path(__file__).resolve().parents[1] / "fakes" / "adb"
QUICK = dict(prompt_len=20, gen=8, warmup=0, repeats=1, threads=1)


def test_sweep_policies():
    assert sweep_policies(2, 8) == ["swap", "lru:2", "lru:4", "lru:6", "all"]
    assert sweep_policies(1, 2) == ["swap", "lru:1", "all"]


def test_each_prompt_doc_is_a_different_held_out_document(micro_bundle_8da4w):
    from cosmoes.bench.harness import bench_prompt
    from cosmoes.export.manifest import load_manifest

    manifest = load_manifest(micro_bundle_8da4w)
    prompts = [bench_prompt(micro_bundle_8da4w, manifest, 16, doc) for doc in range(4)]
    assert all(len(p) == 16 for p in prompts)
    assert len({tuple(p) for p in prompts}) == 4


def test_derived_roofline_by_hand():
    manifest = Manifest(target="host", quant="8da4w", group_size=32, quant_embedding="int8", max_seq_len=100,
                        max_chunk=16, config={"dim": 8, "n_heads": 2, "n_kv_heads": 1, "n_layers": 2},
                        non_expert_bytes={"embedding": 5_000_000, "attention": 2_000_000, "head": 3_000_000},
                        memory={"kv_bytes_per_position": 2 * 2 * 1 * 4 * 4})  # what the config implies
    stats = {"active_expert_mb": 1.0, "decode_tok_s": 100.0, "mem_read_gb_s": 1.2, "prompt_tokens": 10,
             "generated_tokens": 20}
    d = derived(stats, manifest)
    assert d["weights_mb_per_token"] == pytest.approx(6.0)  # 2 + 3 + 1 MB: every weight but the embedding table
    # K and V, 2 layers, 1 kv head of dim 4, fp32, over the mean context of a decode step: 10 + 20 / 2 slots
    assert d["kv_mb_per_token"] == pytest.approx(2 * 2 * 1 * 4 * 20 * 4 / 1e6)
    assert d["roofline_tok_s"] == pytest.approx(1.2e9 / 6e6)
    assert d["roofline_fraction"] == pytest.approx(100 / 200)
    assert "head_vs_read" not in d  # no breakdown, no stage figures


def test_stage_bandwidth_by_hand():
    manifest = Manifest(target="host", quant="8da4w", group_size=32, quant_embedding="int8", max_seq_len=100,
                        max_chunk=16, config={"dim": 8, "n_heads": 2, "n_kv_heads": 1, "n_layers": 2},
                        non_expert_bytes={"embedding": 5_000_000, "attention": 2_000_000, "head": 3_000_000},
                        memory={"kv_bytes_per_position": 10_000})
    stats = {"active_expert_mb": 1.0, "decode_tok_s": 100.0, "mem_read_gb_s": 1.0, "prompt_tokens": 50,
             "generated_tokens": 100, "decode_breakdown_ms": {"layers": 5.0, "experts": 2.0, "head": 3.6}}
    d = derived(stats, manifest)
    # at 1 GB/s: attention weights 2 MB + KV 10 kB x (50 + 100 / 2) = 1 MB read in 3 ms, the layers took 5
    assert d["layers_bandwidth_fraction"] == pytest.approx(3.0 / 5.0)
    assert d["experts_bandwidth_fraction"] == pytest.approx(1.0 / 2.0)  # 1 MB in 1 ms against 2
    assert d["head_vs_read"] == pytest.approx(3.6 / 3.0)  # 3 MB: 3 ms to read


def test_bench_local_keeps_finished_runs_when_one_fails(micro_bundle_8da4w, tmp_path):
    cfg = BenchConfig(policies=["all", "swap"], budgets_mb=[0.01], **QUICK)
    report = run_bench(micro_bundle_8da4w, cfg, tmp_path, log=lambda _: None)
    rows = {r["policy"]: r for r in report.rows}
    assert set(rows) == {"all", "swap", "budget 0.01 MB"}
    assert "below this bundle's minimum" in rows["budget 0.01 MB"]["error"]
    assert rows["all"]["expert_evictions"] == 0 and rows["swap"]["expert_loads"] > rows["all"]["expert_loads"]
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [r["policy"] for r in saved["rows"]] == ["all", "swap", "budget 0.01 MB"]
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert (tmp_path / "bench.csv").read_text().splitlines()[0].startswith("policy,")
    assert report.device["kind"] == "local" and report.prompt_tokens == 20
    # the second table: resident MB by kind per policy; all holds every expert, swap top_k per layer
    table = format_table(report).splitlines()
    start = next(i for i, line in enumerate(table) if line.startswith("resident MB"))
    assert table[start].split() == ["resident", "MB", "embedding", "attention", "head", "experts", "kv_cache",
                                    "activations", "runtime", "after", "load", "peak"]
    by_policy = {line.split()[0]: line.split() for line in table[start + 1:start + 3]}
    assert set(by_policy) == {"all", "swap"}
    # int4 experts are the segment file's pages: file-backed, no anonymous copy; the cell shows both, file marked f
    held = {p: rows[p]["resident_mb"]["experts"] for p in ("all", "swap")}
    assert held["all"]["anon"] == held["swap"]["anon"] == 0 and held["all"]["file"] >= held["swap"]["file"] > 0
    assert by_policy["all"][4] == f"0.0+{held['all']['file']:.1f}f"


def test_compare_runs_transformers_on_the_same_weights(micro_bundle_fp32, tmp_path):
    cfg = BenchConfig(policies=["swap"], compare=True, **QUICK)
    report = run_bench(micro_bundle_fp32, cfg, tmp_path, log=lambda _: None)
    eager = report.eager
    assert eager["runner"] == "transformers-eager-fp32" and eager["decode_tok_s"] > 0 and eager["peak_rss_mb"] > 0
    assert eager["tokens"] == report.rows[0]["tokens"]  # fp32 bundle: the same greedy continuation


def test_sampled_runs_share_their_tokens_across_policies(micro_bundle_fp32, tmp_path):
    greedy = run_bench(micro_bundle_fp32, BenchConfig(policies=["all"], **QUICK), tmp_path / "g", log=lambda _: None)
    cfg = BenchConfig(policies=["all", "swap"], temperature=1.0, top_p=0.9, seed=3, compare=True, **QUICK)
    sampled = run_bench(micro_bundle_fp32, cfg, tmp_path / "s", log=lambda _: None)
    every, swap = sampled.rows
    assert every["tokens"] == swap["tokens"] != greedy.rows[0]["tokens"]  # the policy never changes the tokens
    assert sampled.eager["decode_tok_s"] > 0 and len(sampled.eager["tokens"]) == QUICK["gen"]
    with pytest.raises(CosmoesError, match="top_p must be in \\(0, 1\\], got 0"):
        run_bench(micro_bundle_fp32, BenchConfig(temperature=0.0, top_p=0), tmp_path)


@pytest.fixture
def fake_adb(tmp_path, monkeypatch):
    root = tmp_path / "phone"
    root.mkdir()
    monkeypatch.setenv("COSMOES_ADB", str(FAKE_ADB))
    monkeypatch.setenv("FAKE_ADB_ROOT", str(root))
    return root


def _bench_args(bundle, out, *extra):
    return ["bench", str(bundle), "--prompt-len", "20", "--gen", "8", "--warmup", "0", "--repeats", "1",
            "--threads", "1", "--out", str(out), *extra]


def _bench_cli(bundle, out, *extra):
    return CliRunner().invoke(app, _bench_args(bundle, out, *extra))


def _bench_process(bundle, out, *extra):
    """The real `cosmoes` entry point (its error handling), inheriting the test's environment."""
    return subprocess.run([sys.executable, "-m", "cosmoes.cli", *_bench_args(bundle, out, *extra)],
                          capture_output=True, text=True)


def test_adb_pushes_once_runs_and_records_the_device(micro_bundle_8da4w, fake_adb, tmp_path):
    runner = build_runner()
    args = ["--device", "adb:emulator-5554", "--runner", str(runner), "--policy", "swap"]
    first = _bench_cli(micro_bundle_8da4w, tmp_path / "a", *args)
    assert first.exit_code == 0, first.output
    report = json.loads((tmp_path / "a" / "bench.json").read_text())
    assert report["device"]["model"] == "Stand-in Phone" and report["device"]["android"] == "14"
    assert report["rows"][0]["decode_tok_s"] > 0 and "error" not in report["rows"][0]
    assert (fake_adb / "data/local/tmp/cosmoes/bundles" / micro_bundle_8da4w.name / "experts.bin").is_file()
    calls = (fake_adb / "calls.log").read_text()
    assert calls.count(" push ") == 5  # runner, prompt, manifest, backbone.pte, experts.bin
    second = _bench_cli(micro_bundle_8da4w, tmp_path / "b", *args)
    assert second.exit_code == 0, second.output
    assert (fake_adb / "calls.log").read_text()[len(calls):].count(" push ") == 0  # same sha256: nothing pushed


@pytest.mark.parametrize("env, serial, message", [
    ({"FAKE_ADB_STATE": "unauthorized"}, "emulator-5554", "is unauthorized: accept the USB-debugging prompt"),
    ({}, "R58M123", "adb device R58M123 is not reachable: adb: device 'R58M123' not found"),
])
def test_adb_device_problems_are_one_line(micro_bundle_8da4w, fake_adb, tmp_path, monkeypatch, env, serial, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = _bench_process(micro_bundle_8da4w, tmp_path / "o", "--device", f"adb:{serial}", "--runner",
                            str(build_runner()))
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last.startswith("error: ") and message in last
    assert "Traceback" not in result.stderr


def test_runner_crash_on_device_is_recorded_and_the_sweep_goes_on(micro_bundle_8da4w, fake_adb, tmp_path):
    real = build_runner()
    flaky = tmp_path / "bin" / "cosmoes_runner"
    flaky.parent.mkdir()
    # crashes (SIGSEGV) under the swap policy only, like a runner hitting a device-specific bug
    flaky.write_text(f'#!/bin/bash\ncase " $* " in *" swap "*) kill -SEGV $$;; esac\nexec {real} "$@"\n')
    flaky.chmod(flaky.stat().st_mode | stat.S_IEXEC)
    result = _bench_cli(micro_bundle_8da4w, tmp_path / "o", "--device", "adb", "--runner", str(flaky),
                        "--policy", "swap", "--policy", "all")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "o" / "bench.json").read_text())["rows"]
    assert "crashed (signal 11)" in rows[0]["error"]
    assert rows[1]["policy"] == "all" and rows[1]["decode_tok_s"] > 0


def test_bench_json_records_the_command_and_commit_that_produced_it(micro_bundle_8da4w, tmp_path):
    from cosmoes.provenance import REPO

    args = ("--policy", "all")
    result = _bench_process(micro_bundle_8da4w, tmp_path / "o", *args)
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "o" / "bench.json").read_text())
    # `python -m cosmoes.cli` is recorded as the `cosmoes` entry point: the line reruns as written
    assert saved["command"] == shlex.join(["cosmoes", *_bench_args(micro_bundle_8da4w, tmp_path / "o", *args)])
    commit = re.fullmatch(r"([0-9a-f]{7,})(-dirty)?", saved["commit"])
    assert commit and subprocess.run(["git", "cat-file", "-e", f"{commit[1]}^{{commit}}"], cwd=REPO).returncode == 0


def test_command_line_names_the_program_cosmoes():
    from cosmoes.provenance import command_line

    assert command_line(["/venv/bin/cosmoes", "bench", "b", "--out", "a b"]) == "cosmoes bench b --out 'a b'"
    assert command_line(["/repo/cosmoes/cli.py", "eval", "runs/moe"]) == "cosmoes eval runs/moe"


def test_bad_bench_options(micro_bundle_8da4w, tmp_path):
    with pytest.raises(CosmoesError, match="unknown device 'usb'"):
        run_bench(micro_bundle_8da4w, BenchConfig(device="usb"), tmp_path)
    with pytest.raises(CosmoesError, match="exceed the bundle's max_seq_len 64"):
        run_bench(micro_bundle_8da4w, BenchConfig(prompt_len=60, gen=10), tmp_path)
    with pytest.raises(CosmoesError, match=r"prompt_doc must be in 0\.\.49, got 50"):
        run_bench(micro_bundle_8da4w, BenchConfig(prompt_doc=50), tmp_path)
    os.environ.pop("COSMOES_ADB", None)
    result = _bench_process(tmp_path / "missing", tmp_path / "o")
    assert result.returncode == 2 and result.stderr.strip() == f"error: bundle not found: {tmp_path / 'missing'}"


@pytest.mark.parametrize("changes,message", [
    (dict(budgets_mb=[float("nan")]), "budget_mb must be finite and > 0, got nan"),
    (dict(budgets_mb=[5.0, -1.0]), "budget_mb must be finite and > 0, got -1.0"),
    (dict(temperature=float("inf")), "temperature must be finite and >= 0, got inf"),
    (dict(temperature=float("nan")), "temperature must be finite and >= 0, got nan"),
    (dict(threads=-1), "threads must be between 0 (one per core) and {cores}, got -1"),
    (dict(threads=10_000), "threads must be between 0 (one per core) and {cores}, got 10000"),
    (dict(device="adb", threads=2000), "threads must be between 0 (one per core) and 1024, got 2000"),
])
def test_bench_config_refuses_bad_numbers(changes, message):
    from cosmoes.errors import InvalidValue
    from cosmoes.system import usable_cores

    with pytest.raises(InvalidValue) as err:
        BenchConfig(**changes).validate()
    assert str(err.value) == message.format(cores=usable_cores())


def test_a_phone_may_get_more_threads_than_this_machine_has_cores():
    BenchConfig(device="adb", threads=64).validate()  # the phone's cores are not this machine's


HOSTILE_NAME = "x; rm -rf ~; touch pwned $(touch pwned2) `touch pwned3` 'q\""


def test_adb_commands_quote_user_paths_and_values(fake_adb, tmp_path, monkeypatch):
    from cosmoes.bench.devices import REMOTE_ROOT, AdbDevice
    from cosmoes.export.manifest import sha256_file

    home = tmp_path / "home"  # if anything went unquoted, `rm -rf ~` would hit this, not the real home
    (home / "keep").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    bundle = tmp_path / HOSTILE_NAME
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}\n")
    (bundle / "p.pte").write_bytes(b"program")
    runner = tmp_path / "bin" / "cosmoes runner; touch pwned4"
    runner.parent.mkdir()
    # stands in for the runner: records the argument list it got (and where it ran) as its statistics
    runner.write_text(f"#!/bin/bash\nexec {shlex.quote(sys.executable)} -c 'import json, os, sys\n"
                      "json.dump({\"argv\": sys.argv[1:], \"cwd\": os.getcwd()}, open(sys.argv[-1], \"w\"))' \"$@\"\n")
    runner.chmod(0o755)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("1 2 3\n")
    manifest = Manifest(target="host", quant="none", group_size=None, quant_embedding="none", max_seq_len=8,
                        max_chunk=8, config={}, programs={"p": {"file": "p.pte", "sha256": sha256_file(bundle / "p.pte")}})
    device = AdbDevice(None, str(runner), log=lambda _: None)
    device.prepare(bundle, manifest, prompt)
    args = ["--policy", "lru:2; touch pwned5", "--prompt-file", device.prompt_path, "--note", "$(touch pwned6)"]
    stats = device.run(args, timeout=60)

    remote_bundle = fake_adb / f"data/local/tmp/cosmoes/bundles/{HOSTILE_NAME}"
    assert (remote_bundle / "p.pte").read_bytes() == b"program" and (remote_bundle / "manifest.json").is_file()
    assert stats["argv"][0] == str(remote_bundle)  # the folder's name arrived as one argument, as it is
    assert stats["argv"][1:-2] == [a.replace("/data/local/tmp", str(fake_adb / "data/local/tmp")) for a in args]
    assert stats["argv"][-2] == "--stats-json" and stats["cwd"] == str(fake_adb) + REMOTE_ROOT
    assert (home / "keep").is_dir()
    assert not [p for p in tmp_path.rglob("pwned*")] and not list(Path.cwd().glob("pwned*"))
