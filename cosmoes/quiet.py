"""Third-party noise (native log lines, library logging, warnings) kept off the terminal unless verbose."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from typing import Iterator

VERBOSE_ENV = "COSMOES_VERBOSE"  # an environment variable, so that subprocesses (bench's eager run) follow suit
# torchao logs every CUDA-only kernel it fails to load and torch every deprecated pytree registration torchao makes,
# on each start; lm-eval warns about every custom-data task. None of it is something a cosmoes user can act on.
START_LOGGERS = ("torchao", "torch.utils._pytree")
CLI_LOGGERS = START_LOGGERS + ("lm_eval",)
# Python warnings raised inside these packages (deprecations, experimental-API notes) concern their maintainers
_NOISY_PACKAGES = r"(torch|torchao|executorch|transformers|lm_eval|datasets|huggingface_hub)(\.|$)"


def verbose() -> bool:
    """Whether third-party noise is shown (`cosmoes --verbose`, or COSMOES_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose() -> None:
    """Show third-party noise from now on, in this process and its children."""
    os.environ[VERBOSE_ENV] = "1"
    quiet_logging(CLI_LOGGERS)


def quiet_logging(names: tuple[str, ...] = START_LOGGERS) -> None:
    """Let only errors through the named loggers, unless verbose (then their own levels apply)."""
    level = logging.NOTSET if verbose() else logging.ERROR
    for name in names:
        logging.getLogger(name).setLevel(level)


def quiet_cli() -> None:
    """The command line's setting: third-party loggers and warnings silenced unless verbose."""
    quiet_logging(CLI_LOGGERS)
    if not verbose():
        warnings.filterwarnings("ignore", module=_NOISY_PACKAGES)


@contextlib.contextmanager
def native_stderr_hidden() -> Iterator[None]:
    """Point file descriptor 2 at a discarded temporary file for the block, unless verbose.

    ExecuTorch's native code (cpuinfo, the thread pool) writes its log lines straight to fd 2, past sys.stderr, so
    only a redirect of the descriptor itself keeps them off the terminal.
    """
    if verbose():
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to protect
        yield
        return
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


__all__ = ["VERBOSE_ENV", "verbose", "set_verbose", "quiet_logging", "quiet_cli", "native_stderr_hidden"]
