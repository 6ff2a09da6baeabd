"""The end-to-end demo on the embedded default: train a tiny CoSMoEs model on the shipped corpus, export it to an
ExecuTorch bundle with one segment per expert, benchmark it under expert offloading (§3.4.2), summarise."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cosmoes.config import DataConfig, TrainConfig


@dataclass
class DemoConfig:
    """What `cosmoes demo` runs; on an idle 2-core machine it takes a few minutes, mostly the export."""

    out: str = "runs/demo"
    preset: str = "tiny-moe"
    steps: int = 150
    batch_size: int = 8
    seq_len: int = 128
    bles_coef: float = 0.0
    target: str = "host"
    quant: str = "8da4w"
    gen: int = 48


def run_demo(cfg: DemoConfig, log=print) -> dict:
    """Train → export → verify → benchmark; returns one flat summary."""
    from cosmoes.bench.harness import BenchConfig, format_table, run_bench
    from cosmoes.eval.verify import verify
    from cosmoes.export.bundle import ExportConfig, export_bundle
    from cosmoes.train import train  # torch: imported on use so the CLI reads DemoConfig's defaults without it

    out = Path(cfg.out)
    log(f"[1/4] training {cfg.preset} for {cfg.steps} steps on the embedded corpus")
    trained = train(TrainConfig(preset=cfg.preset, out=str(out / "train"), steps=cfg.steps,
                                batch_size=cfg.batch_size, seq_len=cfg.seq_len, warmup_steps=max(1, cfg.steps // 10),
                                eval_every=max(1, cfg.steps // 3), log_every=10, save_every=cfg.steps,
                                bles_coef=cfg.bles_coef, data=DataConfig()))
    checkpoint, bundle = trained["checkpoint"], out / "bundle"
    log(f"[2/4] exporting {checkpoint} → {bundle} ({cfg.target}, {cfg.quant}); each expert its own segment")
    manifest = export_bundle(checkpoint, bundle, ExportConfig(target=cfg.target, quant=cfg.quant))
    log("[3/4] verifying the bundle against the checkpoint on held-out text")
    check = verify(bundle, checkpoint)
    log("[4/4] benchmarking decode with the native runner under the expert cache policies")
    report = run_bench(bundle, BenchConfig(policies=["all", "swap", "lru:4"], gen=cfg.gen, repeats=2, threads=1),
                       out / "bench", log=log)
    log(format_table(report))
    by_policy = {r["policy"]: r for r in report.rows if "error" not in r}
    return {
        "model": trained["model"], "steps": trained["steps"], "val_loss": trained["val_loss"],
        "val_ppl": trained["val_ppl"], "train_exrep": trained["exrep"], "checkpoint": checkpoint,
        "bundle": str(bundle), "bundle_mb": manifest.stored_bytes() / 1e6,
        "export_s": manifest.export_seconds, "quant": cfg.quant,
        "top1_agreement": check["top1_agreement"], "greedy_agreement": check["greedy_agreement"],
        **{f"decode_tok_s[{p}]": r["decode_tok_s"] for p, r in by_policy.items()},
        **{f"expert_loads[{p}]": r["expert_loads"] for p, r in by_policy.items()},
        **{f"peak_rss_mb[{p}]": r["peak_rss_mb"] for p, r in by_policy.items()},
    }
