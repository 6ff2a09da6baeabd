"""Training: losses logged, bit-for-bit resume, FSDP2 under torchrun (gloo, 2 processes) matches one process."""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cosmoes.checkpoint import load_model
from cosmoes.data import DataConfig
from cosmoes.errors import CosmoesError
from cosmoes.train import STATE_JSON, STATE_TENSORS, TrainConfig, lr_at, train

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


# -- resume: the training state is data (safetensors + JSON), checked before use -------------------------------------

@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A 6-step run stopped (checkpointed) after step 2; tests resume copies of it."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    train(small_cfg(out, steps=6, log_every=1), stop_at=2)
    return out


def copy_run(stopped_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    return out


def test_checkpoint_holds_no_pickle(stopped_run):
    ckpt = stopped_run / "checkpoint"
    assert {STATE_JSON, STATE_TENSORS, "train_config.json", "model.safetensors"} <= {p.name for p in ckpt.iterdir()}
    assert not list(ckpt.glob("*.pt")) and not list(ckpt.glob("*.bin"))
    meta = json.loads((ckpt / STATE_JSON).read_text())
    assert meta["step"] == 2 and meta["scheduler"]["last_epoch"] == 2


def test_resume_names_the_settings_that_differ(stopped_run, tmp_path):
    out = copy_run(stopped_run, tmp_path)
    with pytest.raises(CosmoesError) as err:
        train(small_cfg(out, steps=6, log_every=1, lr=1e-3, preset="tiny-wd"), resume=True)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"cannot resume {out}: ")
    assert "preset tiny-moe -> tiny-wd" in message and "lr 0.003 -> 0.001" in message
    assert "steps" not in message.split(":", 1)[1].replace("warmup_steps", "")
    assert message.endswith("differ from the run's train_config.json")


def test_resume_may_extend_steps_and_drops_torn_metrics(stopped_run, tmp_path, capsys):
    out = copy_run(stopped_run, tmp_path)
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "\x00garbled", *lines[1:], '{"step": 3, "loss": 9.0']))  # torn last line
    train(small_cfg(out, steps=8, log_every=1), resume=True)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "metrics.jsonl: dropped 2 unreadable lines (2, 4)" in warnings[0]
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 9))
    assert json.loads((out / "train_config.json").read_text())["steps"] == 8


def test_a_torn_last_line_alone_is_named_so(stopped_run, tmp_path, capsys):
    out = copy_run(stopped_run, tmp_path)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')
    train(small_cfg(out, steps=6, log_every=1), resume=True, stop_at=3)
    assert "dropped a torn last line" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


def live_trainer(cfg: TrainConfig):
    """(model, optimiser, scheduler) as a resumed run builds them, to read a training state against."""
    from cosmoes.config import get_preset
    from cosmoes.model import Transformer
    from cosmoes.train import build_optimizer

    model = Transformer(get_preset(cfg.preset))
    return (model, *build_optimizer(model, cfg))


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _set(path: list, value):
    def edit(data):
        for key in path[:-1]:
            data = data[key]
        data[path[-1]] = value
    return edit


STATE_CORRUPTIONS = {
    "step": (_set(["step"], -1), "step is -1"),
    "step-type": (_set(["step"], "2"), "step is '2'"),
    "format": (_set(["format"], "pickle"), "format is not"),
    "lr": (_set(["optimizer", "param_groups", 0, "lr"], float("nan")), "param_groups[0].lr is NaN, not a finite"),
    "lr-type": (_set(["optimizer", "param_groups", 0, "lr"], "0.1"), "param_groups[0].lr"),
    "params": (_set(["optimizer", "param_groups", 0, "params"], []), "param_groups[0].params"),
    "unknown-group-field": (_set(["optimizer", "param_groups", 0, "__class__"], 1), "param_groups[0].__class__"),
    "missing-param": (lambda d: d["optimizer"]["state"].pop("output.weight"), "optimizer.state does not list"),
    "state-names": (_set(["optimizer", "state", "norm.weight"], "exp_avg"), "optimizer.state.norm.weight"),
    "missing-tensor": (lambda d: d["optimizer"]["state"]["norm.weight"].append("momentum"),
                       "optimizer/norm.weight/momentum is missing"),
    "scheduler-lambda": (_set(["scheduler", "lr_lambdas"], [{"__code__": 1}]), "scheduler.lr_lambdas[0]"),
    "scheduler-field": (_set(["scheduler", "optimizer"], None), "scheduler.optimizer is not a field"),
    "scheduler-step": (_set(["scheduler", "last_epoch"], 1), "scheduler.last_epoch is 1, not the step 2"),
    "python-random": (_set(["python_random"], [3, [1, 2], None]), "python_random is not"),
    "not-an-object": (lambda d: d.clear(), "format is not"),
}


@pytest.mark.parametrize("case", sorted(STATE_CORRUPTIONS))
def test_training_state_is_validated(stopped_run, tmp_path, case):
    from cosmoes.train import read_training_state

    out = copy_run(stopped_run, tmp_path)
    ckpt = out / "checkpoint"
    edit, expected = STATE_CORRUPTIONS[case]
    edit_json(ckpt / STATE_JSON, edit)
    with pytest.raises(CosmoesError) as err:
        read_training_state(ckpt, *live_trainer(small_cfg(out, steps=6)))
    message = str(err.value)
    assert "\n" not in message and expected in message
    assert message.startswith(f"corrupt training state {ckpt / STATE_JSON}: ") or "is missing" in expected


def test_training_state_tensors_are_checked(stopped_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from cosmoes.train import read_training_state

    ckpt = copy_run(stopped_run, tmp_path) / "checkpoint"
    live = live_trainer(small_cfg(ckpt.parent, steps=6))
    tensors = load_file(ckpt / STATE_TENSORS)
    cases = [("optimizer/norm.weight/exp_avg", torch.zeros(3), "is [3] torch.float32 where the parameter is [128]"),
             ("optimizer/norm.weight/step", torch.tensor(-1.0), "not a non-negative step"),
             ("rng/torch", torch.zeros(7, dtype=torch.uint8), "rng/torch is missing or not"),
             ("extra", torch.zeros(1), "extra is not part of")]
    for name, value, problem in cases:
        save_file({**tensors, name: value}, ckpt / STATE_TENSORS)
        with pytest.raises(CosmoesError, match=re.escape(f"{ckpt / STATE_TENSORS}: ") + ".*" + re.escape(problem)):
            read_training_state(ckpt, *live)
    (ckpt / STATE_TENSORS).write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(CosmoesError, match=f"corrupt training state {ckpt / STATE_TENSORS}: "):
        read_training_state(ckpt, *live)


def test_an_older_pickled_state_is_refused_unread(stopped_run, tmp_path):
    out = copy_run(stopped_run, tmp_path)
    marker = tmp_path / "pwned"
    for name in (STATE_JSON, STATE_TENSORS):
        (out / "checkpoint" / name).unlink()
    (out / "checkpoint" / "trainer_state.pt").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CosmoesError, match="written by an older cosmoes .*; start a new run$"):
        train(small_cfg(out, steps=6), resume=True)
    assert not marker.exists()


def test_resume_past_the_last_step_is_refused(stopped_run, tmp_path):
    out = copy_run(stopped_run, tmp_path)
    with pytest.raises(CosmoesError, match="at step 2, past --steps 1"):
        train(small_cfg(out, steps=1), resume=True)


class Payload:
    """Unpickling this creates ``marker``: proof that a file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_no_torch_load_without_weights_only():
    """Every torch.load in the repository says weights_only=True (pickle runs code; tensors-only loading does not)."""
    folders = [p for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")]
    sources = [p for folder in folders for p in folder.rglob("*.py") if p != Path(__file__).resolve()]
    calls = [(p, line) for p in sources for line in p.read_text().splitlines() if "torch.load(" in line]
    assert all("weights_only=True" in line for _, line in calls), calls
