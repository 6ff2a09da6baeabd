"""The hostile-input suite's runner: `cosmoes` command lines, each in its own forked process, and how each ended.

A fresh `python -m cosmoes.cli` per case would pay torch's import (~5 s here) hundreds of times, so one parent imports
the heavy libraries once and forks a child per case: the child runs the real entry point (`cosmoes.cli.main`) with
its own stdout/stderr files, and the parent sees its exit status, any signal (a native crash), and kills it when it
runs past the time bound (a hang). Judged as the issue asks: exit 0, or exit 2 with exactly one `error:` line as the
last thing on stderr; never a traceback, a signal or a hang.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Outcome:
    """How one command line ended."""

    argv: list[str]
    status: int | None  # exit status, or None when killed by a signal
    signal: int | None
    hung: bool
    stdout: str
    stderr: str
    seconds: float

    def problems(self) -> list[str]:
        """What is wrong with this ending (empty: a clean exit 0 or one clean refusal)."""
        found = []
        if self.hung:
            found.append("hung (killed at the time bound)")
        if self.signal is not None and not self.hung:
            found.append(f"killed by signal {self.signal}")
        text = self.stdout + self.stderr
        if "Traceback (most recent call last)" in text:
            found.append("printed a traceback")
        if "terminate called" in text:
            found.append("a C++ exception escaped")
        if self.status not in (0, 2, None):
            found.append(f"exit status {self.status}")
        if self.status == 2:
            lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("error:")]
            if len(errors) != 1 or lines[-1] != errors[0]:
                found.append(f"not one error: line at the end of stderr: {lines[-3:]}")
        return found

    def describe(self) -> str:
        tail = (self.stderr.strip().splitlines() or [""])[-1][:200]
        return f"{' '.join(self.argv)} -> {'; '.join(self.problems()) or 'ok'} [{tail}]"


def warm_imports() -> None:
    """Import what the commands import, once, before forking (children then start in milliseconds)."""
    import executorch.runtime  # noqa: F401
    import lm_eval  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import cosmoes.cli  # noqa: F401
    import cosmoes.hf  # noqa: F401


def run(argv: list[str], cwd: Path, timeout: float = 120.0, stdin: bytes = b"") -> Outcome:
    """Run `cosmoes ARGV` in a forked child with ``cwd`` as its working directory."""
    out, err, inp = cwd / ".stdout", cwd / ".stderr", cwd / ".stdin"
    inp.write_bytes(stdin)
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        _child(argv, cwd, out, err, inp)
    status, sig, hung = _wait(pid, timeout)
    return Outcome(argv, status, sig, hung, out.read_text(errors="replace"), err.read_text(errors="replace"),
                   time.monotonic() - t0)


def _child(argv: list[str], cwd: Path, out: Path, err: Path, inp: Path) -> None:
    code = 1
    try:
        os.chdir(cwd)
        os.setsid()  # the parent kills the whole group on a hang (the native runner is a grandchild)
        for fd, path, mode in ((0, inp, os.O_RDONLY), (1, out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                               (2, err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            os.dup2(os.open(path, mode, 0o644), fd)
        # pytest's capture replaced sys.std*; the child writes where a user's process would, to fds 0-2
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        sys.argv = ["cosmoes", *argv]
        from cosmoes.cli import main

        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # what the interpreter would print for an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _wait(pid: int, timeout: float) -> tuple[int | None, int | None, bool]:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status):
                return None, os.WTERMSIG(status), False
            return os.WEXITSTATUS(status), None, False
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None, signal.SIGKILL, True
        time.sleep(0.02)


class Runner:
    """What the tests use: ``run`` one command line, ``check`` a list of outcomes."""

    run = staticmethod(run)

    @staticmethod
    def check(outcomes: list[Outcome]) -> None:
        assert_all_clean(outcomes)


@pytest.fixture(scope="session")
def cosmoes_run() -> Runner:
    """The runner, with the heavy imports paid once per session."""
    warm_imports()
    return Runner()


def assert_all_clean(outcomes: list[Outcome]) -> None:
    """Fail with every bad ending listed (not just the first), so one run shows the whole picture."""
    bad = [o.describe() for o in outcomes if o.problems()]
    assert not bad, f"{len(bad)} of {len(outcomes)} cases ended badly:\n" + "\n".join(bad)
