"""`cosmoes bench --device ios --stats FILE` (cosmoes/bench/ios.py) on real statistics JSON; ios_demo/ against what
runs here: the Swift Stats and device keys against that JSON, and the Swift package's C target layout compiled with
the host compiler.

No iPhone or Xcode exists here: the stand-in for a phone's files is the same statistics JSON produced on this host
by the two producers an iPhone run goes through, the runner (`cosmoes_runner --stats-json`) and the C API BenchRun
calls (cosmoes_stats_json), with the "device" object BenchRun adds.
"""

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from cosmoes.runtime.capi import NativeSession
from cosmoes.runtime.native import run_local

REPO = Path(__file__).resolve().parents[2]
SWIFT_STATS = REPO / "ios_demo" / "CosmoesKit" / "Sources" / "CosmoesKit" / "Stats.swift"
SWIFT_DEVICE = REPO / "ios_demo" / "CosmoesKit" / "Sources" / "CosmoesKit" / "DeviceInfo.swift"
# the "device" object BenchRun.swift writes (DeviceInfo.current(): string values), filled with a stand-in's values
DEVICE = {"kind": "ios", "model": "stand-in (host runner, not an iPhone)", "os": "none", "cores": "1",
          "memory_mb": "0", "app": "tests/bench/test_ios.py"}


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(monkeypatch, capsys):
    """Runs `cosmoes ARGS` through the real entry point (its one-line `error:` handling) in this process."""
    from cosmoes.cli import main

    def run(*args) -> Outcome:
        monkeypatch.setattr(sys, "argv", ["cosmoes", *map(str, args)])
        with pytest.raises(SystemExit) as exit_info:
            main()
        out = capsys.readouterr()
        return Outcome(exit_info.value.code, out.out, out.err)

    return run


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


@pytest.fixture(scope="module")
def phone_stats(micro_bundle_8da4w, tmp_path_factory) -> dict[str, dict]:
    """Statistics JSON per producer: the runner under swap and all, and the C API under lru:2 (BenchRun's path)."""
    tmp = tmp_path_factory.mktemp("ios-stats")
    out = {}
    for policy in ("swap", "all"):
        args = ["--prompt-ids", "1,5,9,13,17,21", "--gen", "8", "--warmup", "0", "--repeats", "1", "--threads", "1",
                "--policy", policy]
        out[f"runner-{policy}"] = run_local(micro_bundle_8da4w, args, tmp / f"{policy}.json").stats
    with NativeSession(micro_bundle_8da4w, policy="lru:2", threads=1) as session:
        session.generate("It is a truth universally acknowledged", max_new_tokens=8)
        out["capi-lru:2"] = session.stats()
    return out


@pytest.fixture
def files(phone_stats, tmp_path) -> dict[str, Path]:
    return {name: _write(tmp_path / f"{name.replace(':', '_')}.json", dict(stats, device=DEVICE))
            for name, stats in phone_stats.items()}


def _one_error_line(proc: Outcome) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_table_and_report_show_the_phone_files(micro_bundle_8da4w, files, phone_stats, tmp_path, cli):
    out = tmp_path / "report"
    proc = cli("bench", micro_bundle_8da4w, "--device", "ios", *[a for f in files.values() for a in ("--stats", f)],
                "--out", out)
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout.splitlines()
    for name, stats in phone_stats.items():
        row = next(line for line in table if line.split()[0] == stats["policy"])
        cells = row.split()
        assert f"{stats['decode_tok_s']:.1f}" == cells[1], (name, row)
        assert f"{stats['peak_rss_mb']:.1f}" == cells[4], (name, row)
    report = json.loads((out / "bench.json").read_text())
    assert report["device"]["kind"] == "ios" and report["device"]["model"] == DEVICE["model"]
    assert [r["stats_file"] for r in report["rows"]] == [str(f) for f in files.values()]
    assert [r["tokens"] for r in report["rows"]] == [s["tokens"] for s in phone_stats.values()]
    assert all(r["peak_rss_vs_active"] > 0 for r in report["rows"])  # the derived figures of every other device
    assert (out / "bench.csv").is_file() and (out / "bench.png").is_file()


@pytest.mark.parametrize("damage, expected", [
    (lambda text: json.dumps({"error": "bundle not found: /var/mobile/x"}), "field 'error': the run on the phone"),
    (lambda text: text[: len(text) // 2], "not JSON"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "decode_tok_s"}),
     "missing field 'decode_tok_s'"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "device"}), "missing field 'device'"),
    (lambda text: json.dumps(dict(json.loads(text), peak_rss_mb="a lot")), "field 'peak_rss_mb' must be a number"),
    (lambda text: json.dumps(dict(json.loads(text), expert_evict_ms_mean="slow")),
     "field 'expert_evict_ms_mean' must be a number"),
    (lambda text: json.dumps(dict(json.loads(text), expert_pages_shared="no")),
     "field 'expert_pages_shared' must be true or false"),
    (lambda text: json.dumps(dict(json.loads(text), non_expert_mb=123.0)), "statistics of another bundle"),
    (lambda text: "[1, 2]", "not a statistics object"),
], ids=["error", "truncated", "missing-field", "no-device", "wrong-type", "wrong-type-optional", "wrong-type-bool",
         "other-bundle", "not-object"])
def test_a_bad_file_is_one_line_naming_it(micro_bundle_8da4w, files, tmp_path, cli, damage, expected):
    good = files["runner-swap"]
    bad = tmp_path / "from-the-phone.json"
    bad.write_text(damage(good.read_text()))
    line = _one_error_line(cli("bench", micro_bundle_8da4w, "--device", "ios", "--stats", good, "--stats", bad,
                                "--out", tmp_path / "report"))
    assert str(bad) in line and expected in line, line
    assert not (tmp_path / "report" / "bench.json").exists()  # nothing half-written from the good file


def test_a_bundle_aligned_below_the_iphones_pages_is_named(micro_bundle_8da4w, files, tmp_path, cli):
    """An iPhone (16 KB pages) running a bundle exported with 4 KB-aligned segments says so in its statistics."""
    shared = _write(tmp_path / "shared.json", dict(json.loads(files["runner-swap"].read_text()),
                                                   expert_pages_shared=True))
    own = cli("bench", micro_bundle_8da4w, "--device", "ios", "--stats", files["runner-swap"], "--out", tmp_path / "a")
    proc = cli("bench", micro_bundle_8da4w, "--device", "ios", "--stats", shared, "--out", tmp_path / "b")
    assert own.returncode == 0 and proc.returncode == 0, proc.stderr
    assert "expert pages shared" not in own.stdout and "re-export the bundle" in proc.stdout


def test_ios_without_stats_says_how_to_collect(micro_bundle_8da4w, tmp_path, cli):
    line = _one_error_line(cli("bench", micro_bundle_8da4w, "--device", "ios", "--out", tmp_path / "r"))
    assert "--stats FILE" in line and "Documents/cosmoes-bench" in line and "ios_demo/README.md" in line


def test_stats_needs_device_ios(micro_bundle_8da4w, files, tmp_path, cli):
    line = _one_error_line(cli("bench", micro_bundle_8da4w, "--stats", files["runner-swap"], "--out", tmp_path / "r"))
    assert "goes with --device ios" in line


def _swift_coding_keys(source: str) -> dict[str, str]:
    """Property name -> JSON key of the CodingKeys enum in Stats.swift (`case ttftMs = "ttft_ms"`, or a bare case)."""
    body = re.search(r"enum CodingKeys\s*:\s*String\s*,\s*CodingKey\s*\{(.*?)\}", source, re.S)
    assert body, "Stats.swift has no `enum CodingKeys: String, CodingKey`"
    keys = {}
    for name, raw in re.findall(r"case\s+(\w+)(?:\s*=\s*\"([^\"]+)\")?", body.group(1)):
        keys[name] = raw or name
    return keys


def test_swift_stats_coding_keys_are_keys_of_the_statistics_json(phone_stats):
    keys = _swift_coding_keys(SWIFT_STATS.read_text())
    wanted = {"ttft_ms", "prefill_tok_s", "decode_tok_s", "peak_rss_mb", "expert_loads", "expert_evictions",
              "resident_per_layer", "tokens"}
    assert wanted <= set(keys.values()), f"Stats.swift lacks {wanted - set(keys.values())}"
    for name, stats in phone_stats.items():
        missing = sorted(set(keys.values()) - set(stats))
        assert not missing, f"Stats.swift decodes {missing}, which the {name} statistics JSON does not have"


def test_the_stand_in_device_object_has_the_keys_swift_writes():
    source = SWIFT_DEVICE.read_text()
    body = re.search(r"func current\(app: String\) -> \[String: String\] \{(.*?)\n    \}", source, re.S)
    assert body, "DeviceInfo.swift has no `current(app:)`"
    assert set(re.findall(r'"(\w+)": ', body.group(1))) == set(DEVICE)


CCOSMOES = REPO / "ios_demo" / "CosmoesKit" / "Sources" / "CCosmoes"


def _excluded_in_package_swift() -> set[str]:
    """The CCosmoes target's `exclude:` entries in Package.swift."""
    manifest = (REPO / "ios_demo" / "CosmoesKit" / "Package.swift").read_text()
    return set(re.findall(r'"([^"]+)"', re.search(r"exclude:\s*\[(.*?)\]", manifest, re.S).group(1)))


def test_the_package_c_target_compiles_with_the_host_compiler(tmp_path):
    """The layout Swift PM compiles (sources through the runtime symlink, public headers through include/, the forced
    version header), checked with this host's g++ against the wheels' headers: no Apple SDK is here, so this proves
    the paths and the version string, not an iOS build."""
    import executorch
    import pytorch_tokenizers

    compiler = shutil.which("g++") or shutil.which("c++")
    assert compiler, "no C++ compiler: make setup installs g++"
    et = Path(executorch.__path__[0]) / "include"
    tok = Path(pytorch_tokenizers.__path__[0]) / "include"
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    flags = ["-std=c++17", "-fsyntax-only", "-w", "-ffp-contract=off", f"-DCOSMOES_VERSION_TOKEN={version}",
             "-include", str(CCOSMOES / "config" / "cosmoes_version.h"), "-DC10_USING_CUSTOM_GENERATED_MACROS",
             "-DET_EVENT_TRACER_ENABLED", "-I", str(CCOSMOES / "include"), "-I", str(CCOSMOES / "runtime"),
             "-I", str(et), "-I", str(et / "executorch/runtime/core/portable_type/c10"), "-I", str(tok)]
    excluded = _excluded_in_package_swift()
    sources = [p for p in sorted((CCOSMOES / "runtime").glob("*.cpp")) if f"runtime/{p.name}" not in excluded]
    assert (CCOSMOES / "runtime" / "capi.cpp") in sources and "runtime/tokenizer_log.cpp" in excluded
    procs = [(p, subprocess.Popen([compiler, *flags, str(p)], stderr=subprocess.PIPE, text=True)) for p in sources]
    failed = {p.name: proc.communicate()[1][-400:] for p, proc in procs if proc.wait() != 0}
    assert not failed, failed
    modulemap = (CCOSMOES / "include" / "module.modulemap").read_text()
    assert all((CCOSMOES / "include" / h).is_file() for h in re.findall(r'header "([^"]+)"', modulemap))
    # cosmoes_version() on iOS: the bare token Package.swift defines, made a string by the forced header
    program = tmp_path / "version.cpp"
    program.write_text('#include <cstdio>\nint main() { std::puts(COSMOES_VERSION); }\n')
    header = str(CCOSMOES / "config" / "cosmoes_version.h")
    subprocess.run([compiler, f"-DCOSMOES_VERSION_TOKEN={version}", "-include", header, str(program),
                    "-o", str(tmp_path / "v")], check=True)
    assert subprocess.run([str(tmp_path / "v")], capture_output=True, text=True).stdout.strip() == version
