"""Build (cached) and run the native runner in export/ — the C++ runtime that offloads experts on device (§3.4.2).

The runner is compiled with CMake against the installed `executorch` wheel's headers and libraries on first use,
into a cache directory keyed by a hash of its sources and the ExecuTorch version, so editing the C++ rebuilds it
and everything else reuses it. With COSMOES_SANITIZE=1 in the environment it is built (into a cache directory of
its own) with AddressSanitizer and UBSan, and every use of the runner in that process gets the instrumented one.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cosmoes.errors import CosmoesError

RUNNER_NAME = "cosmoes_runner"
_SOURCE_GLOBS = ("CMakeLists.txt", "cmake/*", "include/cosmoes/*.h", "runtime/*.h", "runtime/*.cpp", "runner/*.cpp",
                 "tools/*.cpp")
# Every UBSan finding stops the runner (by default UBSan prints and goes on, and a test would pass regardless).
SANITIZE_FLAGS = "-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"


def sanitize() -> bool:
    """Whether COSMOES_SANITIZE asks for the AddressSanitizer + UBSan build of the runner."""
    return os.environ.get("COSMOES_SANITIZE", "").strip() not in ("", "0")


def source_dir() -> Path:
    """export/ of the source checkout this package runs from."""
    path = Path(__file__).resolve().parents[2] / "export"
    if not (path / "CMakeLists.txt").is_file():
        raise CosmoesError(f"the native runner's sources are not at {path}; run cosmoes from a source checkout "
                           "(pip install -e .) to build it")
    return path


def executorch_prefix() -> Path:
    """The executorch wheel's package directory: its CMake package, include/ and lib/ live under it."""
    import executorch

    return Path(list(executorch.__path__)[0])


def tokenizers_prefix() -> Path:
    """The pytorch-tokenizers wheel's package directory: the C++ tokenizer's headers and compiled library."""
    import pytorch_tokenizers

    return Path(list(pytorch_tokenizers.__path__)[0])


def source_hash() -> str:
    import executorch.version

    h = hashlib.sha256()
    src = source_dir()
    for pattern in _SOURCE_GLOBS:
        for path in sorted(src.glob(pattern)):
            h.update(path.relative_to(src).as_posix().encode() + b"\0" + path.read_bytes())
    # A CMake build directory belongs to the checkout it was configured from: `cmake --install` reads the header and
    # CMake files from there, so another clone (or a deleted one) gets a build of its own.
    h.update(f"{src} {executorch.version.__version__} {platform.machine()} {sys.platform}".encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("COSMOES_CACHE", Path.home() / ".cache" / "cosmoes"))


def _check_toolchain() -> None:
    if shutil.which("cmake") is None:
        raise CosmoesError("cannot build the native runner: cmake is not on PATH (install CMake >= 3.19, "
                           "e.g. `apt-get install cmake` or `pip install cmake`)")
    compilers = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    if not any(c and shutil.which(c) for c in compilers):
        raise CosmoesError("cannot build the native runner: no C++17 compiler found (install g++ or clang++, "
                           "or set CXX)")


def build_runner(progress=None, sanitized: bool | None = None) -> Path:
    """Path of the host runner, building it first if its sources or ExecuTorch changed (CosmoesError on failure).

    sanitized: the AddressSanitizer + UBSan build (default: as COSMOES_SANITIZE says)."""
    asan = sanitize() if sanitized is None else sanitized
    build = cache_root() / f"runner-{'asan-' if asan else ''}{source_hash()}"
    exe = build / RUNNER_NAME
    if exe.is_file():
        return exe
    _check_toolchain()
    build.mkdir(parents=True, exist_ok=True)
    with open(build / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two processes building at once would clobber each other
        if exe.is_file():
            return exe
        if progress:
            progress(f"building the native runner in {build} (once; about a minute)")
        log = build / "build.log"
        steps = [["cmake", "-S", str(source_dir()), "-B", str(build / "cmake"), *_build_type_flags(asan),
                  f"-DCMAKE_PREFIX_PATH={executorch_prefix()}", f"-DCOSMOES_TOKENIZERS_DIR={tokenizers_prefix()}"],
                 ["cmake", "--build", str(build / "cmake"), "-j", str(os.cpu_count() or 1)]]
        with open(log, "w") as out:
            for cmd in steps:
                if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                    raise CosmoesError(f"building the native runner failed: {_first_error(log)} (full log: {log})")
        shutil.copy2(build / "cmake" / RUNNER_NAME, exe.with_suffix(".tmp"))
        os.replace(exe.with_suffix(".tmp"), exe)
    return exe


def library_path(progress=None) -> Path:
    """libcosmoes.so (the C API), built with the host runner."""
    path = build_runner(progress).parent / "cmake" / "libcosmoes.so"
    if not path.is_file():
        raise CosmoesError(f"the native library is missing from its build directory: {path}")
    return path


@functools.cache
def load_ops() -> Path:
    """Registers the project's graph operators (cosmoes::cached_attention, cosmoes::int4_linear) with ExecuTorch in
    this process, for the Python runtime: libcosmoes_ops, built with the host runner, shares the Python bindings'
    libexecutorch."""
    # never the sanitized build: an ASan library cannot be loaded into a Python that was not started under ASan
    path = build_runner(sanitized=False).parent / "cmake" / "libcosmoes_ops.so"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise CosmoesError(f"cannot load the runtime's operators from {path}: {e}") from None
    if lib.cosmoes_register_ops() != 0:
        raise CosmoesError("ExecuTorch refused the runtime's operators (cosmoes::cached_attention, "
                           "cosmoes::int4_linear)")
    return path


def install_library(prefix: str | Path) -> Path:
    """`cmake --install` of the host build into ``prefix``: include/cosmoes/cosmoes.h, lib/libcosmoes.so with the
    shared libraries it needs, bin/cosmoes_runner and the CMake package (find_package(cosmoes))."""
    build = build_runner().parent / "cmake"
    proc = subprocess.run(["cmake", "--install", str(build), "--prefix", str(prefix)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CosmoesError(f"installing the native library failed: {_one_line(proc.stderr or proc.stdout)}")
    return Path(prefix)


def _build_type_flags(asan: bool) -> list[str]:
    if not asan:
        return ["-DCMAKE_BUILD_TYPE=Release"]
    # -g and light optimisation: the sanitizers' reports name source lines, and the tests stay quick
    return ["-DCMAKE_BUILD_TYPE=RelWithDebInfo", f"-DCMAKE_CXX_FLAGS={SANITIZE_FLAGS}",
            f"-DCMAKE_EXE_LINKER_FLAGS={SANITIZE_FLAGS}"]


def _first_error(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines()
    errors = [ln.strip() for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[0][:300]


@dataclass
class RunnerResult:
    tokens: list[int]
    stats: dict


def runner_error(returncode: int, stderr: str) -> str:
    """The runner's one-line error, or what killed it."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    if lines:
        return lines[-1][len("error:"):].strip()
    if returncode < 0 or returncode > 128:
        sig = -returncode if returncode < 0 else returncode - 128
        return f"the runner crashed (signal {sig}); last output: {last_line(stderr)}"
    return f"the runner failed (exit {returncode}): {last_line(stderr)}"


def _one_line(text: str) -> str:
    """A tool's whole message on one line (CMake spreads one error over several), at most 300 characters."""
    return " ".join(ln.strip() for ln in text.splitlines() if ln.strip())[:300] or "no output"


def last_line(text: str) -> str:
    """The last non-blank line of a tool's output (at most 300 characters), for one-line error messages."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def run_local(bundle: str | Path, args: list[str], stats_path: Path, exe: Path | None = None,
              timeout: float | None = None) -> RunnerResult:
    """Run the host runner on a bundle with runner flags ``args``; its stats JSON lands in ``stats_path``."""
    exe = exe or build_runner()
    cmd = [str(exe), str(bundle), *args, "--stats-json", str(stats_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CosmoesError(f"the runner did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise CosmoesError(runner_error(proc.returncode, proc.stderr))
    stats = json.loads(Path(stats_path).read_text())
    return RunnerResult(tokens=list(stats["tokens"]), stats=stats)


def generate_native(bundle: str | Path, prompt_ids: list[int], max_new_tokens: int, policy: str = "swap",
                    threads: int = 1, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                    work_dir: str | Path | None = None) -> RunnerResult:
    """Generate with the native runner (same tokens as ``BundleRuntime.generate`` for greedy decoding)."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        args = ["--policy", policy, "--threads", str(threads), "--gen", str(max_new_tokens),
                "--prompt-ids", ",".join(str(int(i)) for i in prompt_ids), "--temperature", str(temperature),
                "--top-p", str(top_p), "--seed", str(seed)]
        return run_local(bundle, args, Path(tmp) / "stats.json")
