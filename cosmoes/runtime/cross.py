"""Cross-building the native runtime (export/) for 64-bit Arm Linux and running it under qemu-user (issue #15).

`build_native("linux-aarch64")` compiles the library and ``cosmoes_runner`` with Debian's ``aarch64-linux-gnu-g++``
(toolchain file ``export/recipes/linux-aarch64/toolchain.cmake``) against the aarch64 wheels of executorch and
pytorch-tokenizers, which it downloads (``pip download --platform manylinux_2_28_aarch64``, the versions this
environment has installed) and unpacks into the cache. Like the host runner it is cached, keyed by a hash of
export/'s files, the toolchain and the wheel versions. The result is one directory: the runner, the libraries built
with it and every shared library it needs from the wheels, so it runs with ``LD_LIBRARY_PATH`` set to that directory
(what `cosmoes bench --device qemu` and the adb device do), plus the ``cmake --install`` prefix of the C API
(include/, lib/, bin/, the CMake package), whose runner finds its libraries by itself (``$ORIGIN/../lib``).
`run_qemu` runs the runner under ``qemu-aarch64 -cpu CPU -L /usr/aarch64-linux-gnu``, so an arm64 build is exercised
on this x86 machine; its timings are emulated.

The tools come from Debian (``g++-aarch64-linux-gnu``, ``qemu-user``): ``export/recipes/linux-aarch64/tools.sh
install`` installs them when missing (``make setup`` calls it).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cosmoes.errors import CosmoesError, InvalidValue
from cosmoes.runtime.native import (RUNNER_NAME, RunnerResult, _first_error, build_runner, cache_root, last_line,
                                    runner_error, source_dir)

TARGETS = ("host", "linux-aarch64")
SYSROOT = Path("/usr/aarch64-linux-gnu")  # Debian's arm64 glibc and libstdc++ (what qemu-aarch64 -L needs)
CROSS_CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
DEFAULT_QEMU_CPU = "max"
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
# The distributions whose aarch64 wheels the cross build uses, and the package directory each unpacks to.
WHEELS = {"executorch": "executorch", "pytorch-tokenizers": "pytorch_tokenizers"}
TOOLS_SCRIPT = "export/recipes/linux-aarch64/tools.sh"
EM_AARCH64 = 183  # ELF e_machine


def recipe_dir() -> Path:
    return source_dir() / "recipes" / "linux-aarch64"


def toolchain_file() -> Path:
    return recipe_dir() / "toolchain.cmake"


def _install_hint(what: str) -> str:
    return f"{what} (run `{TOOLS_SCRIPT} install`, or `apt-get install g++-aarch64-linux-gnu qemu-user`)"


def check_cross_tools() -> None:
    """CosmoesError naming what is missing to cross-build for linux-aarch64."""
    if shutil.which("cmake") is None:
        raise CosmoesError("cannot cross-build for linux-aarch64: cmake is not on PATH (install CMake >= 3.19)")
    if shutil.which(CROSS_CXX) is None:
        raise CosmoesError(_install_hint(f"cannot cross-build for linux-aarch64: {CROSS_CXX} is not on PATH"))
    if not (SYSROOT / "lib").is_dir():
        raise CosmoesError(_install_hint(f"cannot cross-build for linux-aarch64: no arm64 C library in {SYSROOT}"))


def check_qemu() -> None:
    """CosmoesError naming what is missing to run an aarch64 binary under qemu-user."""
    if shutil.which(QEMU) is None:
        raise CosmoesError(_install_hint(f"cannot run an aarch64 runner: {QEMU} is not on PATH"))
    if not (SYSROOT / "lib" / "ld-linux-aarch64.so.1").exists():
        raise CosmoesError(_install_hint(f"cannot run an aarch64 runner: no arm64 dynamic loader in {SYSROOT}/lib"))


def tools_ready() -> bool:
    """Whether the cross compiler, the arm64 C library and qemu-aarch64 are all here."""
    return (shutil.which(CROSS_CXX) is not None and shutil.which(QEMU) is not None
            and (SYSROOT / "lib" / "ld-linux-aarch64.so.1").exists())


def install_tools() -> None:
    """``tools.sh install``: the Debian packages when missing (apt-get), then the aarch64 wheels; CosmoesError with
    the script's reason when that is impossible here (no apt-get, no network)."""
    script = recipe_dir() / "tools.sh"
    proc = subprocess.run(["bash", str(script), "install"], capture_output=True, text=True,
                          env={**os.environ, "PY": sys.executable})
    if proc.returncode != 0:
        raise CosmoesError(f"the linux-aarch64 tools could not be installed: {last_line(proc.stderr or proc.stdout)}")


# -- the aarch64 wheels -------------------------------------------------------------------------------------------
@dataclass
class Wheels:
    """The unpacked aarch64 wheels: each distribution's package directory."""

    executorch: Path  # .../executorch (lib/, include/, lib/cmake/executorch/)
    tokenizers: Path  # .../pytorch_tokenizers (include/, pytorch_tokenizers_cpp.cpython-*-aarch64-linux-gnu.so)
    versions: dict[str, str]

    @property
    def executorch_cmake_dir(self) -> Path:
        return self.executorch / "lib" / "cmake" / "executorch"


def wheel_versions() -> dict[str, str]:
    """The installed version of each distribution in WHEELS: the aarch64 build uses the same ones."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in WHEELS:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            raise CosmoesError(f"{dist} is not installed in this environment: its version picks the aarch64 wheel "
                               "(pip install -e '.[dev]')") from None
    return out


def _python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def wheels_dir() -> Path:
    return cache_root() / "wheels" / f"{WHEEL_PLATFORM}-py{_python_tag()}"


def ensure_wheels(progress: Callable[[str], None] | None = None) -> Wheels:
    """The aarch64 wheels of the installed executorch and pytorch-tokenizers, downloaded and unpacked once."""
    versions = wheel_versions()
    root = wheels_dir()
    root.mkdir(parents=True, exist_ok=True)
    dirs = {}
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two processes fetching at once would clobber each other
        for dist, package in WHEELS.items():
            dest = root / f"{dist}-{versions[dist]}"
            if not (dest / package).is_dir():
                _fetch_wheel(dist, versions[dist], dest, progress)
            dirs[dist] = dest / package
    return Wheels(executorch=dirs["executorch"], tokenizers=dirs["pytorch-tokenizers"], versions=versions)


def _fetch_wheel(dist: str, version: str, dest: Path, progress) -> None:
    if progress:
        progress(f"downloading the {WHEEL_PLATFORM} wheel of {dist}=={version} into {dest}")
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--platform", WHEEL_PLATFORM, "--python-version", _python_tag(), "--dest", tmp,
               f"{dist}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise CosmoesError(f"could not download the {WHEEL_PLATFORM} wheel of {dist}=={version}: "
                               f"{last_line(proc.stderr or proc.stdout)}")
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as whl:  # a wheel is a zip; unpacked as pip would install it
            for info in whl.infolist():
                path = Path(whl.extract(info, unpacked))
                mode = info.external_attr >> 16
                if mode & 0o111 and path.is_file():
                    path.chmod(path.stat().st_mode | 0o111)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(unpacked, dest)


# -- the cross build ----------------------------------------------------------------------------------------------
@dataclass
class NativeBuild:
    """Where `build_native` put things."""

    target: str
    runner: Path
    out_dir: Path  # the runner and every shared library it needs (linux-aarch64); the host runner's cache entry
    libraries: list[Path] = field(default_factory=list)  # shared libraries laid out beside the runner
    build_dir: Path | None = None
    log: Path | None = None
    warnings: list[str] = field(default_factory=list)
    prefix: Path | None = None  # `cmake --install` of the build: include/cosmoes/cosmoes.h, lib/, bin/, lib/cmake/

    def describe(self) -> list[str]:
        lines = [f"target: {self.target}", f"runner: {self.runner}"]
        if self.target == "host":
            lines.append("libraries: the executorch wheel's lib/ in this environment (found through the runner's "
                         "RUNPATH)")
        else:
            lines.append(f"libraries ({len(self.libraries)}) in {self.out_dir}: "
                         + ", ".join(p.name for p in self.libraries))
            if self.prefix:
                lines.append(f"C API package: {self.prefix} (include/cosmoes/cosmoes.h, lib/libcosmoes.so and the "
                             "libraries it needs, bin/cosmoes_runner, lib/cmake/cosmoes)")
            lines.append(f"run: {QEMU} -cpu {DEFAULT_QEMU_CPU} -L {SYSROOT} -E LD_LIBRARY_PATH={self.out_dir} "
                         f"{self.runner} BUNDLE ...   (or cosmoes bench BUNDLE --device qemu)")
        if self.log:
            lines.append(f"build log: {self.log}")
        return lines


def check_target(target: str) -> None:
    if target not in TARGETS:
        raise InvalidValue("target", f"must be one of {', '.join(TARGETS)}, got {target!r}")


def cross_hash(wheels: Wheels) -> str:
    """Hash of everything the linux-aarch64 build depends on: export/'s files (sources, CMake files, the toolchain
    file; not its documentation), the wheel versions and the compiler's version."""
    h = hashlib.sha256()
    src = source_dir()
    for path in sorted(p for p in src.rglob("*") if p.is_file() and p.suffix != ".md"):
        h.update(path.relative_to(src).as_posix().encode() + b"\0" + path.read_bytes())
    compiler = subprocess.run([CROSS_CXX, "-dumpfullversion"], capture_output=True, text=True).stdout.strip()
    h.update(f"linux-aarch64 {sorted(wheels.versions.items())} {compiler} py{_python_tag()}".encode())
    return h.hexdigest()[:16]


def build_native(target: str = "host", out: str | Path | None = None,
                 progress: Callable[[str], None] | None = None) -> NativeBuild:
    """Build the native runtime for ``target`` (cached; CosmoesError on failure), optionally copying the runner and
    its libraries to ``out``."""
    from cosmoes.config import check_out_dir

    check_target(target)
    if out is not None:
        check_out_dir("out", out)  # before the build, not after it
    if target == "host":
        runner = build_runner(progress)
        result = NativeBuild("host", runner, runner.parent, log=runner.parent / "build.log")
    else:
        result = build_linux_aarch64(progress)
    if out is not None:
        result = _copy_out(result, Path(out))
    return result


def build_linux_aarch64(progress: Callable[[str], None] | None = None) -> NativeBuild:
    """The aarch64 runner and its libraries in one directory, cross-built once per source/wheel version."""
    check_cross_tools()
    wheels = ensure_wheels(progress)
    build = cache_root() / f"linux-aarch64-{cross_hash(wheels)}"
    dist = build / "out"
    log = build / "build.log"
    if not (dist / RUNNER_NAME).is_file():
        build.mkdir(parents=True, exist_ok=True)
        with open(build / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (dist / RUNNER_NAME).is_file():
                _cross_build(build, wheels, log, progress)
    libraries = sorted(p for p in dist.iterdir() if p.name != RUNNER_NAME and _is_shared_library(p))
    warnings = (build / "warnings.txt").read_text().splitlines() if (build / "warnings.txt").is_file() else []
    return NativeBuild("linux-aarch64", dist / RUNNER_NAME, dist, libraries, build / "cmake", log, warnings,
                       prefix=build / "prefix")


def _cross_build(build: Path, wheels: Wheels, log: Path, progress) -> None:
    if progress:
        progress(f"cross-building the native runtime for linux-aarch64 in {build} (once; a minute or two)")
    cmake_dir = build / "cmake"
    steps = [["cmake", "-S", str(source_dir()), "-B", str(cmake_dir), f"-DCMAKE_TOOLCHAIN_FILE={toolchain_file()}",
              "-DCMAKE_BUILD_TYPE=Release", f"-Dexecutorch_DIR={wheels.executorch_cmake_dir}",
              f"-DCMAKE_PREFIX_PATH={wheels.executorch}", f"-DCOSMOES_TOKENIZERS_DIR={wheels.tokenizers}"],
             ["cmake", "--build", str(cmake_dir), "-j", str(os.cpu_count() or 1)]]
    with open(log, "w") as out:
        for cmd in steps:
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise CosmoesError(f"cross-building for linux-aarch64 failed: {_first_error(log)} (full log: {log})")
    # the C API as `cmake --install` lays it out (include/, lib/ with every library it needs, bin/, the CMake package)
    prefix = build / "prefix"
    if prefix.exists():
        shutil.rmtree(prefix)
    with open(log, "a") as out:
        cmd = ["cmake", "--install", str(cmake_dir), "--prefix", str(prefix)]
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
            raise CosmoesError(f"installing the linux-aarch64 build failed: {_first_error(log)} (full log: {log})")
    staging = Path(tempfile.mkdtemp(dir=build, prefix=".out-"))
    warnings = _lay_out(cmake_dir, staging, [wheels.executorch / "lib", wheels.tokenizers])
    (build / "warnings.txt").write_text("".join(w + "\n" for w in warnings))
    dist = build / "out"
    if dist.exists():
        shutil.rmtree(dist)
    os.replace(staging, dist)


def _is_shared_library(path: Path) -> bool:
    return re.search(r"\.so(\.\d+)*$", path.name) is not None and (path.is_file() or path.is_symlink())


def _lay_out(cmake_dir: Path, dist: Path, search: list[Path]) -> list[str]:
    """Copy the runner, the shared libraries built with it and every shared library they need from ``search`` into
    ``dist``; what the arm64 C/C++ runtime provides (the sysroot) is left out. Returns warnings."""
    shutil.copy2(cmake_dir / RUNNER_NAME, dist / RUNNER_NAME)
    queue = [dist / RUNNER_NAME]
    # the libraries built with it (libcosmoes.so.X.Y.Z and its name links, kept as links)
    for lib in sorted(p for p in cmake_dir.rglob("*") if _is_shared_library(p) and "CMakeFiles" not in p.parts):
        shutil.copy2(lib, dist / lib.name, follow_symlinks=False)
        if not lib.is_symlink():
            queue.append(dist / lib.name)
    warnings, seen = [], set()
    while queue:
        elf = queue.pop()
        for needed in elf_needed(elf):
            if needed in seen:
                continue
            seen.add(needed)
            if "/" in needed:  # linked by path to a library without a SONAME: found only at that path
                warnings.append(f"{elf.name} needs {needed} by its absolute path, so the directory is not "
                                "relocatable (link that library as IMPORTED_NO_SONAME, so the name alone is recorded)")
                source = Path(needed)
                name = source.name
            else:
                name = needed
                source = next((d / name for d in [dist, *search] if (d / name).is_file()), None)
                if source is None:
                    if not any((SYSROOT / sub / name).exists() for sub in ("lib", "lib64")):
                        warnings.append(f"{elf.name} needs {name}, which is neither in the wheels nor in {SYSROOT}")
                    continue
            if not (dist / name).exists():
                shutil.copy2(source, dist / name)
                queue.append(dist / name)
    return warnings


def elf_needed(path: Path) -> list[str]:
    """The DT_NEEDED entries of an ELF file (readelf from binutils; the cross binutils' when present)."""
    readelf = shutil.which("aarch64-linux-gnu-readelf") or shutil.which("readelf")
    if readelf is None:
        raise CosmoesError("readelf not found (binutils): cannot list the libraries the runner needs")
    proc = subprocess.run([readelf, "-d", "-W", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CosmoesError(f"readelf could not read {path}: {last_line(proc.stderr)}")
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", proc.stdout)


def _copy_out(result: NativeBuild, out: Path) -> NativeBuild:
    out.mkdir(parents=True, exist_ok=True)
    for path in [result.runner, *result.libraries]:
        if (out / path.name).is_symlink():
            (out / path.name).unlink()
        shutil.copy2(path, out / path.name, follow_symlinks=False)
    return NativeBuild(result.target, out / result.runner.name, out, [out / p.name for p in result.libraries],
                       result.build_dir, result.log, result.warnings, result.prefix)


# -- running under qemu-user --------------------------------------------------------------------------------------
def is_aarch64_elf(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return False
    return len(head) == 20 and head[:4] == b"\x7fELF" and head[5] == 1 and int.from_bytes(head[18:20], "little") == EM_AARCH64


def qemu_cpus() -> list[str]:
    """The CPU models this qemu-aarch64 emulates (``qemu-aarch64 -cpu help``)."""
    check_qemu()
    proc = subprocess.run([QEMU, "-cpu", "help"], capture_output=True, text=True, timeout=60)
    names = [ln.split()[0] for ln in proc.stdout.splitlines() if ln.startswith("  ") and ln.strip()]
    return names


def check_qemu_cpu(cpu: str) -> None:
    cpus = qemu_cpus()
    if cpu not in cpus:
        raise CosmoesError(f"{QEMU} does not emulate a CPU named {cpu!r}; it knows: {', '.join(cpus)}")


def qemu_version() -> str:
    proc = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=60)
    return (proc.stdout.splitlines() or ["unknown"])[0].strip()


def qemu_command(runner: str | Path, cpu: str = DEFAULT_QEMU_CPU, lib_dir: str | Path | None = None) -> list[str]:
    """The command line that runs an aarch64 ``runner`` under qemu-user, with its libraries from ``lib_dir``
    (default: the runner's directory) and the arm64 C library from the sysroot."""
    runner = Path(runner)
    lib_dir = Path(lib_dir) if lib_dir else runner.parent
    # -E sets the variable for the emulated program only: the x86 qemu itself must not load arm64 libraries
    return [QEMU, "-cpu", cpu, "-L", str(SYSROOT), "-E", f"LD_LIBRARY_PATH={lib_dir.resolve()}", str(runner)]


def run_qemu(bundle: str | Path, args: list[str], stats_path: Path, runner: str | Path,
             cpu: str = DEFAULT_QEMU_CPU, timeout: float | None = None) -> RunnerResult:
    """Run the aarch64 runner on a bundle under qemu-user; its stats JSON lands in ``stats_path``."""
    import json

    check_qemu()
    cmd = [*qemu_command(runner, cpu), str(bundle), *args, "--stats-json", str(stats_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CosmoesError(f"the emulated runner did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise CosmoesError(runner_error(proc.returncode, proc.stderr))
    stats = json.loads(Path(stats_path).read_text())
    return RunnerResult(tokens=list(stats["tokens"]), stats=stats)


def host_description() -> str:
    from cosmoes.system import cpu_name

    return f"{cpu_name()} ({platform.machine()})"


def _main(argv: list[str]) -> int:
    """`python -m cosmoes.runtime.cross wheels`: fetch the aarch64 wheels (used by tools.sh)."""
    if argv != ["wheels"]:
        print("usage: python -m cosmoes.runtime.cross wheels", file=sys.stderr)
        return 2
    try:
        wheels = ensure_wheels(progress=lambda line: print(line, file=sys.stderr))
    except CosmoesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"executorch: {wheels.executorch}\npytorch_tokenizers: {wheels.tokenizers}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
