"""Experts loaded at the speed of reading them (issue #17): int4 segments used in place against XNNPACK methods.

One run prints and records, for the same weights exported twice (the default int4 layout, and `--experts xnnpack`),
the native runner under `all`, `swap` and `lru:4`, rounds interleaved, medians over rounds:
- decode and prefill tok/s per layout and policy, and the ratios the issue sets: int4 swap / all (>= 0.6),
  lru:4 / all (>= 0.85), int4 all against XNNPACK all (decode and prefill, >= 1.0);
- the mean expert load against the time to read its bytes at the probed file read speed (<= 2x, page cache warm),
  and the cold figure: `--cold-experts` drops each evicted expert from the page cache, so every load reads storage;
- which kernel family ran the int4 experts, and the host's CPU and instruction sets.

    cosmoes export wearable-moe --target android --out bundles/wm
    cosmoes export wearable-moe --target android --experts xnnpack --out bundles/wm-xnnpack
    python benchmarks/expert_loads.py --int4 bundles/wm --xnnpack bundles/wm-xnnpack --threads 2 \
        --out benchmarks/results/expert_loads_wearable-moe
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

POLICIES = ("all", "swap", "lru:4")
FIELDS = ("decode_tok_s", "prefill_tok_s", "expert_load_ms_mean", "expert_evict_ms_mean", "expert_read_ms",
          "expert_loads_decode", "peak_rss_mb")
STAGES = ("layers", "experts", "expert_loads", "expert_evictions", "head", "other")  # decode_breakdown_ms


def variants(args) -> list[tuple[str, Path, str, list[str]]]:
    """(label, bundle, policy, extra runner flags), in the order one round runs them."""
    out = [("int4", args.int4, p, []) for p in POLICIES]
    out.append(("int4 cold", args.int4, "swap", ["--cold-experts"]))
    if args.xnnpack:
        out += [("xnnpack", args.xnnpack, p, []) for p in POLICIES]
    return out


def run_one(bundle: Path, policy: str, extra: list[str], prompt: Path, args, work: Path) -> dict:
    from cosmoes.runtime.native import run_local

    flags = ["--prompt-file", str(prompt), "--gen", str(args.gen), "--policy", policy, "--threads", str(args.threads),
             "--warmup", "1", "--repeats", str(args.repeats), "--probe", *extra]
    return run_local(bundle, flags, work / "stats.json").stats


def measure(args) -> list[dict]:
    from cosmoes.bench.harness import bench_prompt
    from cosmoes.export.manifest import load_manifest

    ids = bench_prompt(args.int4, load_manifest(args.int4, verify=False), args.prompt_len)
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prompt = work / "prompt.txt"
        prompt.write_text(" ".join(map(str, ids)))
        for r in range(args.rounds):
            for label, bundle, policy, extra in variants(args):
                stats = run_one(bundle, policy, extra, prompt, args, work)
                runs.setdefault((label, policy), []).append(stats)
                print(f"round {r + 1}/{args.rounds} {label:9s} {policy:6s} decode {stats['decode_tok_s']:6.1f} "
                      f"prefill {stats['prefill_tok_s']:6.1f} tok/s  load {stats.get('expert_load_ms_mean', 0):.3f} "
                      f"ms  evict {stats.get('expert_evict_ms_mean', 0):.3f} ms  "
                      f"read {stats.get('expert_read_ms', 0):.3f} ms", flush=True)
    rows = []
    for (label, policy), stats in runs.items():
        row = {"layout": label, "policy": policy, "rounds": len(stats),
               "expert_kernels": stats[-1].get("expert_kernels", "?")}
        for f in FIELDS:
            row[f] = statistics.median(s.get(f, 0.0) for s in stats)
        row["decode_breakdown_ms"] = {k: statistics.median(s.get("decode_breakdown_ms", {}).get(k, 0.0) for s in stats)
                                      for k in STAGES}
        row["tokens_agree"] = all(s["tokens"] == stats[0]["tokens"] for s in stats)
        rows.append(row)
    return rows


def ratios(rows: list[dict]) -> list[tuple[str, float | None, str]]:
    """(what, value, target) for the issue's figures."""
    by = {(r["layout"], r["policy"]): r for r in rows}

    def ratio(a, b, field):
        return a[field] / b[field] if a and b and b[field] > 0 else None

    i_all, i_swap, i_lru = by.get(("int4", "all")), by.get(("int4", "swap")), by.get(("int4", "lru:4"))
    x_all, cold = by.get(("xnnpack", "all")), by.get(("int4 cold", "swap"))
    x_swap = by.get(("xnnpack", "swap"))
    out = [("int4 swap / all decode", ratio(i_swap, i_all, "decode_tok_s"), ">= 0.6"),
           ("int4 lru:4 / all decode", ratio(i_lru, i_all, "decode_tok_s"), ">= 0.85"),
           ("int4 all / xnnpack all decode", ratio(i_all, x_all, "decode_tok_s"), ">= 1.0"),
           ("int4 all / xnnpack all prefill", ratio(i_all, x_all, "prefill_tok_s"), ">= 1.0"),
           ("int4 swap / xnnpack swap decode", ratio(i_swap, x_swap, "decode_tok_s"), "(was 0.18x of all)"),
           ("int4 load / read, warm (swap)",
            i_swap["expert_load_ms_mean"] / i_swap["expert_read_ms"] if i_swap and i_swap["expert_read_ms"] else None,
            "<= 2.0"),
           ("int4 load / read, cold (swap)",
            cold["expert_load_ms_mean"] / cold["expert_read_ms"] if cold and cold["expert_read_ms"] else None,
            "shown"),
           ("xnnpack load / read (swap)",
            x_swap["expert_load_ms_mean"] / x_swap["expert_read_ms"] if x_swap and x_swap["expert_read_ms"] else None,
            "(today)")]
    return out


def render(rows: list[dict], args, header: str) -> str:
    lines = [f"# Expert loads: int4 segments in place vs XNNPACK methods ({args.int4.name})", "", header, "",
             "| layout | policy | kernels | decode tok/s | prefill tok/s | load ms (mean) | evict ms (mean) | read ms "
             f"| loads / {args.gen} new tokens | peak RSS MB |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['policy']} | {r['expert_kernels']} | {r['decode_tok_s']:.1f} | "
                     f"{r['prefill_tok_s']:.1f} | {r['expert_load_ms_mean']:.3f} | {r['expert_evict_ms_mean']:.3f} | "
                     f"{r['expert_read_ms']:.3f} | {r['expert_loads_decode']:.1f} | {r['peak_rss_mb']:.1f} |")
    lines += ["", "Where a decoded token's time goes, ms (medians; `other`: what no counter covers):", "",
              "| layout | policy | " + " | ".join(STAGES) + " | total |", "|---|---|" + "---:|" * (len(STAGES) + 1)]
    for r in rows:
        b = r["decode_breakdown_ms"]
        lines.append(f"| {r['layout']} | {r['policy']} | " + " | ".join(f"{b[k]:.3f}" for k in STAGES)
                     + f" | {sum(b.values()):.3f} |")
    lines += ["", "| figure | value | target |", "|---|---:|---|"]
    for what, value, target in ratios(rows):
        lines.append(f"| {what} | {'-' if value is None else f'{value:.2f}'} | {target} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['layout']}\n{r['policy']}" for r in rows]
    ax.bar(range(len(rows)), [r["decode_tok_s"] for r in rows],
           color=["C0" if r["layout"].startswith("int4") else "C1" for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("decode tok/s (median)")
    ax.set_title("decode by expert layout and cache policy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--int4", type=Path, required=True, help="bundle exported with the default (int4) experts")
    p.add_argument("--xnnpack", type=Path, help="the same weights exported with --experts xnnpack")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="runner repeats per run (its medians)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over every layout and policy")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    from cosmoes.system import cpu_description

    header = (f"{datetime.date.today()}, {cpu_description()}; {args.threads} threads, {args.prompt_len} prompt + "
              f"{args.gen} new tokens of held-out text, median of {args.rounds} interleaved rounds of the runner's "
              f"median of {args.repeats}. Command: `python benchmarks/expert_loads.py "
              f"{' '.join(sys.argv[1:] if argv is None else argv)}`")
    rows = measure(args)
    text = render(rows, args, header)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "expert_loads.md").write_text(text)
    (args.out / "expert_loads.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    plot(rows, args.out / "expert_loads.png")
    print(text)


if __name__ == "__main__":
    main()
