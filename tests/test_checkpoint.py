"""Checkpoint files: written atomically (temp sibling + rename), and no file a run directory holds can run code."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cosmoes import checkpoint
from cosmoes.checkpoint import atomic_dir, clear_leftovers, write_text_atomic
from cosmoes.config import DataConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def leftover(target: Path, pid: int, kind: str = "tmp") -> Path:
    path = target.with_name(f".{target.name}.{kind}-{checkpoint._HOST}-{pid}-0123abcd")
    path.mkdir()
    (path / "half-written").write_text("x")
    return path


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_atomic_dir_replaces_only_when_complete(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("interrupted")
    assert (out / "a").read_text() == "1"
    with atomic_dir(out) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or old copy left behind


def test_leftovers_of_dead_writers_are_cleared_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead, alive = leftover(out, dead_pid()), leftover(out, os.getppid())
    other = tmp_path / ".other.tmp-x-1-00"
    other.mkdir()
    clear_leftovers(out)
    assert not dead.exists() and alive.exists() and other.exists() and out.exists()


def test_a_previous_copy_left_between_two_renames_is_put_back(tmp_path):
    out = tmp_path / "out"
    old = leftover(out, dead_pid(), kind="old")
    clear_leftovers(out)
    assert not old.exists() and (out / "half-written").exists()


def test_write_text_atomic(tmp_path):
    path = tmp_path / "summary.json"
    write_text_atomic(path, "{}")
    write_text_atomic(path, '{"a": 1}')
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    (tmp_path / "plain").write_text("")
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode  # the umask's mode, not mkstemp's 0600


# -- no code from any file ----------------------------------------------------------------------------------------

class Payload:
    """Unpickling this creates ``marker``: proof that a file was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


RUN = TrainConfig(preset="tiny-moe", out="", steps=2, batch_size=2, seq_len=32, warmup_steps=1, eval_every=2,
                  data=DataConfig(sources=[str(REPO / "cosmoes/corpus/austen-persuasion.txt.gz")]))
RUN_FLAGS = ["--preset", "tiny-moe", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--warmup-steps", "1",
             "--eval-every", "2", "--data", RUN.data.sources[0]]
MUST_REFUSE = {"checkpoint/trainer_state.json", "checkpoint/trainer_state.safetensors", "checkpoint/config.json",
               "checkpoint/model.safetensors", "checkpoint/train_config.json", "checkpoint/tokenizer.json",
               "legacy"}
LOADED_BY_EXPORT = {"checkpoint/config.json", "checkpoint/model.safetensors", "checkpoint/tokenizer.json"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A completed 2-step run (resuming it reads every file and trains nothing)."""
    import dataclasses

    from cosmoes.train import train

    out = tmp_path_factory.mktemp("pickle") / "run"
    train(dataclasses.replace(RUN, out=str(out), progress=False))
    return out


def plant(run: Path, case: str, payload: bytes) -> None:
    """Overwrite one file of a run directory with a pickle, or plant pickles where a loader might look for one."""
    if case == "legacy":  # a run of an older cosmoes: only the pickled state
        for name in ("trainer_state.json", "trainer_state.safetensors"):
            (run / "checkpoint" / name).unlink()
        case = "checkpoint/trainer_state.pt"
    (run / case).write_bytes(payload)


@pytest.mark.slow
def test_no_file_of_a_run_directory_runs_code(finished_run, tmp_path, cosmoes_run):
    """A pickle that would create a marker file, planted in each file in turn: resume/info/export never unpickle."""
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(Payload(str(marker)))
    files = sorted(p.relative_to(finished_run).as_posix() for p in finished_run.rglob("*") if p.is_file())
    assert {"metrics.jsonl", "summary.json", "train_config.json", "checkpoint/config.json",
            "checkpoint/model.safetensors", "checkpoint/trainer_state.json", "checkpoint/trainer_state.safetensors",
            "checkpoint/tokenizer.json"} <= set(files)
    cases = files + ["checkpoint/trainer_state.pt", "checkpoint/pytorch_model.bin", "legacy"]
    commands, expect = [], []
    for i, case in enumerate(cases):
        run = tmp_path / f"case{i}" / "run"
        shutil.copytree(finished_run, run)
        plant(run, case, payload)
        commands.append(["train", "--out", str(run), *RUN_FLAGS, "--resume"])
        expect.append((case, "train"))
        if case.startswith("checkpoint/"):
            commands.append(["info", str(run / "checkpoint")])
            expect.append((case, "info"))
        if case in LOADED_BY_EXPORT:
            commands.append(["export", str(run / "checkpoint"), "--target", "host", "--quant", "none", "--out",
                             str(tmp_path / f"bundle{i}"), "--max-chunk", "16"])
            expect.append((case, "export"))
    outcomes = [cosmoes_run.run(argv, tmp_path, timeout=600) for argv in commands]
    results = [(o.status, o.stderr) for o in outcomes]
    assert not marker.exists()
    for (case, command), (code, err) in zip(expect, results):
        assert "Traceback" not in err, (case, command, err[-2000:])
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code in (0, 2) and len(errors) == (code == 2), (case, command, code, err[-2000:])
        if command == "train" and case in MUST_REFUSE:
            assert code == 2, (case, err)
    codes = {(case, command): code for (case, command), (code, _) in zip(expect, results)}
    assert codes[("metrics.jsonl", "train")] == 0 and codes[("checkpoint/pytorch_model.bin", "train")] == 0
