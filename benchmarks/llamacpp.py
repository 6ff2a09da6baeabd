"""llama.cpp, the peer runtime: built from PyPI's llama-cpp-python sdist and run on a GGUF for speed and peak RSS.

No llama.cpp code lives in this repository: `build_llamacpp` downloads the pinned sdist at run time, unpacks its
vendor/llama.cpp and builds `llama-bench` and `llama-simple` (CPU only, static) into a per-version, per-ISA cache.
`run_llamacpp` takes the prefill and decode speeds from llama-bench (random tokens, so no tokenizer is involved)
and the peak RSS from a separate llama-simple generation, as the OS counts it for that child alone.

    python benchmarks/llamacpp.py model.gguf --threads 1 --prompt-tokens 64 --gen 64
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

VERSION = "0.3.36"  # newest llama-cpp-python sdist on PyPI when this was written; pinned so results stay comparable
TARGETS = ("llama-simple", "llama-bench")
JOBS = 2

# x86 instruction sets ggml takes as options, and the /proc/cpuinfo flags each needs. GGML_NATIVE=OFF with these
# spelled out (instead of -march=native) so that AMX stays off: these hosts report AMX but trap on it.
ISA_OPTIONS = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_BMI2": ("bmi2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    # ggml's AVX512 option compiles with -mavx512f/cd/vl/dq/bw together
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_BF16": ("avx512_bf16",),
}
ALWAYS_OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")

# CPU only, static, and nothing that reaches the network at configure time: the server target pulls web UI assets
# from Hugging Face, so it stays off; LLAMA_CURL is only a deprecated no-op in this version, kept for older ones.
BASE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=ON",  # llama-simple lives in examples/
    "-DLLAMA_BUILD_TOOLS=ON",  # llama-bench lives in tools/
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_BLAS=OFF",
)


class BuildError(RuntimeError):
    """A failed download, configure or build; the message is one line."""

    def __init__(self, msg: str):
        super().__init__(" ".join(str(msg).split())[:500])  # some errors (tarfile's) span lines


def _log(msg: str) -> None:
    print(f"llamacpp: {msg}", file=sys.stderr, flush=True)


# What a failing log's telling line looks like, most specific first: ggml's GGUF parser and llama.cpp's loader name
# the bad key or tensor; cmake puts its message on the line after "CMake Error"; then compilers' and pip's "error".
REASONS = (r"^gguf_\w+: .*(fail|error|invalid)", r"error loading model", r"CMake Error", r"\berror\b:",
           r"fail|exception|what\(\)|abort|segmentation")
NOISE = re.compile(r"^(g?make(\[\d+\])?: \*\*\*|ninja: build stopped|\*\*\*|-- Configuring incomplete)")


def _reason(text: str, last: bool = False, limit: int = 300) -> str:
    """The one line of a log that says what went wrong: the first match of the most specific pattern (the last for
    pip, whose final ERROR is the verdict); never make's trailing summary."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not NOISE.search(ln.strip())]
    order = list(enumerate(lines))[::-1] if last else list(enumerate(lines))
    for pat in REASONS:
        for i, ln in order:
            if re.search(pat, ln, re.IGNORECASE):
                if pat == "CMake Error" and i + 1 < len(lines):
                    ln = f"{ln} {lines[i + 1]}"
                return ln[:limit]
    return (lines[-1] if lines else "no output")[:limit]


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return set(m.group(1).split()) if m else set()


def isa_flags(flags: set[str] | None = None) -> list[str]:
    """The -DGGML_* instruction-set flags for this host."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return ["-DGGML_NATIVE=ON"]  # no AMX off x86, and no x86 options to spell out
    flags = cpu_flags() if flags is None else flags
    out = ["-DGGML_NATIVE=OFF"]
    out += [f"-D{opt}={'ON' if all(f in flags for f in need) else 'OFF'}" for opt, need in ISA_OPTIONS.items()]
    return out + [f"-D{opt}=OFF" for opt in ALWAYS_OFF]


def isa_tag(isa: list[str] | None = None) -> str:
    """Short cache key: the widest vector ISA plus a hash of every flag, so hosts that differ don't share binaries."""
    isa = isa_flags() if isa is None else isa
    on = {f[2:-3] for f in isa if f.endswith("=ON")}
    top = next((t for t in ("AVX512", "AVX2", "AVX", "SSE42") if f"GGML_{t}" in on), platform.machine().lower())
    return f"{top.lower()}-{hashlib.sha1(' '.join(sorted(isa)).encode()).hexdigest()[:6]}"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "cosmoes" / f"llama.cpp-{VERSION}-{isa_tag()}"


def _run_logged(cmd: list[str], log: Path, what: str, progress: bool = False, last: bool = False) -> None:
    """Run cmd with its output appended to log; on failure raise BuildError with the log's telling line."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        except OSError as e:  # cmake (or pip's python) not installed
            raise BuildError(f"{what}: {e}") from None
        out = []
        last_pct, last_t = None, 0.0
        for line in proc.stdout:
            f.write(line)
            out.append(line)
            m = re.match(r"\[\s*(\d+)%\]", line) if progress else None
            # throttled: a percentage line every 15 s is enough to show the build is alive
            if m and m.group(1) != last_pct and time.monotonic() - last_t > 15:
                last_pct, last_t = m.group(1), time.monotonic()
                _log(line.strip()[:120])
        rc = proc.wait()
    if rc:
        raise BuildError(f"{what} failed (exit {rc}): {_reason(''.join(out[-400:]), last)} [log: {log}]")


def _download(version: str, dest: Path, log: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    have = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not have:
        _log(f"downloading llama-cpp-python=={version} sdist")
        cmd = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-binary", ":all:",
               "--no-deps", "-d", str(dest)]
        _run_logged(cmd, log, "download", last=True)
        have = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not have:
        raise BuildError(f"download: pip left no llama_cpp_python-{version}.tar.gz in {dest}")
    return have[0]


def _unpack(sdist: Path, dest: Path) -> Path:
    """Extract only vendor/llama.cpp (the sdist also carries the Python bindings and a .git we don't need)."""
    if (dest / "CMakeLists.txt").exists():
        return dest
    _log(f"unpacking {sdist.name}")
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".unpack-"))
    try:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
            tar.extractall(tmp, members=members, filter="data")
    except (tarfile.TarError, OSError) as e:  # a truncated download, a full disk
        raise BuildError(f"unpack {sdist.name}: {e}") from None
    if not members:
        raise BuildError(f"unpack: no vendor/llama.cpp in {sdist.name}")
    src = next(tmp.glob("*/vendor/llama.cpp"))
    shutil.rmtree(dest, ignore_errors=True)
    src.rename(dest)
    shutil.rmtree(tmp)
    return dest


def _have_binaries(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / t, os.X_OK) for t in TARGETS)


def build_llamacpp(cache_dir: Path | None = None, version: str = VERSION, jobs: int = JOBS,
                   isa: list[str] | None = None) -> Path:
    """Build (once; cached in cache_dir) llama-simple and llama-bench; returns the directory holding them.

    isa: the -DGGML_* instruction-set flags (default: this host's, isa_flags()); a capped set builds for less."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    bin_dir = cache_dir / "bin"
    if _have_binaries(bin_dir):
        return bin_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    log = cache_dir / "build.log"
    t0 = time.monotonic()
    sdist = _download(version, cache_dir / "dl", log)
    src = _unpack(sdist, cache_dir / "src")
    build = cache_dir / "build"
    flags = [*BASE_FLAGS, *(isa_flags() if isa is None else isa)]
    _log(f"configuring: cmake {' '.join(flags)}")
    _run_logged(["cmake", "-S", str(src), "-B", str(build), *flags], log, "cmake configure")
    _log(f"building {' '.join(TARGETS)} with -j{jobs} (several minutes)")
    cmd = ["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs), "--target", *TARGETS]
    _run_logged(cmd, log, "cmake build", progress=True)
    # Static binaries: copy them out and drop the sources, objects and sdist (~0.4 GB), keeping the cache small.
    tmp_bin = cache_dir / ".bin-tmp"
    shutil.rmtree(tmp_bin, ignore_errors=True)
    tmp_bin.mkdir()
    for t in TARGETS:
        found = next((p for p in (build / "bin" / t, build / "bin" / "Release" / t) if p.exists()), None)
        if found is None:
            raise BuildError(f"cmake build: {t} not found under {build / 'bin'} [log: {log}]")
        shutil.copy2(found, tmp_bin / t)
    shutil.rmtree(bin_dir, ignore_errors=True)
    tmp_bin.rename(bin_dir)
    for d in (build, src, cache_dir / "dl"):
        shutil.rmtree(d, ignore_errors=True)
    _log(f"built in {time.monotonic() - t0:.0f} s -> {bin_dir}")
    return bin_dir


def _hwm_kib(pid: int) -> int | None:
    """The process's own peak RSS (VmHWM, KiB) while it runs; None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _run_measured(cmd: list[str], timeout: float) -> tuple[int, str, str, float]:
    """Run cmd; returns (exit code, stdout, stderr, peak RSS in MB of that child alone).

    The peak is the child's VmHWM, read every 10 ms until it exits (it only grows, so the last reading holds the
    peak up to then). Not ru_maxrss: Linux carries the high-water mark of the forked copy of this (Python) process
    into the exec'd child's, which made a 0.46 GB llama-simple read as 2.2 GB beside a 2 GB parent. Where /proc has
    no reading (another OS, a child that exits at once) ru_maxrss of that child is the fallback."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        # output to files, not pipes: we reap with wait4 ourselves, so nothing would drain a pipe
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        deadline, peak_kib = time.monotonic() + timeout, None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
            hwm = _hwm_kib(proc.pid)
            if hwm is not None:
                peak_kib = max(peak_kib or 0, hwm)
            time.sleep(0.01)
        proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen doesn't try to reap it again
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if peak_kib is not None:
        return proc.returncode, stdout, stderr, peak_kib * 1024 / 1e6
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return proc.returncode, stdout, stderr, usage.ru_maxrss * scale / 1e6


def _fail(what: str, rc: int, stderr: str, timeout: float) -> str:
    if rc in (-9, 137):
        return f"{what}: timed out after {timeout:g} s"
    return f"{what}: exit {rc}: {_reason(stderr)}"


def _parse_bench(stdout: str) -> list[dict]:
    """llama-bench -o json prints one JSON array; anything around it (stray log lines) is skipped."""
    start, end = stdout.find("["), stdout.rfind("]")
    if start < 0 or end < start:
        raise ValueError("no JSON array in llama-bench output")
    rows = json.loads(stdout[start:end + 1])
    if not isinstance(rows, list) or not rows:
        raise ValueError("empty llama-bench result")
    return rows


def _bench_speeds(rows: list[dict]) -> dict:
    """prefill: the -p test (n_prompt > 0, n_gen 0); decode: the -n test (n_gen > 0, n_prompt 0)."""
    pp = next((r for r in rows if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0), None)
    tg = next((r for r in rows if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0), None)
    if pp is None or tg is None:
        raise ValueError("llama-bench output lacks a prefill or a decode row")
    first = rows[0]
    return {
        "decode_tok_s": round(float(tg["avg_ts"]), 2),
        "decode_tok_s_std": round(float(tg.get("stddev_ts", 0.0)), 2),
        "prefill_tok_s": round(float(pp["avg_ts"]), 2),
        "prefill_tok_s_std": round(float(pp.get("stddev_ts", 0.0)), 2),
        "model_type": first.get("model_type"),
        "model_size_mb": round(first.get("model_size", 0) / 1e6, 3),
        "model_n_params": first.get("model_n_params"),
        "build_commit": first.get("build_commit"),
        "cpu_info": first.get("cpu_info"),
    }


def _simple_stats(stderr: str) -> dict:
    """What llama-simple reports of its own run: prompt length and decode speed (for a cross-check)."""
    out = {}
    m = re.search(r"decoded (\d+) tokens in ([\d.]+) s, speed: ([\d.]+) t/s", stderr)
    if m:
        out["simple_decoded"], out["simple_decode_tok_s"] = int(m.group(1)), float(m.group(3))
    m = re.search(r"prompt eval time\s*=.*?/\s*(\d+) tokens", stderr)
    if m:
        out["simple_prompt_tokens"] = int(m.group(1))
    return out


def _prompt(n_tokens: int) -> str:
    # One common word per token in a byte-level BPE vocabulary (a GGUF that asks for BOS gets one more); llama-simple
    # sizes its context from what it tokenizes, and the count it saw is returned as simple_prompt_tokens.
    return " ".join(["the"] * max(1, n_tokens))


def run_llamacpp(binary_dir: Path, gguf: Path, prompt_tokens: int = 64, gen: int = 64, threads: int = 1,
                 ctx: int | None = None, repetitions: int = 3, timeout: float = 900) -> dict:
    """Speeds (llama-bench) and peak RSS (llama-simple, else llama-bench) of llama.cpp on gguf; {"error"} on failure.

    Neither tool takes a context size: llama-bench sizes it to p+n per test and llama-simple to its prompt+n-1,
    so ctx (default prompt_tokens + gen) is only recorded. llama-simple takes no thread count either (it runs
    llama.cpp's default of 4); its speed is a cross-check, the reported speeds are llama-bench's at `threads`."""
    binary_dir, gguf = Path(binary_dir), Path(gguf)
    if not gguf.exists():
        return {"error": f"no such GGUF: {gguf}"}
    # llama-simple first: it logs the loader's messages, which name what is wrong with a GGUF llama-bench rejects
    # silently; its peak RSS is that of a plain generation.
    simple_cmd = [str(binary_dir / "llama-simple"), "-m", str(gguf), "-n", str(gen), _prompt(prompt_tokens)]
    simple = _run_or_oserror(simple_cmd, timeout)
    bench_cmd = [str(binary_dir / "llama-bench"), "-m", str(gguf), "-p", str(prompt_tokens), "-n", str(gen),
                 "-t", str(threads), "-r", str(repetitions), "-o", "json"]
    rc, stdout, stderr, bench_rss = _run_or_oserror(bench_cmd, timeout)
    if rc:
        why = _fail("llama-bench", rc, stderr, timeout)
        if simple[0]:
            why += f"; {_fail('llama-simple', simple[0], simple[2], timeout)}"
        return {"error": why, "cmd": " ".join(bench_cmd)}
    try:
        result = _bench_speeds(_parse_bench(stdout))
    except (ValueError, KeyError, TypeError) as e:
        return {"error": f"llama-bench output: {e}", "cmd": " ".join(bench_cmd)}
    result.update(cmd=" ".join(bench_cmd), threads=threads, prompt_tokens=prompt_tokens, gen=gen,
                  ctx=ctx or prompt_tokens + gen, llamacpp_version=VERSION)
    if simple[0] == 0:
        result.update(peak_rss_mb=round(simple[3], 1), rss_from="llama-simple", rss_cmd=" ".join(simple_cmd[:-1]))
        result.update(_simple_stats(simple[2]))
    else:
        # e.g. a vocabulary llama.cpp cannot tokenize with: llama-bench's random tokens still load and run the model
        result.update(peak_rss_mb=round(bench_rss, 1), rss_from="llama-bench",
                      rss_note=_fail("llama-simple", simple[0], simple[2], timeout))
    return result


def _run_or_oserror(cmd: list[str], timeout: float) -> tuple[int, str, str, float]:
    try:
        return _run_measured(cmd, timeout)
    except OSError as e:  # a missing or non-executable binary
        return -1, "", f"error: {e}", 0.0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--repetitions", type=int, default=3, help="llama-bench runs per test (more on a noisy host)")
    ap.add_argument("--cache-dir", type=Path, help="build cache (default: ~/.cache/cosmoes/llama.cpp-VERSION-ISA)")
    args = ap.parse_args(argv)
    try:
        bin_dir = build_llamacpp(args.cache_dir)
    except BuildError as e:
        print(json.dumps({"error": str(e)}))
        raise SystemExit(1)
    res = run_llamacpp(bin_dir, args.gguf, args.prompt_tokens, args.gen, args.threads, repetitions=args.repetitions)
    print(json.dumps(res))
    raise SystemExit(1 if "error" in res else 0)


if __name__ == "__main__":
    main()
