"""Decode and prefill against llama.cpp on the same weights (issue #21): cosmoes' native runner and llama-bench,
interleaved over rounds, at each thread count, on this host's widest kernels and with AVX2 forced.

One run builds what it needs (the cosmoes runner; llama.cpp from PyPI's llama-cpp-python sdist, benchmarks/llamacpp.py,
one build per instruction-set cap), writes the bundle's own weights as a GGUF (benchmarks/gguf_peer.py: Q4_0 linears,
q8_0 token embedding, padded as cosmoes pads) unless given one, then runs, for every round, thread count and ISA,
each cosmoes policy and llama.cpp back to back. Reported: medians of decode and prefill tok/s and peak RSS, each
system's decode as a fraction of the run's memory-bandwidth probe (bytes one decode step reads: the bundle's for
cosmoes, the GGUF's for llama.cpp, experts counted top_k of num_experts), the ratios cosmoes / llama.cpp and
2 threads / 1 thread, and cosmoes' per-stage decode breakdown. A failed build or run is a row with its reason; the
other rows stay.

    cosmoes export wearable-moe --target android --out bundles/wm
    python benchmarks/peer.py bundles/wm --rounds 3 --out benchmarks/results/peer_wearable-moe_xeon

`--isa avx2` (repeatable; default: the host's own, plus avx2 where the host has more) caps cosmoes' kernels through
COSMOES_ISA and builds llama.cpp without the wider sets, so an AVX-512 host measures the AVX2 figures too.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

LLAMA = "llama.cpp"
# The cosmoes kernel families (COSMOES_ISA) and the llama.cpp options each one leaves on.
WIDER_THAN_AVX2 = ("avx512", "avx_vnni", "amx")


def host_isa() -> str:
    """The widest cosmoes kernel family this CPU runs (the name COSMOES_ISA takes)."""
    from llamacpp import cpu_flags

    flags = cpu_flags()
    for name, need in (("avx512vnni", "avx512_vnni"), ("avxvnni", "avx_vnni"), ("avx2", "avx2")):
        if need in flags:
            return name
    return "neondot" if "asimddp" in flags else "scalar"


def llama_flags(isa: str) -> set[str]:
    """The /proc/cpuinfo flags llama.cpp is built for under an ISA cap: all of them for the host's own family."""
    from llamacpp import cpu_flags

    flags = cpu_flags()
    return flags if isa == host_isa() else {f for f in flags if not f.startswith(WIDER_THAN_AVX2)}


def gguf_bytes_per_token(gguf: Path, top_k: int, num_experts: int) -> float:
    """Weight bytes one decode step reads from the GGUF: every tensor, but one row of the token embedding and
    top_k / num_experts of each stacked expert tensor."""
    from gguf import GGUFReader

    total = 0.0
    for t in GGUFReader(gguf).tensors:
        n = float(t.n_bytes)
        if t.name == "token_embd.weight":
            n /= int(t.shape[-1])  # rows = vocabulary
        elif "_exps." in t.name:
            n *= top_k / num_experts
        total += n
    return total


def cosmoes_run(exe: Path, bundle: Path, prompt: Path, policy: str, threads: int, isa: str, args, work: Path) -> dict:
    from cosmoes.bench.harness import derived
    from cosmoes.export.manifest import load_manifest

    stats_path = work / "stats.json"
    stats_path.unlink(missing_ok=True)
    cmd = [str(exe), str(bundle), "--prompt-file", str(prompt), "--gen", str(args.gen), "--policy", policy,
           "--threads", str(threads), "--warmup", "1", "--repeats", str(args.repeats), "--probe",
           "--stats-json", str(stats_path)]
    env = {**os.environ, "COSMOES_ISA": isa}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout:g} s"}
    if proc.returncode:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        return {"error": f"exit {proc.returncode}: {lines[-1][:200] if lines else 'no message'}"}
    s = json.loads(stats_path.read_text())
    d = derived(s, load_manifest(bundle, verify=False))
    return {"decode_tok_s": s["decode_tok_s"], "prefill_tok_s": s["prefill_tok_s"], "peak_rss_mb": s["peak_rss_mb"],
            "bandwidth_gb_s": s.get("mem_read_gb_s"), "roofline": d.get("roofline_fraction"),
            "roofline_with_kv": d.get("roofline_fraction_with_kv"), "kernels": s.get("expert_kernels", "?"),
            "layers_bandwidth": d.get("layers_bandwidth_fraction"), "head_vs_read": d.get("head_vs_read"),
            "breakdown_ms": s.get("decode_breakdown_ms", {})}


def llama_run(bin_dir: Path | None, build_error: str | None, gguf: Path | None, gguf_error: str | None,
              threads: int, args) -> dict:
    from llamacpp import run_llamacpp

    if build_error or gguf_error:
        return {"error": build_error or gguf_error}
    r = run_llamacpp(bin_dir, gguf, args.prompt_len, args.gen, threads, repetitions=args.repeats,
                     timeout=args.timeout)
    if "error" in r:
        return {"error": r["error"]}
    return {"decode_tok_s": r["decode_tok_s"], "prefill_tok_s": r["prefill_tok_s"], "peak_rss_mb": r["peak_rss_mb"]}


def prepare_gguf(bundle: Path, gguf: Path | None, work: Path) -> tuple[Path | None, str | None]:
    """The GGUF given, or the bundle's source written as one; (None, reason) when it cannot be."""
    from gguf_peer import write_gguf

    from cosmoes.export.manifest import load_manifest

    if gguf is not None:
        return (gguf, None) if gguf.exists() else (None, f"--gguf {gguf}: no such file")
    source = load_manifest(bundle, verify=False).source or {}
    src = source.get("checkpoint") or source.get("preset")
    if not src:
        return None, f"{bundle}/manifest.json: no source recorded to write the GGUF from; pass --gguf"
    out = work / f"{bundle.name}.gguf"
    try:
        write_gguf(src, out, int(source.get("seed", 0)))
    except (SystemExit, Exception) as e:  # noqa: BLE001 - any failure is this row's reason, the cosmoes rows stay
        return None, f"writing the GGUF: {e}"
    return out, None


def build(isa: str) -> tuple[Path | None, str | None]:
    from llamacpp import VERSION, BuildError, build_llamacpp, default_cache_dir, isa_flags, isa_tag

    flags = isa_flags(llama_flags(isa))  # the cache is keyed by the flags: the host's own build is the usual one
    try:
        return build_llamacpp(default_cache_dir().parent / f"llama.cpp-{VERSION}-{isa_tag(flags)}", isa=flags), None
    except BuildError as e:
        return None, f"llama.cpp build: {e}"


def measure(args, isas: list[str]) -> dict[tuple[str, str, int], list[dict]]:
    from cosmoes.bench.harness import bench_prompt
    from cosmoes.export.manifest import load_manifest
    from cosmoes.runtime.native import build_runner

    exe = build_runner()
    runs: dict[tuple[str, str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gguf, gguf_error = prepare_gguf(args.bundle, args.gguf, work)
        builds = {isa: ((None, "llama.cpp: --no-llamacpp") if args.no_llamacpp else build(isa)) for isa in isas}
        ids = bench_prompt(args.bundle, load_manifest(args.bundle, verify=False), args.prompt_len)
        prompt = work / "prompt.txt"
        prompt.write_text(" ".join(map(str, ids)))
        for r in range(args.rounds):
            for isa in isas:
                for threads in args.threads:
                    for system in (*(f"cosmoes {p}" for p in args.policy), LLAMA):
                        res = (llama_run(*builds[isa], gguf, gguf_error, threads, args) if system == LLAMA else
                               cosmoes_run(exe, args.bundle, prompt, system.split()[1], threads, isa, args, work))
                        runs.setdefault((system, isa, threads), []).append(res)
                        print(f"round {r + 1}/{args.rounds} {isa:10s} {threads}t {system:14s} " + (
                            res["error"] if "error" in res else
                            f"decode {res['decode_tok_s']:7.1f}  prefill {res['prefill_tok_s']:7.1f} tok/s  "
                            f"peak RSS {res['peak_rss_mb']:6.1f} MB"), flush=True)
        if gguf and not gguf_error:
            mc = load_manifest(args.bundle, verify=False).model_config()
            per_token = gguf_bytes_per_token(gguf, mc.top_k or 1, mc.num_experts or 1)
            bw = [x["bandwidth_gb_s"] for k, v in runs.items() if k[0] != LLAMA for x in v if x.get("bandwidth_gb_s")]
            if bw:  # llama.cpp has no probe of its own: the same run's median probe
                for k, v in runs.items():
                    if k[0] == LLAMA:
                        for x in v:
                            if "error" not in x:
                                x["roofline"] = x["decode_tok_s"] * per_token / (statistics.median(bw) * 1e9)
    return runs


def summarize(runs: dict[tuple[str, str, int], list[dict]]) -> list[dict]:
    rows = []
    for (system, isa, threads), results in runs.items():
        ok = [r for r in results if "error" not in r]
        row = {"system": system, "isa": isa, "threads": threads, "runs": len(results), "failed": len(results) - len(ok)}
        for f in ("decode_tok_s", "prefill_tok_s", "peak_rss_mb", "roofline", "roofline_with_kv", "layers_bandwidth",
                  "head_vs_read"):
            vals = [r[f] for r in ok if r.get(f) is not None]
            row[f] = statistics.median(vals) if vals else None
        if ok and ok[0].get("breakdown_ms"):
            row["breakdown_ms"] = {k: statistics.median(r["breakdown_ms"].get(k, 0.0) for r in ok)
                                   for k in ok[0]["breakdown_ms"]}
        if ok and "kernels" in ok[0]:
            row["kernels"] = ok[0]["kernels"]
        if len(ok) < len(results):
            row["error"] = next(r["error"] for r in results if "error" in r)
        rows.append(row)
    return rows


def ratios(rows: list[dict]) -> list[tuple[str, float | None, str]]:
    """(figure, value or None, target) for every cosmoes policy against llama.cpp, and every system's thread gain."""
    by = {(r["system"], r["isa"], r["threads"]): r for r in rows}
    get = lambda key, f: (by.get(key) or {}).get(f)  # noqa: E731
    out = []
    for (system, isa, threads) in by:
        if system == LLAMA:
            continue
        for f, name, target in (("decode_tok_s", "decode", ">= 1.3" if system == "cosmoes all" else "-"),
                                ("prefill_tok_s", "prefill", ">= 1.5" if system == "cosmoes all" else "-"),
                                ("peak_rss_mb", "peak RSS", "<= 1.0" if system == "cosmoes all" else "-")):
            c, p = get((system, isa, threads), f), get((LLAMA, isa, threads), f)
            out.append((f"{system} / llama.cpp {name}, {isa}, {threads} thread{'s' * (threads > 1)}",
                        c / p if c and p else None, target))
    for (system, isa, threads) in by:
        if system == "cosmoes all":  # the stages against the run's own bandwidth probe
            t = f"{threads} thread{'s' * (threads > 1)}"
            out.append((f"{system} attention layers / bandwidth, {isa}, {t}",
                        get((system, isa, threads), "layers_bandwidth"), ">= 0.6"))
            out.append((f"{system} head time / time to read it, {isa}, {t}",
                        get((system, isa, threads), "head_vs_read"), "<= 1.2"))
    threads = sorted({r["threads"] for r in rows})
    if len(threads) > 1:
        lo, hi = threads[0], threads[-1]
        for (system, isa, t) in by:
            if t == lo:
                a, b = get((system, isa, lo), "decode_tok_s"), get((system, isa, hi), "decode_tok_s")
                out.append((f"{system} decode {hi} / {lo} threads, {isa}", b / a if a and b else None,
                            ">= 1.5" if system == "cosmoes all" else "-"))
    return out


def render(rows: list[dict], header: str) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [header, "", "| system | ISA | threads | decode tok/s | prefill tok/s | peak RSS MB | decode / bandwidth "
             "| failed runs |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        roof = fmt(r["roofline"], ".2f") + (f" ({r['roofline_with_kv']:.2f} with KV)" if r.get("roofline_with_kv")
                                            else "")
        lines.append(f"| {r['system']} | {r['isa']} | {r['threads']} | {fmt(r['decode_tok_s'], '.1f')} | "
                     f"{fmt(r['prefill_tok_s'], '.1f')} | {fmt(r['peak_rss_mb'], '.1f')} | {roof} | "
                     f"{r['failed']}{' (' + r['error'] + ')' if r.get('error') else ''} |")
    lines += ["", "| figure | value | target |", "|---|---:|---|"]
    for name, value, target in ratios(rows):
        lines.append(f"| {name} | {fmt(value, '.2f')} | {target if value is not None else 'not measured'} |")
    stages = [r for r in rows if r.get("breakdown_ms")]
    if stages:
        keys = list(stages[0]["breakdown_ms"])
        lines += ["", "cosmoes decode step, ms per token (median):", "",
                  "| system | ISA | threads | " + " | ".join(keys) + " |", "|---|---|---:|" + "---:|" * len(keys)]
        for r in stages:
            lines.append(f"| {r['system']} | {r['isa']} | {r['threads']} | " +
                         " | ".join(f"{r['breakdown_ms'].get(k, 0.0):.2f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["isa"], r["threads"]) for r in rows}, key=lambda g: (g[0], g[1]))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, f, label in ((axes[0], "decode_tok_s", "decode tok/s"), (axes[1], "prefill_tok_s", "prefill tok/s")):
        width = 0.8 / max(1, len(systems))
        for j, system in enumerate(systems):
            for i, (isa, threads) in enumerate(groups):
                r = next((r for r in rows if (r["system"], r["isa"], r["threads"]) == (system, isa, threads)), None)
                v = (r or {}).get(f) or 0.0
                x = i + (j - (len(systems) - 1) / 2) * width
                ax.bar(x, v, width, color=f"C{j}", label=system if i == 0 else None)
                ax.text(x, v, f"{v:.0f}" if v else "failed", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(groups)), [f"{isa}\n{t} thread{'s' * (t > 1)}" for isa, t in groups])
        ax.set_ylabel(f"{label} (median)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path, help="an exported bundle (cosmoes export)")
    p.add_argument("--gguf", type=Path, help="the same weights as GGUF (default: written from the bundle's source)")
    p.add_argument("--policy", action="append", help="cosmoes expert-cache policy (repeatable; default: all)")
    p.add_argument("--threads", type=int, action="append", help="thread count (repeatable; default: 1 and 2)")
    p.add_argument("--isa", action="append", help="kernel family cap (repeatable; default: the host's, and avx2 "
                                                  "where the host has more)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="repeats inside each run (each tool's own median/mean)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--no-llamacpp", action="store_true", help="cosmoes rows only (llama.cpp's shown as not run)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not (args.bundle / "manifest.json").is_file():
        raise SystemExit(f"error: bundle {args.bundle}: no manifest.json (export one with `cosmoes export`)")
    args.policy = args.policy or ["all"]
    args.threads = args.threads or [1, 2]
    if any(t < 1 for t in args.threads) or args.rounds < 1 or args.repeats < 1:
        raise SystemExit("error: --threads, --rounds and --repeats must be >= 1")
    native = host_isa()
    isas = args.isa or ([native, "avx2"] if native in ("avx512vnni", "avxvnni") else [native])
    from cosmoes.system import cpu_description

    header = (f"# cosmoes against llama.cpp on the same weights ({args.bundle.name})\n\n"
              f"{datetime.date.today()}, {cpu_description()}; kernel families run: {', '.join(isas)}; "
              f"{args.prompt_len} prompt + {args.gen} new tokens, median of {args.rounds} interleaved rounds "
              f"(each run: warm-up + {args.repeats} repeats). llama.cpp Q4_0 with a q8_0 token embedding. Command: "
              f"`python benchmarks/peer.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    print(header, flush=True)
    rows = summarize(measure(args, isas))
    text = render(rows, header)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peer.md").write_text(text)
    (args.out / "peer.json").write_text(json.dumps({"header": header, "rows": rows,
                                                    "ratios": ratios(rows)}, indent=1))
    plot(rows, args.out / "peer.png")
    print(text)


if __name__ == "__main__":
    main()
