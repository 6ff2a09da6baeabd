"""Two or more builds of the native runner on one bundle, rounds interleaved: is a runtime change faster?

Each round runs every build under every policy back to back, so a host's slow and fast minutes fall on all of them
alike. Prints per round and records medians over rounds (decode and prefill tok/s, loads, ms per load and eviction)
and each build's policy / `all` ratios, round by round. Build the runner of an earlier commit from a worktree:

    git worktree add /tmp/before <commit>
    PYTHONPATH=/tmp/before python -c "from cosmoes.runtime.native import build_runner; print(build_runner())"
    python benchmarks/runners.py B --runner before=<that path> --runner now=<this tree's runner> --rounds 8 \\
        --out benchmarks/results/<name>

`--runner now` without a path builds this tree's runner.
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

FIELDS = ("decode_tok_s", "prefill_tok_s", "expert_loads", "expert_load_ms_mean", "expert_evict_ms_mean")


def parse_runner(text: str) -> tuple[str, Path | None]:
    name, _, path = text.partition("=")
    if not name:
        raise SystemExit(f"error: --runner {text!r}: expected NAME=PATH (or NAME alone for this tree's runner)")
    if path and not Path(path).is_file():
        raise SystemExit(f"error: --runner {text!r}: no runner at {path}")
    return name, Path(path) if path else None


def measure(args, runners: dict[str, Path]) -> dict[tuple[str, str], list[dict]]:
    from cosmoes.bench.harness import bench_prompt
    from cosmoes.export.manifest import load_manifest
    from cosmoes.runtime.native import run_local

    ids = bench_prompt(args.bundle, load_manifest(args.bundle, verify=False), args.prompt_len)
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        prompt = Path(tmp) / "prompt.txt"
        prompt.write_text(" ".join(map(str, ids)))
        for r in range(args.rounds):
            for name, exe in runners.items():
                for policy in args.policy:
                    flags = ["--prompt-file", str(prompt), "--gen", str(args.gen), "--policy", policy, "--threads",
                             str(args.threads), "--warmup", "1", "--repeats", str(args.repeats)]
                    s = run_local(args.bundle, flags, Path(tmp) / "stats.json", exe=exe).stats
                    runs.setdefault((name, policy), []).append(s)
                    print(f"round {r + 1}/{args.rounds} {name:8s} {policy:6s} decode {s['decode_tok_s']:7.1f} "
                          f"prefill {s['prefill_tok_s']:7.1f} tok/s  loads {s.get('expert_loads', 0):5d}  load "
                          f"{s.get('expert_load_ms_mean', 0):.3f} ms  evict {s.get('expert_evict_ms_mean', 0):.3f} ms",
                          flush=True)
    return runs


def render(runs: dict[tuple[str, str], list[dict]], args, header: str) -> str:
    lines = [f"# Runner builds side by side ({args.bundle.name})", "", header, "",
             "| runner | policy | decode tok/s (range) | prefill tok/s | loads | ms / load | ms / eviction |",
             "|---|---|---|---:|---:|---:|---:|"]
    for (name, policy), stats in runs.items():
        med = {f: statistics.median(s.get(f, 0) for s in stats) for f in FIELDS}
        dec = [s["decode_tok_s"] for s in stats]
        lines.append(f"| {name} | {policy} | {med['decode_tok_s']:.1f} ({min(dec):.1f}–{max(dec):.1f}) | "
                     f"{med['prefill_tok_s']:.1f} | {med['expert_loads']:.0f} | {med['expert_load_ms_mean']:.3f} | "
                     f"{med['expert_evict_ms_mean']:.3f} |")
    if "all" in args.policy:
        lines += ["", "Decode against `all` in the same round (median, then every round):", "",
                  "| runner | policy | median | rounds |", "|---|---|---:|---|"]
        for (name, policy), stats in runs.items():
            if policy == "all":
                continue
            ratios = [s["decode_tok_s"] / a["decode_tok_s"] for s, a in zip(stats, runs[(name, "all")])]
            lines.append(f"| {name} | {policy} | {statistics.median(ratios):.3f} | "
                         f"{', '.join(f'{x:.2f}' for x in ratios)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--runner", action="append", required=True, help="NAME=PATH of a runner build (repeat)")
    p.add_argument("--policy", action="append", help="repeatable (default: all, lru:4, swap)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="runner repeats per run (its medians)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, help="folder for runners.md / runners.json")
    args = p.parse_args(argv)
    args.policy = args.policy or ["all", "lru:4", "swap"]
    if min(args.threads, args.rounds, args.repeats, args.gen, args.prompt_len) < 1:
        raise SystemExit("error: --threads, --rounds, --repeats, --gen and --prompt-len must be >= 1")
    from cosmoes.errors import CosmoesError
    from cosmoes.runtime.native import build_runner

    try:
        runners = {name: path or build_runner(progress=print) for name, path in map(parse_runner, args.runner)}
        report(args, runners, argv)
    except CosmoesError as e:  # a bundle or runner the runs refuse: one line, nothing written
        raise SystemExit(f"error: {e}") from None


def report(args, runners: dict[str, Path], argv) -> None:
    from cosmoes.system import cpu_description

    header = (f"{datetime.date.today()}, {cpu_description()}; {args.threads} threads, {args.prompt_len} prompt + "
              f"{args.gen} new tokens of held-out text, {args.rounds} interleaved rounds of the runner's median of "
              f"{args.repeats} (loads: one run, warm-up included). Command: `python benchmarks/runners.py "
              f"{' '.join(sys.argv[1:] if argv is None else argv)}`")
    runs = measure(args, runners)
    text = render(runs, args, header)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "runners.md").write_text(text)
        (args.out / "runners.json").write_text(json.dumps(
            {"header": header, "runs": {f"{n} {p}": s for (n, p), s in runs.items()}}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
