"""Where a results page came from: the commit of this checkout and the command line that ran."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """Short HEAD commit of the checkout, with '-dirty' when tracked files differ from it; 'unknown' outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line(argv: list[str] | None = None) -> str:
    """The running command as a shell line, its program named `cosmoes` (the entry point, `python -m cosmoes.cli`
    and a venv path all mean the same command)."""
    argv = sys.argv if argv is None else argv
    return shlex.join(["cosmoes", *argv[1:]])


__all__ = ["git_commit", "command_line"]
