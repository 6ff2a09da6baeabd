"""cosmoes.runtime.cross and `cosmoes native build`: the linux-aarch64 cross build of export/ (runner + every shared
library it needs, in one directory) and its parity with the x86 runner under qemu-user, for CPU models whose
XNNPACK/KleidiAI kernels differ (cortex-a53: no dot product; cortex-a76: dot product; max: i8mm, SVE...).

The tools come from Debian (tools.sh install, which `make setup` runs); the tests install them when missing and skip,
naming why, only when that cannot be done here (no apt-get, no network for the wheels).
"""

import json
import subprocess
import sys
import time

import pytest

from cosmoes.errors import CosmoesError, InvalidValue
from cosmoes.runtime import cross
from cosmoes.runtime.native import RUNNER_NAME, build_runner, run_local
from cosmoes.tokenizer import default_tokenizer

PROMPT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
          "must be in want of a wife.")
POLICIES = ("all", "swap", "lru:2")
GEN = 24


def aarch64_tools() -> None:
    """The cross compiler, qemu-aarch64 and the aarch64 wheels, installed when missing; a skip with the reason when
    they cannot be installed here."""
    if cross.tools_ready():
        try:
            cross.ensure_wheels()
            return
        except CosmoesError as exc:
            pytest.skip(f"the aarch64 wheels cannot be downloaded here: {exc}")
    try:
        cross.install_tools()
    except CosmoesError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def aarch64():
    aarch64_tools()
    t0 = time.monotonic()
    build = cross.build_native("linux-aarch64")
    print(f"linux-aarch64 build ready in {time.monotonic() - t0:.1f} s: {build.out_dir}")
    return build


@pytest.fixture(scope="module")
def prompt_ids():
    ids = default_tokenizer()(PROMPT)["input_ids"]
    assert len(ids) > 16  # longer than the fixtures' max_chunk: prefill runs in several calls
    return ids


def _args(policy, prompt_ids):
    return ["--policy", policy, "--threads", "1", "--gen", str(GEN), "--prompt-ids", ",".join(map(str, prompt_ids))]


@pytest.fixture(scope="module")
def x86_stats(micro_bundle_8da4w, prompt_ids, tmp_path_factory):
    """The host (x86) runner's statistics per policy: what every emulated arm64 CPU must reproduce."""
    runner, tmp = build_runner(), tmp_path_factory.mktemp("x86")
    return {p: run_local(micro_bundle_8da4w, _args(p, prompt_ids), tmp / "s.json", exe=runner).stats
            for p in POLICIES}


def test_build_lays_out_the_runner_and_every_library_it_needs(aarch64):
    assert aarch64.target == "linux-aarch64" and aarch64.runner == aarch64.out_dir / RUNNER_NAME
    assert cross.is_aarch64_elf(aarch64.runner) and not aarch64.warnings
    names = {p.name for p in aarch64.libraries}
    assert {"libexecutorch.so", "libexecutorch_backend_xnnpack.so", "libexecutorch_kernels_optimized.so",
            "libexecutorch_kernels_quantized.so"} <= names
    assert all(cross.is_aarch64_elf(p) for p in aarch64.libraries)
    # every library any of them needs is beside them or part of the arm64 C/C++ runtime
    for elf in [aarch64.runner, *aarch64.libraries]:
        for needed in cross.elf_needed(elf):
            assert "/" not in needed, f"{elf.name} records {needed} by path"
            assert needed in names or (cross.SYSROOT / "lib" / needed).exists(), f"{elf.name} needs {needed}"
    assert not cross.is_aarch64_elf(build_runner())  # the host build is untouched


@pytest.mark.parametrize("cpu", ["cortex-a53", "cortex-a76", "max"])
def test_arm64_runner_under_qemu_matches_the_x86_runner(aarch64, micro_bundle_8da4w, prompt_ids, x86_stats, cpu,
                                                         tmp_path):
    for policy in POLICIES:
        arm = cross.run_qemu(micro_bundle_8da4w, _args(policy, prompt_ids), tmp_path / f"{policy}.json",
                             aarch64.runner, cpu=cpu).stats
        x86 = x86_stats[policy]
        where = f"{policy} on {cpu}"
        assert arm["tokens"] == x86["tokens"], where
        assert (arm["expert_loads"], arm["expert_evictions"]) == (x86["expert_loads"], x86["expert_evictions"]), where
        assert arm["exrep_per_layer"] == pytest.approx(x86["exrep_per_layer"], abs=1e-6), where
        print(f"{where}: decode {arm['decode_tok_s']:.1f} tok/s emulated (x86 {x86['decode_tok_s']:.1f})")


def test_arm64_runner_streams_the_same_text(aarch64, micro_bundle_8da4w, tmp_path):
    """Text in and out on arm64: the bundle's tokenizer through the aarch64 pytorch-tokenizers library encodes the
    prompt as the Python tokenizer does and streams exactly the text of the tokens it chose. (The tokens themselves
    are compared with x86 on ids above; a random micro model's top two logits can be 2e-4 apart, close enough for
    XNNPACK's arm64 and x86 rounding of the backbone to flip them on some prompt.)"""
    text = "Café au lait, naïve façade — 東京"
    runner = cross.qemu_command(aarch64.runner, "cortex-a76")
    common = ["--gen", "12", "--threads", "1", "--stats-json"]
    by_text = subprocess.run([*runner, str(micro_bundle_8da4w), "--prompt", text, *common, str(tmp_path / "t.json")],
                             capture_output=True, text=True)
    assert by_text.returncode == 0, by_text.stderr
    tokens = json.loads((tmp_path / "t.json").read_text())["tokens"]
    tokenizer = default_tokenizer()
    ids = ",".join(map(str, tokenizer(text)["input_ids"]))
    by_ids = subprocess.run([*runner, str(micro_bundle_8da4w), "--prompt-ids", ids, *common, str(tmp_path / "i.json")],
                            capture_output=True, text=True)
    assert by_ids.returncode == 0, by_ids.stderr
    assert json.loads((tmp_path / "i.json").read_text())["tokens"] == tokens  # the same prompt ids went in
    assert by_text.stdout == text + tokenizer.decode(tokens, skip_special_tokens=True) + "\n"


def test_native_build_cli_copies_the_directory_and_installs_the_c_api(aarch64, micro_bundle_8da4w, prompt_ids,
                                                                      x86_stats, tmp_path):
    out = tmp_path / "arm64 runner"
    proc = subprocess.run([sys.executable, "-m", "cosmoes.cli", "native", "build", "--target", "linux-aarch64",
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"runner: {out / RUNNER_NAME}" in proc.stdout and "libexecutorch.so" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted([RUNNER_NAME, *(p.name for p in aarch64.libraries)])
    # the copy runs from where it was put, with LD_LIBRARY_PATH naming it; the installed prefix's runner finds its
    # libraries by itself ($ORIGIN/../lib): nothing of this machine's cache is recorded in either
    prefix = aarch64.prefix
    assert (prefix / "include/cosmoes/cosmoes.h").is_file() and (prefix / "lib/cmake/cosmoes").is_dir()
    assert cross.is_aarch64_elf(prefix / "lib/libcosmoes.so")
    for name, cmd in [("copy", cross.qemu_command(out / RUNNER_NAME, "cortex-a53")),
                      ("prefix", [cross.QEMU, "-cpu", "cortex-a53", "-L", str(cross.SYSROOT),
                                  str(prefix / "bin" / RUNNER_NAME)])]:
        stats = tmp_path / f"{name}.json"
        run = subprocess.run([*cmd, str(micro_bundle_8da4w), *_args("swap", prompt_ids), "--stats-json", str(stats)],
                             capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
        assert run.returncode == 0, f"{name}: {run.stderr}"
        assert json.loads(stats.read_text())["tokens"] == x86_stats["swap"]["tokens"], name


def test_native_build_refusals_are_one_line(tmp_path):
    with pytest.raises(InvalidValue, match="target must be one of host, linux-aarch64, got 'windows'"):
        cross.build_native("windows")
    plain = tmp_path / "file"
    plain.write_text("x")
    for argv, message in [(["--target", "nope"], "error: --target must be one of host, linux-aarch64, got 'nope'"),
                          (["--target", "linux-aarch64", "--out", str(plain)], "error: --out must be a directory")]:
        proc = subprocess.run([sys.executable, "-m", "cosmoes.cli", "native", "build", *argv], capture_output=True,
                              text=True)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), proc.stderr


def test_host_target_is_the_cached_host_runner():
    build = cross.build_native("host")
    assert build.runner == build_runner() and "executorch wheel's lib/" in "\n".join(build.describe())
