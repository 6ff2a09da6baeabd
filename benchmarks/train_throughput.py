"""Training throughput of the tiny dense, MoE and WD-MoE presets on this machine, measured side by side (§3.1 recipe
at CPU scale).

Each timed step is the trainer's own step (`cosmoes.train._Run.step`): batch from the packed corpus, LM +
load-balancing (+ BlES) loss, backward, gradient clipping, AdamW and the LR scheduler. Models take turns in
rounds so that a change in machine load during the run touches all of them alike; warm-up steps are not timed.

    python benchmarks/train_throughput.py --batch-size 8 --seq-len 128 --out benchmarks/results/train_throughput.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cosmoes.config import get_preset, human
from cosmoes.data import DataConfig, build_dataset
from cosmoes.model import Transformer, init_weights
from cosmoes.tokenizer import default_tokenizer
from cosmoes.train import Dist, TrainConfig, _Run, lr_at

CORPUS = Path(__file__).resolve().parents[1] / "cosmoes" / "corpus" / "austen-persuasion.txt.gz"


@dataclass
class Contender:
    """One preset with its own model, optimiser and scheduler, and the seconds each timed step took."""

    preset: str
    run: _Run
    step: int = 0
    seconds: list[float] = field(default_factory=list)

    def train_step(self, blocks: torch.Tensor) -> float:
        t0 = time.perf_counter()
        self.run.step(self.step, blocks)
        self.step += 1
        return time.perf_counter() - t0


def make_contender(preset: str, cfg: TrainConfig) -> Contender:
    """The same construction as `cosmoes.train` uses: seeded init, AdamW, warm-up + cosine schedule."""
    model_cfg = get_preset(preset)
    torch.manual_seed(cfg.seed)
    model = init_weights(Transformer(model_cfg), seed=cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay, fused=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg))
    run = _Run(model=model.train(), opt=opt, sched=sched, cfg=cfg, model_cfg=model_cfg, tokenizer=None, d=Dist(),
               metrics_path=Path(os.devnull))
    return Contender(preset, run)


def measure(contenders: list[Contender], blocks: torch.Tensor, warmup: int, rounds: int, steps: int) -> None:
    for c in contenders:
        for _ in range(warmup):
            c.train_step(blocks)
    for _ in range(rounds):
        for c in contenders:
            c.seconds += [c.train_step(blocks) for _ in range(steps)]


def summarise(c: Contender, tokens_per_step: int) -> dict:
    # the median step resists the odd step slowed by another process; the mean is reported beside it
    median, mean = statistics.median(c.seconds), statistics.fmean(c.seconds)
    cfg = c.run.model_cfg
    return {"preset": c.preset, "kind": cfg.kind, "active": human(cfg.num_params(True)),
            "total": human(cfg.num_params(False)), "steps": len(c.seconds), "ms_per_step": 1000 * median,
            "ms_mean": 1000 * mean, "steps_per_s": 1 / median, "tokens_per_s": tokens_per_step / median}


def markdown_table(rows: list[dict]) -> str:
    base = rows[0]["tokens_per_s"]
    lines = ["| preset | kind | active | total | timed steps | ms/step (median) | ms/step (mean) | steps/s | "
             "tokens/s | vs " + rows[0]["preset"] + " |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['kind']} | {r['active']} | {r['total']} | {r['steps']} | "
                     f"{r['ms_per_step']:.1f} | {r['ms_mean']:.1f} | {r['steps_per_s']:.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}x |")
    return "\n".join(lines)


def machine_notes() -> list[str]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    threads = torch.get_num_threads()
    return [f"CPU: {cpu}, {os.cpu_count()} logical cores; torch {torch.__version__} with "
            f"{threads} intra-op thread{'s' if threads != 1 else ''}; Python {platform.python_version()}"]


def report(args, rows: list[dict], load_before, load_after, started: str, elapsed: float) -> str:
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    load = lambda la: ", ".join(f"{x:.2f}" for x in la)  # noqa: E731
    return "\n".join([
        "# Training throughput: tiny-dense vs tiny-moe vs tiny-wd", "",
        f"- Date: {started}", f"- Command: `{command}`", *[f"- {n}" for n in machine_notes()],
        f"- Batch {args.batch_size} x {args.seq_len} tokens = {args.batch_size * args.seq_len} tokens/step; "
        f"{args.warmup} warm-up steps per model (not timed), then {args.rounds} rounds of {args.steps} timed steps "
        f"per model, models taking turns; fp32 on CPU; lb_coef {args.lb_coef}, bles_coef {args.bles_coef}",
        f"- Load average (1, 5, 15 min) before: {load(load_before)}; after: {load(load_after)}; "
        f"run took {elapsed:.0f} s", "",
        markdown_table(rows), "",
    ])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny-dense", "tiny-moe", "tiny-wd"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps per model per round")
    p.add_argument("--lb-coef", type=float, default=0.01)
    p.add_argument("--bles-coef", type=float, default=0.0)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    p.add_argument("--out", type=Path, help="also write the report (markdown) here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    load_before, t0 = os.getloadavg(), time.perf_counter()
    cfg = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, lb_coef=args.lb_coef,
                      bles_coef=args.bles_coef, steps=10_000, progress=False)
    data = build_dataset(DataConfig(sources=[str(CORPUS)], seq_len=args.seq_len, seed=cfg.seed), default_tokenizer())
    contenders = [make_contender(p, cfg) for p in args.presets]
    measure(contenders, data.train, args.warmup, args.rounds, args.steps)
    rows = [summarise(c, args.batch_size * args.seq_len) for c in contenders]
    for r in rows:
        print(f"{r['preset']:>12}: {r['tokens_per_s']:8,.0f} tokens/s  {r['steps_per_s']:6.2f} steps/s  "
              f"{r['ms_per_step']:7.1f} ms/step (median of {r['steps']}, mean {r['ms_mean']:.1f})")
    text = report(args, rows, load_before, os.getloadavg(), started, time.perf_counter() - t0)
    print()
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
