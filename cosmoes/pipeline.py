"""The end-to-end demo on the embedded default: train a tiny CoSMoEs model on the shipped corpus and summarise it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cosmoes.data import DataConfig
from cosmoes.train import TrainConfig, train


@dataclass
class DemoConfig:
    """What `cosmoes demo` runs; the defaults finish in a few minutes on a 2-core laptop."""

    out: str = "runs/demo"
    preset: str = "tiny-moe"
    steps: int = 150
    batch_size: int = 8
    seq_len: int = 128
    bles_coef: float = 0.0


def run_demo(cfg: DemoConfig) -> dict:
    """Train → (export → benchmark, once those stages exist) → one summary dict."""
    out = Path(cfg.out)
    train_cfg = TrainConfig(preset=cfg.preset, out=str(out / "train"), steps=cfg.steps, batch_size=cfg.batch_size,
                            seq_len=cfg.seq_len, warmup_steps=max(1, cfg.steps // 10), eval_every=max(1, cfg.steps // 3),
                            log_every=10, save_every=cfg.steps, bles_coef=cfg.bles_coef, data=DataConfig())
    summary = {"stage": "train", **train(train_cfg)}
    return summary
