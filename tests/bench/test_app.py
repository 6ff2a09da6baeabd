"""`cosmoes bench --device adb --app`: the demo app's BenchActivity instead of a pushed runner, end to end through the
CLI. No phone exists on CI: the stand-in adb (tests/fakes/adb) plays the installed app by running the Kotlin BenchRun
on this machine's JVM over the JNI shim and the real libcosmoes (tests/android_demo/jvm.py builds them)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cosmoes.bench.devices import APP_ROOT
from cosmoes.bench.harness import BenchConfig, run_bench
from cosmoes.errors import CosmoesError
from cosmoes.runtime.capi import NativeSession
from cosmoes.runtime.native import generate_native
from tests.android_demo.jvm import JAVA_HOME, build_or_skip

FAKE_ADB = Path(__file__).resolve().parents[1] / "fakes" / "adb"


@pytest.fixture(scope="module")
def app_build():
    return build_or_skip()


@pytest.fixture
def phone(tmp_path, monkeypatch, app_build):
    """The stand-in adb with the demo app installed; the test's environment is the CLI process' too."""
    root = tmp_path / "device"
    root.mkdir()
    monkeypatch.setenv("COSMOES_ADB", str(FAKE_ADB))
    monkeypatch.setenv("FAKE_ADB_ROOT", str(root))
    monkeypatch.setenv("FAKE_ADB_APP", str(app_build.dir))
    monkeypatch.setenv("JAVA_HOME", str(JAVA_HOME))
    return root


def bench(bundle, out, *extra):
    return subprocess.run([sys.executable, "-m", "cosmoes.cli", "bench", str(bundle), "--device", "adb", "--app",
                           "--prompt-len", "20", "--gen", "8", "--warmup", "0", "--repeats", "2", "--threads", "1",
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=600)


def test_bench_app_runs_benchrun_and_prints_the_table(micro_bundle_8da4w, phone, tmp_path):
    result = bench(micro_bundle_8da4w, tmp_path / "o", "--policy", "all", "--policy", "swap")
    assert result.returncode == 0, result.stderr
    table = result.stdout.splitlines()
    assert table[0].split()[:5] == ["policy", "decode", "tok/s", "TTFT", "ms"] and "peak RSS MB" in table[0]
    assert [line.split()[0] for line in table[1:3]] == ["all", "swap"]
    report = json.loads((tmp_path / "o" / "bench.json").read_text())
    assert report["device"]["client"] == "android-app" and report["device"]["model"] == "Stand-in Phone"
    prompt = [int(t) for t in (tmp_path / "o" / "prompt.txt").read_text().split()]
    for row in report["rows"]:
        assert "error" not in row, row
        # written by the Kotlin BenchRun (the stand-in activity on the JVM), not the runner
        assert row["client"] == "android-app" and row["device"]["kind"] == "jvm-stand-in" and row["repeats"] == 2
        assert row["decode_tok_s"] > 0 and row["peak_rss_mb"] > 0 and "peak_rss_vs_active" in row
        assert row["tokens"] == generate_native(micro_bundle_8da4w, prompt, 8, policy=row["policy"]).tokens
    pushed = phone / APP_ROOT.lstrip("/") / "bundles" / micro_bundle_8da4w.name
    assert (pushed / "experts.bin").is_file() and (pushed / "tokenizer" / "tokenizer.json").is_file()
    calls = (phone / "calls.log").read_text()
    assert "am start -W -n org.cosmoes.demo/.BenchActivity --es bundle" in calls and "cosmoes_runner" not in calls
    # a second run pushes nothing: every file's sha256 already matches
    again = bench(micro_bundle_8da4w, tmp_path / "o2", "--policy", "swap")
    assert again.returncode == 0, again.stderr
    assert (phone / "calls.log").read_text()[len(calls):].count(" push ") == 0


def test_app_not_installed_is_one_line(micro_bundle_8da4w, phone, tmp_path, monkeypatch):
    monkeypatch.delenv("FAKE_ADB_APP")
    result = bench(micro_bundle_8da4w, tmp_path / "o")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the demo app is not installed on the adb device: see android_demo/README.md")


def test_a_bad_bundle_fails_with_the_librarys_message(micro_bundle_8da4w, phone, tmp_path, monkeypatch):
    """experts.bin arrives damaged on the device (the stand-in flips a byte): the host's checks passed, the app's
    library refuses it, and its line is the row's error."""
    monkeypatch.setenv("FAKE_ADB_DAMAGE", "experts.bin")
    result = bench(micro_bundle_8da4w, tmp_path / "o", "--policy", "swap")
    assert result.returncode == 0, result.stderr  # a failed run is a row, as with the runner
    remote = phone / APP_ROOT.lstrip("/") / "bundles" / micro_bundle_8da4w.name
    with pytest.raises(CosmoesError) as caught:  # what the library says about the device's copy
        NativeSession(remote)
    row = json.loads((tmp_path / "o" / "bench.json").read_text())["rows"][0]
    assert row["error"] == f"on the adb device: {caught.value}" and "experts.bin" in row["error"]
    assert f"FAILED: on the adb device: {caught.value}" in result.stdout


def test_no_statistics_is_a_timeout_naming_the_file(micro_bundle_8da4w, phone, tmp_path, monkeypatch):
    """An app that dies before writing anything (here: its classes are missing)."""
    broken = tmp_path / "broken-app"
    broken.mkdir()
    (broken / "classpath").write_text(str(broken / "nothing") + "\n")
    monkeypatch.setenv("FAKE_ADB_APP", str(broken))
    cfg = BenchConfig(device="adb", app=True, policies=["swap"], prompt_len=8, gen=4, warmup=0, repeats=1,
                      threads=1, timeout_s=3)
    report = run_bench(micro_bundle_8da4w, cfg, tmp_path / "o", log=lambda line: None)
    assert report.rows[0]["error"] == (f"the adb device: the demo app wrote no statistics to {APP_ROOT}/stats.json "
                                       "within 3 s (adb logcat shows why)")


@pytest.mark.parametrize("changes, message", [
    (dict(device="local"), "--app runs the demo app on an Android device: use --device adb or adb:SERIAL, not local"),
    (dict(runner="/bin/true"), "--app runs the installed demo app, which carries its own library: leave --runner out"),
    (dict(temperature=0.7), "--app decodes greedily (BenchActivity takes no sampling extras): leave --temperature out"),
])
def test_app_flag_needs_an_adb_device_no_runner_and_greedy(micro_bundle_8da4w, phone, tmp_path, changes, message):
    cfg = BenchConfig(**{"device": "adb", "app": True, "prompt_len": 8, "gen": 4, **changes})
    with pytest.raises(CosmoesError) as caught:
        run_bench(micro_bundle_8da4w, cfg, tmp_path / "o", log=lambda line: None)
    assert str(caught.value) == message
