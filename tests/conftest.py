"""Suite-wide test settings, the micro checkpoint and bundles shared by the export, bench and eval tests, and the
fork runner that runs `cosmoes` command lines as a user would (the hostile-input suite and the pickle test).

Exporting costs ~4 s per method on a 2-core machine, so every test that needs a bundle shares these (built once per
session). The micro model keeps the shipped tokenizer's 8192-token vocabulary so bundles can be driven with text.
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
import torch

from cosmoes.config import ModelConfig


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    # The tests run micro models: a second intra-op thread only adds wake-ups (index_add_ in the MoE dispatch takes
    # milliseconds per call on a busy 2-core machine), so the whole suite runs with one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MICRO = ModelConfig(vocab_size=8192, dim=64, n_layers=2, n_heads=2, ffn_dim=128, num_experts=4, top_k=2,
                    max_seq_len=64, name="micro-moe")
MICRO_CHUNK = 16  # tokens per call: small so prompts longer than a chunk exercise chunked prefill


@pytest.fixture(scope="session")
def micro_config() -> ModelConfig:
    return MICRO.replace()


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory):
    """A randomly initialised micro MoE checkpoint (seed 0) with the shipped tokenizer."""
    from cosmoes.checkpoint import save_checkpoint
    from cosmoes.model import Transformer, init_weights
    from cosmoes.tokenizer import default_tokenizer

    model = init_weights(Transformer(MICRO.replace()), seed=0)
    return save_checkpoint(model, tmp_path_factory.mktemp("micro") / "ckpt", tokenizer=default_tokenizer())


def _export(checkpoint, out, quant: str, experts: str | None = None, kv_cache: str = "fp32"):
    from cosmoes.export.bundle import ExportConfig, export_bundle

    export_bundle(checkpoint, out, ExportConfig(target="host", quant=quant, max_chunk=MICRO_CHUNK, experts=experts,
                                                kv_cache=kv_cache))
    return out


@pytest.fixture(scope="session")
def micro_bundle_fp32(micro_checkpoint, tmp_path_factory):
    """The micro checkpoint exported without quantisation (matches eager to ~1e-6)."""
    return _export(micro_checkpoint, tmp_path_factory.mktemp("bundles") / "micro-fp32", "none")


@pytest.fixture(scope="session")
def micro_bundle_8da4w(micro_checkpoint, tmp_path_factory):
    """The micro checkpoint exported with 8-bit dynamic activations and 4-bit group-wise weights."""
    return _export(micro_checkpoint, tmp_path_factory.mktemp("bundles") / "micro-8da4w", "8da4w")


@pytest.fixture(scope="session")
def micro_bundle_8da4w_kv16(micro_checkpoint, tmp_path_factory):
    """The 8da4w export with fp16 KV caches (--kv-cache fp16)."""
    return _export(micro_checkpoint, tmp_path_factory.mktemp("bundles") / "micro-8da4w-kv16", "8da4w", kv_cache="fp16")


@pytest.fixture(scope="session")
def micro_bundle_8da4w_xnnpack(micro_checkpoint, tmp_path_factory):
    """The same 8da4w export with the experts as XNNPACK methods of experts.pte (--experts xnnpack), not int4
    segments of experts.bin."""
    return _export(micro_checkpoint, tmp_path_factory.mktemp("bundles") / "micro-8da4w-xnnpack", "8da4w", "xnnpack")


MICRO_WD = MICRO.replace(n_layers=1, wd_rank=16, name="micro-wd")  # one layer: the export cost is per method


@pytest.fixture(scope="session")
def micro_wd_checkpoint(tmp_path_factory):
    """A randomly initialised micro weight-decomposed MoE checkpoint (seed 0) with the shipped tokenizer."""
    from cosmoes.checkpoint import save_checkpoint
    from cosmoes.model import Transformer, init_weights
    from cosmoes.tokenizer import default_tokenizer

    model = init_weights(Transformer(MICRO_WD.replace()), seed=0)
    return save_checkpoint(model, tmp_path_factory.mktemp("micro-wd") / "ckpt", tokenizer=default_tokenizer())


@pytest.fixture(scope="session")
def micro_bundle_wd_fp32(micro_wd_checkpoint, tmp_path_factory):
    """The micro WD checkpoint exported without quantisation (low-rank expert linears, one method per expert)."""
    return _export(micro_wd_checkpoint, tmp_path_factory.mktemp("bundles") / "micro-wd-fp32", "none")


# -- the fork runner ------------------------------------------------------------------------------------------------
# A fresh `python -m cosmoes.cli` per case would pay torch's import (~5 s here) hundreds of times, so this process
# imports the heavy libraries once and forks a child per command line: the child runs the real entry point
# (`cosmoes.cli.main`) with its own stdout/stderr files, and the parent sees its exit status, any signal (a native
# crash), and kills it when it runs past the time bound (a hang). Judged as issue #14 asks: exit 0, or exit 2 with
# exactly one `error:` line as the last thing on stderr; never a traceback, a signal or a hang.


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
