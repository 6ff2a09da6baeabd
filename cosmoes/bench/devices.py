"""Where `cosmoes bench` runs the native runner: this machine, an Android phone over adb (§3.4.3, Table 4), or
an emulated arm64 CPU (qemu-user).

Every device takes runner flags and returns the runner's JSON statistics. The adb device pushes the runner, its
shared libraries, the bundle and the prompt under /data/local/tmp/cosmoes/ (skipping files whose sha256 already
matches on the phone), runs it over `adb shell` and pulls the statistics back; with `--app` it runs the installed
demo app's BenchActivity instead (the app's own libcosmoes through the Kotlin library module), with the bundle and
prompt under the app's external files directory. The qemu device runs the
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
import time
from pathlib import Path
from typing import Callable

from cosmoes.errors import CosmoesError
from cosmoes.artifacts import MANIFEST_NAME
from cosmoes.export.manifest import Manifest, sha256_file
from cosmoes.runtime.native import build_runner, last_line, run_local, runner_error
from cosmoes.system import cpu_name, usable_cores

REMOTE_ROOT = "/data/local/tmp/cosmoes"


def parse_device(spec: str) -> tuple[str, str | None]:
    """``local`` | ``adb`` | ``adb:SERIAL`` | ``qemu`` | ``qemu:CPU`` | ``ios`` as (kind, serial or CPU model);
    anything else is a one-line error."""
    if spec in ("local", "ios"):  # ios: statistics collected on an iPhone (cosmoes/bench/ios.py)
        return spec, None
    for kind in ("adb", "qemu"):
        if spec == kind or spec.startswith(f"{kind}:"):
            return kind, spec.partition(":")[2] or None
    raise CosmoesError(f"unknown device {spec!r}: use local, adb, adb:SERIAL, qemu or qemu:CPU, or ios "
                       "(statistics files collected on an iPhone)")


def open_device(spec: str, runner: str | None, log: Callable[[str], None], app: bool = False):
    kind, detail = parse_device(spec)
    if app:  # the demo app's BenchActivity on an adb device instead of a pushed runner
        return AppDevice.open(kind, detail, runner, log)
    if kind == "local":
        return LocalDevice(runner, log)
    if kind == "qemu":
        return QemuDevice(detail, runner, log)
    if kind == "ios":  # nothing here can drive an iPhone: its runs are read from files (cosmoes bench --stats)
        from cosmoes.bench.ios import HOW_TO_COLLECT

        raise CosmoesError(HOW_TO_COLLECT)
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
        self._connect(serial, log)
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
    def _connect(self, serial: str | None, log: Callable[[str], None]) -> None:
        self.serial, self.log = serial, log
        self.adb = os.environ.get("COSMOES_ADB") or shutil.which("adb")
        if not self.adb:
            raise CosmoesError("adb not found: install Android platform-tools or set COSMOES_ADB")

    def _name(self) -> str:
        return f"adb device {self.serial}" if self.serial else "the adb device"

    def _adb(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [self.adb, *(["-s", self.serial] if self.serial else []), *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout)
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
        files = [(self.runner, self.remote_runner, None)]
        files += [(lib, f"{REMOTE_ROOT}/lib/{lib.name}", None) for lib in sorted(self.runner.parent.glob("*.so"))]
        self._push_all(files + self._bundle_files(bundle, manifest, prompt_file))
        self.shell(shlex.join(["chmod", "755", self.remote_runner]))

    def _bundle_files(self, bundle: Path, manifest: Manifest, prompt_file: Path) -> list[tuple]:
        """(local, remote, sha256 or None) of the prompt, the manifest, the programs and the experts' segment file,
        under self.bundle_dir."""
        files = [(prompt_file, self.prompt_path, None),
                 (bundle / MANIFEST_NAME, f"{self.bundle_dir}/{MANIFEST_NAME}", None)]
        # the programs' hashes are in the verified manifest: no need to hash hundreds of MB again
        return files + [(bundle / p["file"], f"{self.bundle_dir}/{p['file']}", p["sha256"])
                        for p in manifest.stored_files()]

    def _push_all(self, files: list[tuple]) -> None:
        pushed = [remote for local, remote, sha in files if self.push(local, remote, sha)]
        self.log(f"adb: pushed {len(pushed)} of {len(files)} files ({len(files) - len(pushed)} already on the device)")

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
        return self._pull_json(stats, "runner")

    def _pull_json(self, remote: str, writer: str) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            self._adb("pull", remote, f"{tmp}/stats.json", timeout=120)
            try:
                return json.loads(Path(f"{tmp}/stats.json").read_text())
            except (OSError, ValueError) as exc:  # a writer killed mid-write leaves a torn file
                raise CosmoesError(f"on {self._name()}: unreadable {writer} statistics ({exc})") from None


APP_PACKAGE = "org.cosmoes.demo"
APP_ACTIVITY = f"{APP_PACKAGE}/.BenchActivity"
APP_ROOT = f"/sdcard/Android/data/{APP_PACKAGE}/files"  # the app's external files dir: adb writes it without root
# The runner flags `cosmoes bench` builds and the BenchActivity extras that carry them (android_demo/README.md)
APP_EXTRAS = {"--prompt-file": "prompt", "--gen": "gen", "--warmup": "warmup", "--repeats": "repeats",
              "--policy": "policy", "--budget-mb": "budget_mb", "--threads": "threads"}
APP_SWITCHES = {"--prefetch": "prefetch"}  # runner flags without a value: an extra "true"


class AppDevice(AdbDevice):
    """The installed demo app on an Android device over adb (`--device adb --app`): its BenchActivity benchmarks the
    bundle with the app's own libcosmoes (the Kotlin library module over JNI, BenchRun) instead of a pushed runner.
    The bundle and prompt are pushed under the app's external files dir; the activity writes the statistics JSON
    there (or {"error": ...}), which is polled for and pulled."""

    POLL_S = 0.5

    @classmethod
    def open(cls, kind: str, serial: str | None, runner: str | None, log: Callable[[str], None]) -> "AppDevice":
        if kind != "adb":
            raise CosmoesError(f"--app runs the demo app on an Android device: use --device adb or adb:SERIAL, "
                               f"not {kind}")
        if runner:
            raise CosmoesError("--app runs the installed demo app, which carries its own library: leave --runner out")
        return cls(serial, log)

    def __init__(self, serial: str | None, log: Callable[[str], None]):  # no runner: AdbDevice's checks minus that
        self._connect(serial, log)
        self._check_state()
        installed = self.shell(shlex.join(["pm", "path", APP_PACKAGE]), timeout=60, check=False)
        if installed.returncode != 0 or "package:" not in installed.stdout:
            raise CosmoesError(f"the demo app is not installed on {self._name()}: see android_demo/README.md")
        self.bundle_dir = ""
        self.prompt_path = f"{APP_ROOT}/prompt.txt"

    def info(self) -> dict:
        return {**super().info(), "client": "android-app", "app": APP_PACKAGE}

    def prepare(self, bundle: Path, manifest: Manifest, prompt_file: Path) -> None:
        """Push the bundle (its tokenizer too: the app's session opens it) and the prompt, skipping what is there."""
        self.bundle_dir = f"{APP_ROOT}/bundles/{bundle.resolve().name}"
        files = []
        if manifest.tokenizer and (bundle / manifest.tokenizer).is_dir():
            files += [(f, f"{self.bundle_dir}/{f.relative_to(bundle).as_posix()}", None)
                      for f in sorted((bundle / manifest.tokenizer).rglob("*")) if f.is_file() and not f.is_symlink()]
        self._push_all(self._bundle_files(bundle, manifest, prompt_file) + files)

    def extras(self, args: list[str]) -> list[str]:
        """The runner flags as `--es KEY VALUE` words; the app has no probe (the roofline and read-time columns stay
        empty) and decodes greedily."""
        words, rest = ["--es", "bundle", self.bundle_dir], list(args)
        while rest:
            flag = rest.pop(0)
            if flag == "--probe":
                continue
            if flag in APP_SWITCHES:
                words += ["--es", APP_SWITCHES[flag], "true"]
                continue
            if flag not in APP_EXTRAS or not rest:
                raise CosmoesError(f"--app cannot pass {flag} to the demo app (it takes "
                                   f"{', '.join([*APP_EXTRAS, *APP_SWITCHES])})")
            words += ["--es", APP_EXTRAS[flag], rest.pop(0)]
        return words

    def run(self, args: list[str], timeout: float) -> dict:
        stats = f"{APP_ROOT}/stats.json"
        self.shell(shlex.join(["rm", "-f", stats]), timeout=60)
        # one string for the phone's sh: every word quoted (a bundle folder named `x; rm -rf ~` stays a name)
        start = self.shell(shlex.join(["am", "start", "-W", "-n", APP_ACTIVITY, *self.extras(args),
                                       "--es", "stats", stats]), timeout=120, check=False)
        errors = [ln.strip() for ln in (start.stdout + start.stderr).splitlines() if ln.startswith("Error")]
        if start.returncode != 0 or errors:
            raise CosmoesError(f"on {self._name()}: am start {APP_ACTIVITY} failed: "
                               f"{errors[-1] if errors else last_line(start.stderr or start.stdout)}")
        self._wait_for(stats, timeout)
        result = self._pull_json(stats, "app")
        if "error" in result:
            raise CosmoesError(f"on {self._name()}: {result['error']}")
        return result

    def _wait_for(self, path: str, timeout: float) -> None:
        """BenchActivity benchmarks on a background thread after `am start -W` returns: wait for its file."""
        deadline = time.monotonic() + timeout
        while self.shell(shlex.join(["test", "-f", path]), timeout=60, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise CosmoesError(f"{self._name()}: the demo app wrote no statistics to {path} within {timeout:.0f} s "
                                   "(adb logcat shows why)")
            time.sleep(self.POLL_S)
