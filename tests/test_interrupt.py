"""Interruptions lose nothing: `cosmoes train` and `cosmoes export` killed (SIGKILL) at random moments leave the
previous checkpoint or bundle loadable, and a resumed run ends exactly where an uninterrupted one does."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cosmoes.checkpoint import clear_leftovers, load_model

REPO = Path(__file__).resolve().parents[1]
SEED = 14  # the kill moments are random but the same on every run

# A process that has imported the heavy modules once and forks a child per `cosmoes` command line it reads on stdin
# (a JSON [argv, log prefix]): a cold start costs ~10 s on 2 busy cores, which 20+ restarts cannot afford. It
# answers each command with the child's pid, then, once the child has ended (or been killed), its exit code.
ZYGOTE = r"""
import json, os, sys, traceback
import cosmoes.cli, cosmoes.train, cosmoes.hf, cosmoes.export.bundle, transformers, executorch.exir  # noqa: F401
print("ready", flush=True)
for line in sys.stdin:
    argv, log = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        for fd, name in ((1, "out"), (2, "err")):
            os.dup2(os.open(f"{log}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = ["cosmoes", *argv]
        code = 1
        try:
            cosmoes.cli.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0
        except BaseException:
            traceback.print_exc()
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Zygote:
    """Runs `cosmoes` command lines in forked children, one at a time, that the test may kill."""

    def __init__(self, logs: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        assert self.proc.stdout.readline().strip() == "ready"
        self.logs, self.count = logs, 0
        logs.mkdir(parents=True, exist_ok=True)

    def next_log(self) -> Path:
        """The log prefix (PREFIX.out, PREFIX.err) of the next child."""
        return self.logs / f"{self.count + 1:03d}"

    def start(self, argv: list[str]) -> tuple[int, Path]:
        """(pid, log prefix) of a new child running `cosmoes *argv`."""
        log = self.next_log()
        self.count += 1
        self.proc.stdin.write(json.dumps([argv, str(log)]) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline()), log

    def wait(self) -> int:
        """The exit code of the last child (-9 if killed), once it has ended."""
        return int(self.proc.stdout.readline())

    def run(self, argv: list[str]) -> tuple[int, str]:
        """(exit code, stderr) of a child run to its end."""
        _, log = self.start(argv)
        return self.wait(), Path(f"{log}.err").read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture
def zygote(tmp_path):
    z = Zygote(tmp_path / "logs")
    yield z
    z.close()


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (an export's lowering workers)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def kill_when(pid: int, ready, delay: float, timeout: float = 300) -> list[int]:
    """SIGKILL ``pid`` ``delay`` seconds after ``ready()`` first holds (polled), or when it has exited anyway;
    returns the children it had when killed."""
    end = time.monotonic() + timeout
    while not ready() and time.monotonic() < end:
        try:
            os.kill(pid, 0)  # a zombie until the zygote reaps it: still "exists"
        except ProcessLookupError:
            return []
        time.sleep(0.002)
    time.sleep(delay)
    left = children(pid)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return left


def still_running(pids: list[int], timeout: float) -> list[int]:
    """Those of ``pids`` still running (not ended, not a zombie) after up to ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        running = []
        for p in pids:
            try:
                state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                running.append(p)
        if not running or time.monotonic() > end:
            return running
        time.sleep(0.05)


def temp_siblings(target: Path) -> set[Path]:
    return set(target.parent.glob(f".{target.name}.tmp-*"))


def temp_holds(target: Path, name: str = ""):
    """A condition: a temp copy of ``target`` that did not exist yet when asked for holds ``name`` (a killed
    writer's copy stays until the next write clears it)."""
    stale = temp_siblings(target)
    return lambda: any((t / name).exists() for t in temp_siblings(target) - stale)


# -- training ---------------------------------------------------------------------------------------------------

# The schedule spans 1000 steps so that no life of the run gets to finish it; the end is set with --stop-at
STEPS, SAVE_EVERY, KILLS = 1000, 5, 20
TRAIN_FLAGS = ["--preset", "tiny-moe", "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--batch-size", "2",
               "--seq-len", "32", "--eval-every", "20", "--log-every", "1", "--warmup-steps", "5",
               "--data", str(REPO / "cosmoes/corpus/austen-persuasion.txt.gz")]
RUN_FILES = {"checkpoint", "metrics.jsonl", "train_config.json", "summary.json"}


def checkpoint_step(out: Path) -> int | None:
    """The step of OUT/checkpoint, after proving that its weights and training state load; None if absent."""
    from cosmoes.config import TrainConfig
    from cosmoes.model import Transformer
    from cosmoes.train import build_optimizer, read_training_state

    ckpt = out / "checkpoint"
    if not ckpt.exists():
        return None
    model = load_model(ckpt)
    cfg = TrainConfig.from_dict(json.loads((ckpt / "train_config.json").read_text()))
    live = Transformer(model.config)
    return read_training_state(ckpt, live, *build_optimizer(live, cfg)).step


def inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def kill_moment(rng: random.Random, out: Path):
    """(what, condition, delay): a seeded mix of moments from start-up to the instant after a checkpoint swap."""
    ckpt = out / "checkpoint"
    before = inode(ckpt)
    saved = lambda: inode(ckpt) != before  # noqa: E731 (the swap gives OUT/checkpoint the new copy's inode)
    kind = rng.choice(["start-up", "training", "writing", "swapping", "swapped"])
    return kind, *{
        "start-up": (lambda: True, rng.uniform(0.0, 3.0)),  # reading the checkpoint, the data, the first steps
        "training": (saved, rng.uniform(0.0, 1.5)),  # steps after a save, or in the next one
        "writing": (temp_holds(ckpt), rng.uniform(0.0, 0.3)),  # the temp copy half-written
        "swapping": (temp_holds(ckpt, "train_config.json"), rng.uniform(0.0, 0.02)),  # its last file: fsync, swap
        "swapped": (saved, rng.uniform(0.0, 0.01)),  # the old copy not yet removed
    }[kind]


@pytest.mark.slow
def test_killed_training_resumes_to_the_uninterrupted_result(tmp_path, zygote):
    rng = random.Random(SEED)
    out, straight = tmp_path / "run", tmp_path / "straight"
    kills, step, log = 0, None, []
    while kills < KILLS:
        what, ready, delay = kill_moment(rng, out)  # before the start: what exists now is stale
        pid, _ = zygote.start(["train", "--out", str(out), *TRAIN_FLAGS, *(["--resume"] if step is not None else [])])
        kill_when(pid, ready, delay)
        code = zygote.wait()
        assert code == -signal.SIGKILL, (what, code, log)
        previous, step = step, checkpoint_step(out)  # the checkpoint the kill left loads...
        assert previous is None or (step or 0) >= previous, (what, previous, step)  # ...and nothing saved is lost
        assert {p.name for p in out.iterdir() if not p.name.startswith(".")} <= RUN_FILES
        log.append((what, round(delay, 3), step))
        kills += 1
    end = (step or 0) + 2 * SAVE_EVERY
    code, err = zygote.run(["train", "--out", str(out), *TRAIN_FLAGS, "--resume", "--stop-at", str(end)])
    assert code == 0, err[-3000:]
    assert set(os.listdir(out)) == RUN_FILES, "the next writes clear what the killed ones left"
    code, err = zygote.run(["train", "--out", str(straight), *TRAIN_FLAGS, "--stop-at", str(end)])
    assert code == 0, err[-3000:]
    a, b = read_metrics(straight), read_metrics(out)
    assert [r["step"] for r in b] == list(range(1, end + 1))
    assert [(r["loss"], r.get("val_loss")) for r in a] == [(r["loss"], r.get("val_loss")) for r in b]
    wa, wb = load_model(straight).state_dict(), load_model(out).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    print(f"{KILLS} kills (moment, delay s, checkpoint step after): {log}")


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- export -----------------------------------------------------------------------------------------------------

def logged(log: Path, text: str):
    """A condition: the child's stderr has printed ``text``."""
    err = Path(f"{log}.err")
    return lambda: err.exists() and text in err.read_text()


def export_moments(rng: random.Random) -> list[tuple[str, float]]:
    """Every kind of moment once, in a seeded order, each with a seeded delay."""
    moments = [("start-up", rng.uniform(0.5, 3.0)), ("lowering the backbone", rng.uniform(0.0, 1.0)),
               ("backbone.pte written", rng.uniform(0.0, 0.5)), ("lowering the experts", rng.uniform(0.0, 1.0)),
               ("manifest.json written", rng.uniform(0.0, 0.02))]
    rng.shuffle(moments)
    return moments


def export_condition(what: str, log: Path, bundle: Path):
    return {"start-up": lambda: True, "lowering the backbone": logged(log, "[backbone] lowered"),
            "backbone.pte written": temp_holds(bundle, "backbone.pte"),
            "lowering the experts": logged(log, "[experts] lowered"),
            "manifest.json written": temp_holds(bundle, "manifest.json")}[what]


def bundle_identity(bundle: Path) -> tuple:
    """What tells one export from another: its creation stamp and every program's sha256 (files verified)."""
    from cosmoes.export.manifest import load_manifest

    m = load_manifest(bundle)
    return m.created, m.export_seconds, tuple(sorted((k, p["sha256"]) for k, p in m.programs.items()))


@pytest.mark.slow
def test_killed_export_leaves_the_previous_bundle(tmp_path, zygote, micro_checkpoint, micro_bundle_fp32):
    rng = random.Random(SEED)
    bundle = tmp_path / "bundles" / "micro"
    shutil.copytree(micro_bundle_fp32, bundle)
    before = bundle_identity(bundle)
    argv = ["export", str(micro_checkpoint), "--target", "host", "--quant", "none", "--out", str(bundle),
            "--max-chunk", "16"]
    log = []
    for what, delay in export_moments(rng):
        child_log = zygote.next_log()
        ready = export_condition(what, child_log, bundle)  # before the start: temp copies that exist now are stale
        pid, _ = zygote.start(argv)
        workers = kill_when(pid, ready, delay)
        code = zygote.wait()
        assert code == -signal.SIGKILL, (what, code, Path(f"{child_log}.err").read_text()[-2000:])
        # its lowering workers end too, at the latest when their next result finds no reader
        assert still_running(workers, timeout=120) == [], (what, workers)
        now = bundle_identity(bundle)  # loads and verifies every file: whatever is at OUT is a whole bundle
        # the previous bundle, unless the kill came after the last step: the swap that puts the new one in place
        assert now == before or what == "manifest.json written", what
        before = now
        others = [p.name for p in bundle.parent.iterdir() if p != bundle]
        assert all(name.startswith(".micro.tmp-") for name in others), others  # hidden temp copies only
        log.append((what, round(delay, 3), len(others)))
    clear_leftovers(bundle)  # what the next export does first
    assert os.listdir(bundle.parent) == ["micro"] and bundle_identity(bundle) == before
    print(f"export kills (moment, delay s, temp copies left): {log}")
