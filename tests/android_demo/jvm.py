"""Builds the JVM half of the Android library module for the tests: the JNI shim (g++ against the JDK's jni.h and the
installed libcosmoes) and the Kotlin sources with the test drivers (kotlinc), cached under ~/.cache/cosmoes by a hash
of everything that goes in, so a test session compiles at most once."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cosmoes.runtime.native import cache_root, install_library, source_hash

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "android_demo" / "tools.sh"
MODULE = REPO / "android_demo" / "cosmoes" / "src" / "main"
DRIVERS = Path(__file__).resolve().parent
JAVA_HOME = Path(os.environ.get("COSMOES_JAVA_HOME", "/usr/lib/jvm/java-17-openjdk-amd64"))  # JDK 17, as Android's


@dataclass
class JvmBuild:
    dir: Path  # classpath (one line), libcosmoes_jni.so, classes/, prefix/ (the installed libcosmoes)
    classpath: str
    jni: Path
    compile_s: float  # kotlinc's wall time when this build was made (0 when it came from the cache)

    def java(self, main: str, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(JAVA_HOME / "bin" / "java"), f"-Dcosmoes.jni={self.jni}", "-cp", self.classpath,
                               main, *args], capture_output=True, timeout=timeout, env=env)


def tools() -> dict[str, str] | str:
    """kotlinc, the Kotlin jars and org.json as installed by android_demo/tools.sh, or why they cannot be used."""
    if not (JAVA_HOME / "bin" / "java").is_file() or not (JAVA_HOME / "include" / "jni.h").is_file():
        return f"no JDK 17 at {JAVA_HOME} (android_demo/tools.sh install)"
    if subprocess.run([str(TOOLS), "check"]).returncode != 0:
        return "kotlinc or org.json missing: run android_demo/tools.sh install (make setup does)"
    out = subprocess.run([str(TOOLS), "env"], capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def build_or_skip() -> "JvmBuild":
    """The JVM build for a test, or the test skipped saying which tool is missing."""
    import pytest

    env = tools()
    if isinstance(env, str):
        pytest.skip(env)
    return build(env)


def _sources() -> list[Path]:
    return sorted((MODULE / "kotlin").rglob("*.kt")) + sorted(DRIVERS.glob("*.kt"))


def _key(env: dict[str, str]) -> str:
    h = hashlib.sha256(source_hash().encode())  # the native library's own sources
    for path in [*_sources(), MODULE / "cpp" / "cosmoes_jni.cpp"]:
        h.update(path.name.encode() + path.read_bytes())
    h.update(f"{env['KOTLINC']} {JAVA_HOME}".encode())
    return h.hexdigest()[:16]


def _run(cmd: list[str], what: str, **kwargs) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stdout}\n{proc.stderr}")


def build(env: dict[str, str]) -> JvmBuild:
    """The JNI shim and the compiled classes, built unless the cache has them."""
    out = cache_root() / f"jvm-{_key(env)}"
    lib = Path(env["KOTLIN_LIB"])
    classpath = ":".join([str(out / "classes"), str(lib / "kotlin-stdlib.jar"),
                          str(lib / "kotlinx-coroutines-core-jvm.jar"), env["ANDROID_JSON_JAR"]])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "classpath").is_file():
            return JvmBuild(out, classpath, out / "libcosmoes_jni.so", 0.0)
        for stale in ("classes", "prefix"):
            shutil.rmtree(out / stale, ignore_errors=True)
        prefix = install_library(out / "prefix")
        include = JAVA_HOME / "include"
        _run(["g++", "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", f"-I{include}",
              f"-I{include / 'linux'}", f"-I{prefix / 'include'}", str(MODULE / "cpp" / "cosmoes_jni.cpp"),
              f"-L{prefix / 'lib'}", "-lcosmoes", f"-Wl,-rpath,{prefix / 'lib'}", "-o", str(out / "libcosmoes_jni.so")],
             "building the JNI shim")
        t0 = time.monotonic()
        _run([env["KOTLINC"], "-jvm-target", "17", "-cp", classpath, "-d", str(out / "classes"),
              *map(str, _sources())], "kotlinc", env={**os.environ, "JAVA_HOME": str(JAVA_HOME)})
        compile_s = time.monotonic() - t0
        (out / "classpath").write_text(classpath + "\n")
    return JvmBuild(out, classpath, out / "libcosmoes_jni.so", compile_s)
