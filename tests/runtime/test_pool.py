"""The runtime's spinning thread pool (export/runtime/pool.cpp) through cosmoes_pool_check: every item of every job
runs exactly once, with workers awake or asleep, two callers at once, pools made and dropped; and once more under
ThreadSanitizer, since it hands work over with atomics rather than locks."""
import shutil
import subprocess
from pathlib import Path

import pytest

from cosmoes.runtime.native import build_runner, executorch_prefix

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pool_check():
    return build_runner().parent / "cmake" / "cosmoes_pool_check"


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_every_item_runs_once(pool_check, threads):
    out = subprocess.run([pool_check, "stress", str(threads), "1500"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


def test_latency_reports_both_pools(pool_check):
    out = subprocess.run([pool_check, "latency", "2", "2000"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    fields = out.stdout.split()
    assert fields[:2] == ["threads", "2"] and float(fields[4]) > 0 and float(fields[8]) > 0


def test_bad_arguments_are_one_line(pool_check):
    out = subprocess.run([pool_check, "stress", "0", "10"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip() == "error: THREADS must be 1..64 and JOBS >= 1"


def test_no_data_race_under_thread_sanitizer(tmp_path):
    cxx = shutil.which("g++")
    if not cxx or subprocess.run([cxx, "-fsanitize=thread", "-x", "c++", "-", "-o", tmp_path / "probe"],
                                 input="int main(){}", text=True, capture_output=True).returncode:
        pytest.skip("no g++ with ThreadSanitizer here")
    et = executorch_prefix()
    exe = tmp_path / "pool_tsan"
    subprocess.run([cxx, "-std=c++17", "-O1", "-g", "-fsanitize=thread", f"-I{ROOT / 'export/runtime'}",
                    f"-I{et / 'include'}", ROOT / "export/runtime/pool.cpp", ROOT / "export/tools/pool_check.cpp",
                    f"-L{et / 'lib'}", "-lexecutorch_threadpool", f"-Wl,-rpath,{et / 'lib'}", "-o", exe], check=True)
    for threads in (2, 4):
        out = subprocess.run([exe, "stress", str(threads), "300"], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0 and out.stdout.strip() == "ok" and "ThreadSanitizer" not in out.stderr, out.stderr
