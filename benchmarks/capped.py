"""Decode under a memory cap (issue #17): cosmoes `swap` against llama.cpp on the same weights, in one cgroup each.

A phone's budget counts the page cache: a model larger than the memory left to it is read from storage again and
again. Both systems run in a fresh memory cgroup (v1 `memory.limit_in_bytes` or v2 `memory.max`; page cache
counted) capped at the bytes the bundle keeps resident under `swap` (backbone + top_k experts per layer, `cosmoes
inspect`) plus the KV cache of the run's positions (prompt + generated) plus `--overhead-mb`, the runtime's stated
overhead (activations it touches, code, heap; measured: the uncapped runs' cgroup peak is shown beside). The cap is
below the GGUF's size, so llama.cpp's mapped weights cannot all stay resident. Every file either reads is
dropped from the page cache before each run (posix_fadvise), so its pages are read, and charged, inside the cap.
Runs are interleaved over rounds, medians reported; the uncapped runs of both are shown beside.

    cosmoes export wearable-moe --target android --out bundles/wm
    python benchmarks/gguf_peer.py wearable-moe --out bundles/wm.gguf
    python benchmarks/capped.py --bundle bundles/wm --gguf bundles/wm.gguf --threads 2 \
        --out benchmarks/results/capped_wearable-moe

Needs root (or a delegated cgroup) to create the cgroup; says so in one line otherwise. llama.cpp is built once
from PyPI's llama-cpp-python sdist (benchmarks/llamacpp.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")


class Cgroup:
    """A memory cgroup of its own, capped at ``limit`` bytes; children join it before they exec."""

    def __init__(self, name: str, limit: int | None):
        if (CGROUP_V1 / "memory.limit_in_bytes").exists():
            self.path, self.limit_file, self.peak_file = CGROUP_V1 / name, "memory.limit_in_bytes", \
                "memory.max_usage_in_bytes"
        elif "memory" in (CGROUP_V2 / "cgroup.controllers").read_text(errors="replace").split() \
                if (CGROUP_V2 / "cgroup.controllers").exists() else False:
            self.path, self.limit_file, self.peak_file = CGROUP_V2 / name, "memory.max", "memory.peak"
        else:
            raise SystemExit("error: no memory cgroup controller (/sys/fs/cgroup/memory or cgroup2 'memory')")
        try:
            self.path.mkdir(exist_ok=True)
            (self.path / self.limit_file).write_text(str(limit) if limit else ("-1" if self.path.is_relative_to(
                CGROUP_V1) else "max"))
        except OSError as e:
            raise SystemExit(f"error: cannot create the memory cgroup {self.path}: {e.strerror} (needs root)") from None
        self.limit = limit

    def reset_peak(self) -> None:
        try:  # v1 resets on a write; v2's memory.peak is per-cgroup lifetime (kernel >= 6.12 resets on a write)
            (self.path / self.peak_file).write_text("0")
        except OSError:
            pass

    def peak_mb(self) -> float:
        try:
            return int((self.path / self.peak_file).read_text()) / 1e6
        except (OSError, ValueError):
            return -1.0

    def join(self) -> None:  # preexec_fn: runs in the child between fork and exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def default_cap(bundle: Path, positions: int, overhead_mb: float) -> tuple[int, str]:
    """swap-resident weights + the KV cache of `positions` + the runtime's overhead, and how it adds up.

    Not the KV cache or activation arena reserved for max_seq_len: the runtime touches (and the cgroup charges) only
    the pages a run uses.
    """
    from cosmoes.export.bundle import inspect_bundle

    info = inspect_bundle(bundle)
    swap = info["resident"]["swap"]
    kv = info["footprint"]["kv_cache"]["per_position"] * positions
    total = int(swap + kv + overhead_mb * 1e6)
    why = (f"{total / 1e6:.0f} MB = swap weights {swap / 1e6:.1f} + KV cache of {positions} positions "
           f"{kv / 1e6:.1f} + runtime overhead {overhead_mb:.0f} MB")
    return total, why


def run_capped(cmd: list[str], group: Cgroup | None, timeout: float) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, peak cgroup MB or -1); an OOM kill is exit code -9."""
    if group:
        group.reset_peak()
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout,
                              preexec_fn=group.join if group else None)
    except subprocess.TimeoutExpired:
        return 124, "", f"timed out after {time.monotonic() - t0:.0f} s", -1.0
    return proc.returncode, proc.stdout, proc.stderr, group.peak_mb() if group else -1.0


def cosmoes_run(exe: Path, bundle: Path, prompt: Path, args, group: Cgroup | None, work: Path) -> dict:
    stats_path = work / "stats.json"
    stats_path.unlink(missing_ok=True)
    cmd = [str(exe), str(bundle), "--prompt-file", str(prompt), "--gen", str(args.gen), "--policy", args.policy,
           "--threads", str(args.threads), "--warmup", "0", "--repeats", str(args.repeats), "--stats-json",
           str(stats_path)]
    rc, _, err, peak = run_capped(cmd, group, args.timeout)
    if rc:
        return {"error": _why(rc, err)}
    s = json.loads(stats_path.read_text())
    return {"decode_tok_s": s["decode_tok_s"], "prefill_tok_s": s["prefill_tok_s"], "peak_mb": peak,
            "expert_load_ms_mean": s.get("expert_load_ms_mean", 0.0), "kernels": s.get("expert_kernels", "?")}


# llama.cpp's default repacks Q4_0 weights into anonymous memory (a copy the cap cannot reclaim, so it is killed);
# with repacking off and the GGUF mapped, its weights are page cache that the kernel evicts and reads again.
LLAMACPP = {"llama.cpp": [], "llama.cpp mmap": ["--repack", "0", "-lm", "mmap"]}


def llamacpp_run(bin_dir: Path, gguf: Path, args, group: Cgroup | None, flags: list[str]) -> dict:
    from llamacpp import _bench_speeds, _parse_bench

    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", str(args.prompt_len), "-n", str(args.gen),
           "-t", str(args.threads), "-r", str(args.repeats), "-o", "json", *flags]
    rc, out, err, peak = run_capped(cmd, group, args.timeout)
    if rc:
        return {"error": _why(rc, err)}
    speeds = _bench_speeds(_parse_bench(out))
    return {"decode_tok_s": speeds["decode_tok_s"], "prefill_tok_s": speeds["prefill_tok_s"], "peak_mb": peak}


def _why(rc: int, err: str) -> str:
    if rc in (-9, 137):
        return "killed (out of memory under the cap)"
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    return f"exit {rc}: {lines[-1][:200] if lines else 'no message'}"


def measure(args, cap: int) -> dict[tuple[str, str], list[dict]]:
    from llamacpp import build_llamacpp

    from cosmoes.bench.harness import bench_prompt
    from cosmoes.export.manifest import load_manifest
    from cosmoes.runtime.native import build_runner
    from cosmoes.system import drop_cache

    exe, bin_dir = args.runner or build_runner(), build_llamacpp()
    files = [p for p in args.bundle.rglob("*") if p.is_file()] + [args.gguf]
    ids = bench_prompt(args.bundle, load_manifest(args.bundle, verify=False), args.prompt_len)
    group = Cgroup(f"cosmoes-capped-{os.getpid()}", cap)
    free = Cgroup(f"cosmoes-uncapped-{os.getpid()}", None)  # no limit: the peak each needs on its own
    runs: dict[tuple[str, str], list[dict]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            prompt = work / "prompt.txt"
            prompt.write_text(" ".join(map(str, ids)))
            for r in range(args.rounds):
                for capped in (True, False):
                    for system in ("cosmoes", *LLAMACPP):
                        drop_cache(files)
                        g = group if capped else free
                        res = (cosmoes_run(exe, args.bundle, prompt, args, g, work) if system == "cosmoes"
                               else llamacpp_run(bin_dir, args.gguf, args, g, LLAMACPP[system]))
                        key = (system, "capped" if capped else "uncapped")
                        runs.setdefault(key, []).append(res)
                        print(f"round {r + 1}/{args.rounds} {system:9s} {key[1]:8s} " + (
                            res["error"] if "error" in res else
                            f"decode {res['decode_tok_s']:7.2f} prefill {res['prefill_tok_s']:7.1f} tok/s"
                            f"  cgroup peak {res['peak_mb']:.0f} MB"), flush=True)
    finally:
        group.remove()
        free.remove()
    return runs


def summarize(runs: dict[tuple[str, str], list[dict]]) -> list[dict]:
    rows = []
    for (system, cap), results in runs.items():
        ok = [r for r in results if "error" not in r]
        row = {"system": system, "cap": cap, "runs": len(results), "failed": len(results) - len(ok)}
        for f in ("decode_tok_s", "prefill_tok_s", "peak_mb"):
            row[f] = statistics.median(r[f] for r in ok) if ok else None
        if len(ok) < len(results):
            row["error"] = next(r["error"] for r in results if "error" in r)
        rows.append(row)
    return rows


def render(rows: list[dict], header: str) -> str:
    by = {(r["system"], r["cap"]): r for r in rows}
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [header, "", "| system | cap | decode tok/s | prefill tok/s | cgroup peak MB | failed runs |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['cap']} | {fmt(r['decode_tok_s'], '.2f')} | "
                     f"{fmt(r['prefill_tok_s'], '.1f')} | {fmt(r['peak_mb'], '.0f')} | "
                     f"{r['failed']}{' (' + r['error'] + ')' if r.get('error') else ''} |")
    lines += ["", "| figure | value | target |", "|---|---:|---|"]
    for cap in ("capped", "uncapped"):
        c = by.get(("cosmoes", cap), {}).get("decode_tok_s")
        # against llama.cpp's fastest configuration that ran
        peers = [(by[(name, cap)]["decode_tok_s"], name) for name in LLAMACPP
                 if by.get((name, cap), {}).get("decode_tok_s")]
        label = f"cosmoes swap / best llama.cpp decode, {cap}"
        if c and peers:
            best, name = max(peers)
            lines.append(f"| {label} ({name}) | {c / best:.2f} | {'>= 3.0' if cap == 'capped' else '-'} |")
        else:
            lines.append(f"| {label} | - | {'no llama.cpp configuration ran' if c else 'cosmoes failed'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for i, cap in enumerate(("capped", "uncapped")):
        for j, system in enumerate(("cosmoes", *LLAMACPP)):
            r = next((r for r in rows if r["system"] == system and r["cap"] == cap), None)
            v = (r or {}).get("decode_tok_s") or 0.0
            ax.bar(i * 4 + j, v, color=f"C{j}", label=system if i == 0 else None)
            ax.text(i * 4 + j, v, f"{v:.1f}" if v else "killed", ha="center", va="bottom", fontsize=8)
    ax.set_xticks([1, 5], ["under the cap", "no cap"])
    ax.set_ylabel("decode tok/s (median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True, help="a bundle with int4 experts (cosmoes export)")
    p.add_argument("--gguf", type=Path, required=True, help="the same weights as GGUF (benchmarks/gguf_peer.py)")
    p.add_argument("--runner", type=Path, help="a cosmoes_runner binary (default: this checkout's, built on first use)")
    p.add_argument("--policy", default="swap", help="cosmoes expert-cache policy under the cap")
    p.add_argument("--cap-mb", type=float, help="the memory cap; default: swap-resident bytes + the run's KV cache "
                                                "+ --overhead-mb")
    p.add_argument("--overhead-mb", type=float, default=48.0, help="the runtime's own memory (activations, code, heap)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="repeats inside each run (each tool's median)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    for flag, path in (("--bundle", args.bundle), ("--gguf", args.gguf), ("--runner", args.runner)):
        if path is not None and not path.exists():
            raise SystemExit(f"error: {flag} {path}: no such file or directory")
    from cosmoes.system import cpu_description

    cap, why = (int(args.cap_mb * 1e6), f"{args.cap_mb:.0f} MB (--cap-mb)") if args.cap_mb else \
        default_cap(args.bundle, args.prompt_len + args.gen, args.overhead_mb)
    header = (f"# Decode under a memory cap: cosmoes `{args.policy}` vs llama.cpp ({args.bundle.name})\n\n"
              f"{datetime.date.today()}, {cpu_description()}; cap {why}; {args.threads} threads, "
              f"{args.prompt_len} prompt + {args.gen} new tokens, page cache of every file dropped before each run, "
              f"median of {args.rounds} interleaved rounds of each tool's median of {args.repeats}. Command: "
              f"`python benchmarks/capped.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    print(header, flush=True)
    rows = summarize(measure(args, cap))
    text = render(rows, header)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "capped.md").write_text(text)
    (args.out / "capped.json").write_text(json.dumps({"header": header, "cap_bytes": cap, "rows": rows}, indent=1))
    plot(rows, args.out / "capped.png")
    print(text)


if __name__ == "__main__":
    main()
