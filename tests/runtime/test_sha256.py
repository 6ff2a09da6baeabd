"""The runtime's SHA-256 (export/runtime/sha256.cpp) through cosmoes_sha256_check: the CPU's SHA instructions
where it has them, and the portable code (COSMOES_SHA=portable), both against Python's hashlib at every length
around the 64-byte block and the 56-byte padding boundary, and over a file larger than the 1 MB read buffer."""
import hashlib
import os
import random
import subprocess

import pytest

from cosmoes.runtime.native import build_runner

SIZES = [0, 1, 55, 56, 63, 64, 65, 119, 120, 127, 128, 1000, (1 << 20) + 17, 3 * (1 << 20) + 64]


@pytest.fixture(scope="module")
def sha_check():
    return build_runner().parent / "cmake" / "cosmoes_sha256_check"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sha")
    rng = random.Random(0)
    for n in SIZES:
        (d / f"f{n}.bin").write_bytes(rng.randbytes(n))
    return [d / f"f{n}.bin" for n in SIZES]


@pytest.mark.parametrize("impl", ["cpu", "portable"])
def test_digests_match_hashlib(sha_check, files, impl):
    env = {**os.environ, "COSMOES_SHA": impl}
    out = subprocess.run([sha_check, *files], capture_output=True, text=True, env=env, check=True).stdout
    got = dict(reversed(line.split("  ", 1)) for line in out.splitlines())
    for f in files:
        assert got[str(f)] == hashlib.sha256(f.read_bytes()).hexdigest(), f.name


def test_unreadable_file_is_one_line(sha_check, tmp_path):
    out = subprocess.run([sha_check, tmp_path / "missing.bin"], capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip() == f"error: cannot read {tmp_path / 'missing.bin'}"


def test_unknown_choice_is_one_line(sha_check, files):
    out = subprocess.run([sha_check, files[0]], capture_output=True, text=True,
                         env={**os.environ, "COSMOES_SHA": "fastest"})
    assert out.returncode == 1
    assert out.stderr.strip() == "error: COSMOES_SHA=fastest is not a choice: portable, or cpu (the default)"
