"""Training: losses logged, bit-for-bit resume, FSDP2 under torchrun (gloo, 2 processes) matches one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cosmoes.checkpoint import load_model
from cosmoes.data import DataConfig
from cosmoes.errors import CosmoesError
from cosmoes.train import TrainConfig, lr_at, train

REPO = Path(__file__).resolve().parents[1]


def small_cfg(out: Path, **kw) -> TrainConfig:
    base = dict(preset="tiny-moe", out=str(out), steps=20, batch_size=4, seq_len=32, warmup_steps=4, log_every=1,
                eval_every=10, eval_batches=2, save_every=1000, progress=False, lb_coef=0.01, bles_coef=0.1,
                data=DataConfig(sources=[str(REPO / "cosmoes/corpus/austen-persuasion.txt.gz")]))
    base.update(kw)
    return TrainConfig(**base)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)


def test_resume_is_bit_for_bit(tmp_path):
    straight = tmp_path / "straight"
    train(small_cfg(straight))
    interrupted = tmp_path / "interrupted"
    train(small_cfg(interrupted), stop_at=10)
    assert [r["step"] for r in read_metrics(interrupted)][-1] == 10
    train(small_cfg(interrupted), resume=True)

    a, b = read_metrics(straight), read_metrics(interrupted)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 21))
    for ra, rb in zip(a, b):
        for key in ("loss", "lm_loss", "lb_loss", "bles_loss", "exrep"):
            assert ra[key] == rb[key], (ra["step"], key)
    wa, wb = load_model(straight).state_dict(), load_model(interrupted).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_metrics_have_every_term_and_loss_falls(tmp_path):
    out = tmp_path / "run"
    summary = train(small_cfg(out, steps=30, lr=3e-3))
    rows = read_metrics(out)
    assert {"step", "loss", "lm_loss", "lb_loss", "bles_loss", "exrep"} <= set(rows[0])
    assert rows[-1]["lm_loss"] < rows[0]["lm_loss"] - 1.0
    assert 0.0 <= rows[-1]["exrep"] <= 1.0
    assert rows[-1]["lb_loss"] >= 1.0 - 1e-6  # sequence-level Switch loss is minimised at 1.0
    assert summary["val_loss"] is not None and (out / "checkpoint" / "config.json").exists()
    assert (out / "checkpoint" / "tokenizer.json").exists()


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(CosmoesError, match="unknown preset"):
        train(small_cfg(tmp_path / "a", preset="tiny-moo"))
    with pytest.raises(CosmoesError, match="max_seq_len"):
        train(small_cfg(tmp_path / "b", seq_len=4096))
    with pytest.raises(CosmoesError, match="does not exist"):
        train(small_cfg(tmp_path / "c", data=DataConfig(sources=[str(tmp_path / "nope.txt")])))
    with pytest.raises(CosmoesError, match="cannot resume|not found"):
        train(small_cfg(tmp_path / "d"), resume=True)


def test_fsdp2_two_processes_match_one(tmp_path):
    """torchrun + fully_shard on CPU/gloo gives the single-process losses on the same global batch."""
    args = ["--preset", "tiny-moe", "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--warmup-steps", "2",
            "--log-every", "1", "--eval-every", "1000", "--data", str(REPO / "cosmoes/corpus/austen-persuasion.txt.gz"),
            "--bles-coef", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run([sys.executable, "-m", "cosmoes.cli", "train", "--out", str(single), *args], check=True, env=env,
                   capture_output=True)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29517", "-m", "cosmoes.cli", "train", "--out", str(multi), *args], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = read_metrics(single), read_metrics(multi)
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        assert abs(ra["lm_loss"] - rb["lm_loss"]) < 1e-4, (ra, rb)
        assert abs(ra["lb_loss"] - rb["lb_loss"]) < 1e-4, (ra, rb)
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["world_size"] == 2
