"""Where `cosmoes bench` runs the native runner: this machine, an Android phone over adb (§3.4.3, Table 4), or
an emulated arm64 CPU (qemu-user).

Every device takes runner flags and returns the runner's JSON statistics. The adb device pushes the runner, its
shared libraries, the bundle and the prompt under /data/local/tmp/cosmoes/ (skipping files whose sha256 already
matches on the phone), runs it over `adb shell` and pulls the statistics back. The qemu device runs the
linux-aarch64 build of the runner (cross-built on first use, cosmoes/runtime/cross.py) under `qemu-aarch64 -cpu
CPU`: the same tokens and expert traffic as on an arm64 device, with emulated timings (labelled so).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from cosmoes.errors import CosmoesError
from cosmoes.artifacts import MANIFEST_NAME
from cosmoes.export.manifest import Manifest, sha256_file
from cosmoes.runtime.native import build_runner, last_line, run_local, runner_error
from cosmoes.system import cpu_name, usable_cores

REMOTE_ROOT = "/data/local/tmp/cosmoes"


def parse_device(spec: str) -> tuple[str, str | None]:
    """``local`` | ``adb`` | ``adb:SERIAL`` | ``qemu`` | ``qemu:CPU`` as (kind, serial or CPU model); anything else
    is a one-line error."""
    if spec == "local":
        return "local", None
    for kind in ("adb", "qemu"):
        if spec == kind or spec.startswith(f"{kind}:"):
            return kind, spec.partition(":")[2] or None
    raise CosmoesError(f"unknown device {spec!r}: use local, adb, adb:SERIAL, qemu or qemu:CPU")


def open_device(spec: str, runner: str | None, log: Callable[[str], None]):
    kind, detail = parse_device(spec)
    if kind == "local":
        return LocalDevice(runner, log)
    if kind == "qemu":
        return QemuDevice(detail, runner, log)
    return AdbDevice(detail, runner, log)


class LocalDevice:
    """This machine: the host runner, built on first use (or the binary given)."""

    def __init__(self, runner: str | None, log: Callable[[str], None]):
        self.runner = Path(runner) if runner else build_runner(log)
        if not self.runner.is_file():
            raise CosmoesError(f"runner not found: {self.runner}")
        self.bundle: Path | None = None
        self.prompt_path = ""

    def info(self) -> dict:
        return {"kind": "local", "host": platform.node(), "cpu": cpu_name(), "cores": usable_cores(),
                "os": platform.platform()}

    def prepare(self, bundle: Path, manifest: Manifest, prompt_file: Path) -> None:
        self.bundle, self.prompt_path = bundle, str(prompt_file)

    def run(self, args: list[str], timeout: float) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            return run_local(self.bundle, args, Path(tmp) / "stats.json", exe=self.runner, timeout=timeout).stats


class QemuDevice:
    """An emulated arm64 CPU on this machine: the linux-aarch64 runner (cross-built on first use, or the binary
    given, with its libraries beside it) under ``qemu-aarch64 -cpu CPU`` (default ``max``). Tokens and expert traffic
    are an arm64 build's; the timings are emulated, and every row and the device record say so."""

    def __init__(self, cpu: str | None, runner: str | None, log: Callable[[str], None]):
        from cosmoes.runtime import cross

        self.cross, self.log = cross, log
        self.cpu = cpu or cross.DEFAULT_QEMU_CPU
        cross.check_qemu_cpu(self.cpu)
        self.runner = Path(runner) if runner else cross.build_native("linux-aarch64", progress=log).runner
        if not self.runner.is_file():
            raise CosmoesError(f"runner not found: {self.runner}")
        if not cross.is_aarch64_elf(self.runner):
            raise CosmoesError(f"{self.runner} is not an aarch64 program: --device qemu runs the linux-aarch64 "
                               "runner (cosmoes native build --target linux-aarch64, or leave --runner out)")
        self.bundle: Path | None = None
        self.prompt_path = ""

    def info(self) -> dict:
        return {"kind": "qemu", "emulated": True, "model": f"qemu-aarch64 -cpu {self.cpu} (emulated)",
                "cpu": self.cpu, "emulator": self.cross.qemu_version(), "abi": "linux-aarch64",
                "timings": "emulated: qemu-user translating arm64 code on this host, not an arm64 device's speed",
                "host": platform.node(), "host_cpu": cpu_name(), "host_cores": usable_cores(),
                "os": platform.platform()}

    def prepare(self, bundle: Path, manifest: Manifest, prompt_file: Path) -> None:
        self.bundle, self.prompt_path = bundle, str(prompt_file)
        self.log(f"qemu: {self.runner} under qemu-aarch64 -cpu {self.cpu} on {cpu_name()}: timings are emulated")

    def run(self, args: list[str], timeout: float) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            stats = self.cross.run_qemu(self.bundle, args, Path(tmp) / "stats.json", self.runner, self.cpu,
                                        timeout=timeout).stats
        stats["emulated"] = True
        stats["timing"] = f"emulated (qemu-aarch64 -cpu {self.cpu})"
        return stats


class AdbDevice:
    """An Android device over adb (the `adb` on PATH, or $COSMOES_ADB)."""

    def __init__(self, serial: str | None, runner: str | None, log: Callable[[str], None]):
        self.serial, self.log = serial, log
        self.adb = os.environ.get("COSMOES_ADB") or shutil.which("adb")
        if not self.adb:
            raise CosmoesError("adb not found: install Android platform-tools or set COSMOES_ADB")
        if not runner:
            raise CosmoesError("an adb device needs a runner binary: cosmoes_runner built for Android arm64-v8a "
                               "(see export/README.md)")
        self.runner = Path(runner)
        if not self.runner.is_file():
            raise CosmoesError(f"runner not found: {self.runner}")
        self._check_state()
        self.bundle_dir = ""
        self.prompt_path = f"{REMOTE_ROOT}/prompt.txt"

    # -- adb plumbing -------------------------------------------------------------------------------------------
    def _name(self) -> str:
        return f"adb device {self.serial}" if self.serial else "the adb device"

    def _adb(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [self.adb, *(["-s", self.serial] if self.serial else []), *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CosmoesError(f"{self._name()} did not answer `adb {args[0]}` within {timeout:.0f} s") from None
        if check and proc.returncode != 0:
            raise CosmoesError(f"adb {args[0]} failed on {self._name()}: {last_line(proc.stderr or proc.stdout)}")
        return proc

    def _check_state(self) -> None:
        proc = self._adb("get-state", timeout=30, check=False)
        state = proc.stdout.strip()
        if proc.returncode == 0 and state == "device":
            return
        text = f"{proc.stdout} {proc.stderr}".lower()
        if "unauthorized" in text:
            raise CosmoesError(f"{self._name()} is unauthorized: accept the USB-debugging prompt on the phone")
        if "offline" in text:
            raise CosmoesError(f"{self._name()} is offline: reconnect it (adb reconnect)")
        raise CosmoesError(f"{self._name()} is not reachable: {last_line(proc.stderr or proc.stdout)}")

    def shell(self, command: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``command`` with the phone's sh: whoever builds it quotes each word (shlex.join)."""
        return self._adb("shell", command, timeout=timeout, check=check)

    def info(self) -> dict:
        props = {"model": "ro.product.model", "soc": "ro.soc.model", "board": "ro.board.platform",
                 "android": "ro.build.version.release", "abi": "ro.product.cpu.abi"}
        out = {"kind": "adb", "serial": self.serial}
        for key, prop in props.items():
            out[key] = self.shell(shlex.join(["getprop", prop]), timeout=30, check=False).stdout.strip()
        return out

    # -- files --------------------------------------------------------------------------------------------------
    def push(self, local: Path, remote: str, sha256: str | None = None) -> bool:
        """Push unless the device already has the same bytes (``sha256``: the local file's, if already known)."""
        have = self.shell(f"{shlex.join(['sha256sum', remote])} 2>/dev/null", check=False).stdout.split()
        if have and have[0] == (sha256 or sha256_file(local)):
            return False
        self.shell(shlex.join(["mkdir", "-p", remote.rsplit("/", 1)[0]]))
        self._adb("push", str(local), remote, timeout=3600)
        return True

    def prepare(self, bundle: Path, manifest: Manifest, prompt_file: Path) -> None:
        """Push what the run needs; ``manifest`` was loaded (and its programs verified) by the caller."""
        self.bundle_dir = f"{REMOTE_ROOT}/bundles/{bundle.resolve().name}"
        files = [(self.runner, self.remote_runner, None),
                 (prompt_file, self.prompt_path, None),
                 (bundle / MANIFEST_NAME, f"{self.bundle_dir}/{MANIFEST_NAME}", None)]
        files += [(lib, f"{REMOTE_ROOT}/lib/{lib.name}", None) for lib in sorted(self.runner.parent.glob("*.so"))]
        # the programs' hashes are in the verified manifest: no need to hash hundreds of MB again
        files += [(bundle / p["file"], f"{self.bundle_dir}/{p['file']}", p["sha256"])
                  for p in manifest.programs.values()]
        pushed = [remote for local, remote, sha in files if self.push(local, remote, sha)]
        self.log(f"adb: pushed {len(pushed)} of {len(files)} files ({len(files) - len(pushed)} already on the device)")
        self.shell(shlex.join(["chmod", "755", self.remote_runner]))

    @property
    def remote_runner(self) -> str:
        return f"{REMOTE_ROOT}/bin/{self.runner.name}"

    def run(self, args: list[str], timeout: float) -> dict:
        # `adb shell` hands one string to the phone's sh: every word built from a user's path or value (the runner's
        # file name, the bundle folder's name, prompt and flags) is quoted, so a folder named `x; rm -rf ~` is a name
        stats = f"{REMOTE_ROOT}/out/stats.json"
        command = " && ".join([shlex.join(["mkdir", "-p", f"{REMOTE_ROOT}/out"]), shlex.join(["rm", "-f", stats]),
                               shlex.join(["cd", REMOTE_ROOT]),
                               "LD_LIBRARY_PATH=" + shlex.quote(f"{REMOTE_ROOT}/lib") + " "
                               + shlex.join([self.remote_runner, self.bundle_dir, *args, "--stats-json", stats])])
        proc = self.shell(command, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise CosmoesError(f"on {self._name()}: {runner_error(proc.returncode, proc.stderr + proc.stdout)}")
        with tempfile.TemporaryDirectory() as tmp:
            self._adb("pull", stats, f"{tmp}/stats.json", timeout=120)
            try:
                return json.loads(Path(f"{tmp}/stats.json").read_text())
            except (OSError, ValueError) as exc:  # a runner killed mid-write leaves a torn file
                raise CosmoesError(f"on {self._name()}: unreadable runner statistics ({exc})") from None
