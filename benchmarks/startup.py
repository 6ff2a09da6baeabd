"""Start-up time of the command line: `cosmoes --help` and `cosmoes info wearable-moe`, each in a fresh process.

Targets (issue #13): --help <= 0.5 s, info <= 1 s, wall clock from process start to exit. Neither imports torch, so
what is measured is the interpreter, typer and cosmoes' torch-free modules. The minimum says what the code costs;
the median says what a user on a busy machine sees.

    python benchmarks/startup.py                # 9 runs of each
    python benchmarks/startup.py --runs 21
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cosmoes.system import cpu_name, usable_cores

COMMANDS = {"cosmoes --help": (["--help"], 0.5), "cosmoes info wearable-moe": (["info", "wearable-moe"], 1.0)}


def cosmoes_command() -> list[str]:
    """The installed entry point beside this interpreter (what a user types), else `python -m cosmoes.cli`."""
    script = Path(sys.executable).parent / "cosmoes"
    if script.exists():
        return [str(script)]
    found = shutil.which("cosmoes")
    return [found] if found else [sys.executable, "-m", "cosmoes.cli"]


def time_once(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def measure(args: list[str], runs: int) -> list[float]:
    cmd = cosmoes_command() + args
    time_once(cmd)  # warm the page cache and .pyc files: the first run after an edit recompiles
    return [time_once(cmd) for _ in range(runs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    runs = parser.parse_args().runs
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"CPU: {cpu_name()} ({usable_cores()} usable cores), load average {load}")
    print(f"Python {platform.python_version()} ({sys.executable}), {runs} runs each after one warm-up")
    print(f"{'command':<28} {'min s':>7} {'median s':>9} {'target s':>9}  ok")
    for label, (args, target) in COMMANDS.items():
        times = measure(args, runs)
        best, median = min(times), statistics.median(times)
        print(f"{label:<28} {best:>7.3f} {median:>9.3f} {target:>9.1f}  {'yes' if median <= target else 'NO'}")


if __name__ == "__main__":
    main()
