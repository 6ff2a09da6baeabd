"""Expert prefetch (issue #17, beyond the paper): each MoE layer's experts asked for while the layer before runs.

A format 8 layer also returns the next layer's router applied to its own residual stream, so the native runner's
`--prefetch` knows a layer early which experts the next layer will probably load, and asks the kernel to start
reading them (MADV_WILLNEED) before this layer's experts and the next layer's attention run. One run of this script
prints and records, per bundle, the runner under `swap` and `lru:4`, warm (the page cache keeps evicted experts) and
cold (`--cold-experts`: every eviction leaves the page cache too, as on a phone under memory pressure), each with
and without `--prefetch`, rounds interleaved, medians over rounds:
- decode tok/s and the ratio prefetch / none per case (keep prefetch only where it is > 1);
- the mean load time, and the prediction: the share of loads that had been asked for (hit rate) and of asks unused;
- the host's CPU and instruction sets.

A random-initialised model routes by its embeddings rather than by learned features, so its hit rate says little:
give a trained checkpoint's bundle too.

    cosmoes train --preset tiny-moe --steps 600 --out runs/tiny600
    cosmoes export runs/tiny600/checkpoint --target host --out bundles/tiny600
    cosmoes export wearable-moe --target host --out bundles/wm
    python benchmarks/prefetch.py bundles/tiny600 bundles/wm --threads 2 --out benchmarks/results/prefetch
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = (("swap", False), ("swap", True), ("lru:4", False), ("lru:4", True))  # (policy, cold)
FIELDS = ("decode_tok_s", "prefill_tok_s", "expert_load_ms_mean", "expert_loads_decode", "expert_prefetch_hit_rate",
          "expert_prefetched", "expert_prefetch_hits", "expert_loads", "expert_prefetch_ms")


def run_one(bundle: Path, policy: str, cold: bool, prefetch: bool, prompt: Path, args, work: Path) -> dict:
    from cosmoes.runtime.native import run_local

    flags = ["--prompt-file", str(prompt), "--gen", str(args.gen), "--policy", policy, "--threads", str(args.threads),
             "--warmup", "1", "--repeats", str(args.repeats), "--no-sha"]
    flags += ["--cold-experts"] * cold + ["--prefetch"] * prefetch
    return run_local(bundle, flags, work / "stats.json").stats


def measure(bundle: Path, args) -> list[dict]:
    from cosmoes.bench.harness import bench_prompt
    from cosmoes.export.manifest import load_manifest

    ids = bench_prompt(bundle, load_manifest(bundle, verify=False), args.prompt_len)
    runs: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prompt = work / "prompt.txt"
        prompt.write_text(" ".join(map(str, ids)))
        for r in range(args.rounds):
            for policy, cold in CASES:
                for prefetch in (False, True):
                    s = run_one(bundle, policy, cold, prefetch, prompt, args, work)
                    runs.setdefault((policy, cold, prefetch), []).append(s)
                    print(f"{bundle.name} round {r + 1}/{args.rounds} {policy:5s} {'cold' if cold else 'warm'} "
                          f"{'prefetch' if prefetch else 'none':8s} decode {s['decode_tok_s']:7.1f} tok/s  load "
                          f"{s['expert_load_ms_mean']:.3f} ms  hits {s['expert_prefetch_hit_rate']:.2f}", flush=True)
    rows = []
    for (policy, cold, prefetch), stats in runs.items():
        row = {"bundle": bundle.name, "policy": policy, "cold": cold, "prefetch": prefetch, "rounds": len(stats)}
        row.update({f: statistics.median(s.get(f, 0.0) for s in stats) for f in FIELDS})
        row["tokens"] = stats[0]["tokens"] if all(s["tokens"] == stats[0]["tokens"] for s in stats) else None
        rows.append(row)
    base = {(r["policy"], r["cold"]): r for r in rows if not r["prefetch"]}
    for r in rows:
        none = base[(r["policy"], r["cold"])]
        r["speedup"] = r["decode_tok_s"] / none["decode_tok_s"]
        r["same_tokens"] = r["tokens"] is not None and r["tokens"] == none["tokens"]
    for r in rows:
        del r["tokens"]
    return rows


def render(rows: list[dict], header: str) -> str:
    lines = ["# Expert prefetch: each layer's experts asked for a layer ahead", "", header, "",
             "| bundle | policy | page cache | prefetch | decode tok/s | / none | load ms (mean) | decode loads "
             "| hit rate | asks unused | asking ms | same tokens |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        unused = (1 - r["expert_prefetch_hits"] / r["expert_prefetched"]) if r["expert_prefetched"] else 0.0
        lines.append(f"| {r['bundle']} | {r['policy']} | {'cold' if r['cold'] else 'warm'} | "
                     f"{'yes' if r['prefetch'] else 'no'} | {r['decode_tok_s']:.1f} | {r['speedup']:.2f} | "
                     f"{r['expert_load_ms_mean']:.3f} | {r['expert_loads_decode']:.1f} | "
                     + (f"{100 * r['expert_prefetch_hit_rate']:.0f} % | {100 * unused:.0f} % | "
                        f"{r['expert_prefetch_ms']:.1f} |" if r["prefetch"] else "- | - | - |")
                     + f" {'yes' if r['same_tokens'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [r for r in rows if r["prefetch"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(pairs)), [r["speedup"] for r in pairs], color=["C3" if r["cold"] else "C0" for r in pairs])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(pairs)), [f"{r['bundle']}\n{r['policy']} {'cold' if r['cold'] else 'warm'}"
                                      for r in pairs], fontsize=7)
    ax.set_ylabel("decode tok/s, prefetch / none")
    ax.set_title("expert prefetch by policy and page cache (median of rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", type=Path, nargs="+", help="int4 bundles of bundle format 8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="runner repeats per run (its medians)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over every case")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    from cosmoes.system import cpu_description

    rows = [row for bundle in args.bundles for row in measure(bundle, args)]
    cpu = cpu_description()
    header = (f"{datetime.date.today()}, {cpu}; {args.threads} threads, {args.prompt_len} + {args.gen} tokens of "
              f"held-out text, median of {args.rounds} interleaved rounds of the runner's median of {args.repeats}. "
              f"Command: python benchmarks/prefetch.py {' '.join(str(b) for b in args.bundles)} --threads "
              f"{args.threads} --rounds {args.rounds} --out {args.out}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefetch.json").write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=1) + "\n")
    (args.out / "prefetch.md").write_text(render(rows, header))
    plot(rows, args.out / "prefetch.png")
    print(render(rows, header))


if __name__ == "__main__":
    main()
