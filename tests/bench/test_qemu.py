"""`cosmoes bench --device qemu[:CPU]` and the adb stand-in with a real arm64 runner: the linux-aarch64 build runs
under qemu-user, gives the host runner's tokens and expert traffic, and its timings are labelled emulated.

The arm64 tools are installed when missing (tests/runtime/test_cross.py's rule: skip only when they cannot be)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cosmoes.bench.devices import parse_device
from cosmoes.bench.harness import BenchConfig, format_table, run_bench
from cosmoes.cli import app
from cosmoes.errors import CosmoesError
from cosmoes.runtime import cross
from cosmoes.runtime.native import build_runner

FAKE_ADB = Path(__file__).resolve().parents[1] / "fakes" / "adb"
QUICK = dict(prompt_len=20, gen=8, warmup=0, repeats=1, threads=1)


def test_parse_device_knows_qemu():
    assert parse_device("qemu") == ("qemu", None)
    assert parse_device("qemu:cortex-a53") == ("qemu", "cortex-a53")
    with pytest.raises(CosmoesError, match="use local, adb, adb:SERIAL, qemu or qemu:CPU"):
        parse_device("qemu-cortex")


@pytest.fixture(scope="module")
def arm64_runner():
    if not cross.tools_ready():
        try:
            cross.install_tools()
        except CosmoesError as exc:
            pytest.skip(str(exc))
    try:
        return cross.build_native("linux-aarch64").runner
    except CosmoesError as exc:
        if "could not download" in str(exc):
            pytest.skip(f"the aarch64 wheels cannot be downloaded here: {exc}")
        raise


@pytest.fixture(scope="module")
def local_rows(micro_bundle_8da4w, tmp_path_factory):
    cfg = BenchConfig(policies=["swap", "lru:2"], probe=False, **QUICK)
    report = run_bench(micro_bundle_8da4w, cfg, tmp_path_factory.mktemp("local"), log=lambda _: None)
    return {r["policy"]: r for r in report.rows}


def test_bench_on_qemu_matches_the_host_and_says_emulated(arm64_runner, micro_bundle_8da4w, local_rows, tmp_path):
    cfg = BenchConfig(device="qemu:cortex-a53", policies=["swap", "lru:2"], probe=False, **QUICK)
    report = run_bench(micro_bundle_8da4w, cfg, tmp_path, log=lambda _: None)
    device = report.device
    assert device["kind"] == "qemu" and device["emulated"] is True and device["cpu"] == "cortex-a53"
    assert device["model"] == "qemu-aarch64 -cpu cortex-a53 (emulated)" and "qemu-aarch64 version" in device["emulator"]
    for row in report.rows:
        assert "error" not in row, row
        here = local_rows[row["policy"]]
        assert row["emulated"] is True and row["timing"] == "emulated (qemu-aarch64 -cpu cortex-a53)"
        assert row["tokens"] == here["tokens"] and row["expert_loads"] == here["expert_loads"]
        assert row["expert_evictions"] == here["expert_evictions"]
        assert row["exrep_per_layer"] == pytest.approx(here["exrep_per_layer"], abs=1e-6)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["device"]["emulated"] is True and all(r["emulated"] for r in saved["rows"])
    csv = (tmp_path / "bench.csv").read_text().splitlines()
    assert "emulated" in csv[0].split(",") and all("qemu-aarch64 -cpu cortex-a53 (emulated)" in r for r in csv[1:])
    assert format_table(report).splitlines()[-1] == "timings emulated: qemu-aarch64 -cpu cortex-a53 (emulated)"


def test_qemu_device_refusals(arm64_runner, micro_bundle_8da4w, tmp_path):
    with pytest.raises(CosmoesError, match="does not emulate a CPU named 'cortex-z9'; it knows: .*cortex-a76"):
        run_bench(micro_bundle_8da4w, BenchConfig(device="qemu:cortex-z9", **QUICK), tmp_path)
    with pytest.raises(CosmoesError, match="is not an aarch64 program: --device qemu runs the linux-aarch64 runner"):
        run_bench(micro_bundle_8da4w, BenchConfig(device="qemu", runner=str(build_runner()), **QUICK), tmp_path)


def test_adb_stand_in_runs_the_pushed_arm64_runner_under_qemu(arm64_runner, micro_bundle_8da4w, local_rows,
                                                              tmp_path, monkeypatch):
    phone = tmp_path / "phone"
    phone.mkdir()
    monkeypatch.setenv("COSMOES_ADB", str(FAKE_ADB))
    monkeypatch.setenv("FAKE_ADB_ROOT", str(phone))
    monkeypatch.setenv("FAKE_ADB_QEMU_CPU", "cortex-a76")
    args = ["bench", str(micro_bundle_8da4w), "--device", "adb:emulator-5554", "--runner", str(arm64_runner), "--policy", "swap",
            "--policy", "lru:2", "--prompt-len", "20", "--gen", "8", "--warmup", "0", "--repeats", "1",
            "--threads", "1", "--out", str(tmp_path / "a")]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    calls = (phone / "calls.log").read_text()
    libraries = sorted(p.name for p in arm64_runner.parent.glob("*.so"))
    assert calls.count(" push ") == 5 + len(libraries)  # runner, prompt, manifest, two programs, the libraries
    assert "(stand-in: ran under qemu-aarch64 -cpu cortex-a76 -L /usr/aarch64-linux-gnu)" in calls
    remote = phone / "data/local/tmp/cosmoes"
    assert cross.is_aarch64_elf(remote / "bin/cosmoes_runner")
    assert sorted(p.name for p in (remote / "lib").iterdir()) == libraries
    rows = json.loads((tmp_path / "a" / "bench.json").read_text())["rows"]
    for row in rows:
        assert "error" not in row, row
        here = local_rows[row["policy"]]
        assert (row["tokens"], row["expert_loads"], row["expert_evictions"]) == \
            (here["tokens"], here["expert_loads"], here["expert_evictions"])
    second = CliRunner().invoke(app, args[:-1] + [str(tmp_path / "b")])
    assert second.exit_code == 0, second.output
    assert (phone / "calls.log").read_text()[len(calls):].count(" push ") == 0  # same sha256: nothing pushed
