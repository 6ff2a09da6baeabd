"""Facts about the machine a command runs on: usable cores, what "threads 0" means, the CPU's name. No torch."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one, else every core)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_threads(threads: int) -> int:
    """A thread count as every runtime reads it: 0 means one thread per usable core."""
    return threads or usable_cores()


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The vector instruction sets that decide which kernels run, widest first (Linux /proc/cpuinfo flag names).
_ISA_FLAGS = (("avx512_vnni", "AVX-512 VNNI"), ("avx512f", "AVX-512"), ("avx_vnni", "AVX-VNNI"), ("avx2", "AVX2"),
              ("i8mm", "NEON i8mm"), ("asimddp", "NEON dotprod"), ("asimd", "NEON"))


def cpu_isa() -> str:
    """The instruction sets a benchmark figure depends on, e.g. "AVX-512 VNNI, AVX2" ("unknown" off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    found = [name for flag, name in _ISA_FLAGS if flag in flags]
    return ", ".join(found) or "no vector extensions found"


def cpu_cache(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> str:
    """The last-level cache, e.g. "L3 480 MiB" (Linux sysfs; "" where unknown). Two hosts with one model name
    have decoded the same bundle 1.5x apart; the cache size helps tell such hosts apart."""
    best: tuple[int, int] | None = None
    for index in sorted(root.glob("index*")):
        try:
            level = int((index / "level").read_text().strip())
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        number = re.fullmatch(r"(\d+)([KM]?)", size)  # sysfs writes e.g. "491520K"
        if kind == "Instruction" or not number or int(number[1]) == 0:
            continue
        if best is None or level > best[0]:
            best = (level, int(number[1]) * {"": 1, "K": 1024, "M": 1024 ** 2}[number[2]])
    if best is None:
        return ""
    level, size = best
    text = f"{size / 1024 ** 2:g} MiB" if size >= 1024 ** 2 else f"{size // 1024} KiB"
    return f"L{level} {text}"


def cpu_description() -> str:
    """CPU model, instruction sets, cores and last-level cache, as every benchmark figure names its host."""
    cache = cpu_cache()
    return f"{cpu_name()} ({cpu_isa()}), {usable_cores()} cores" + (f", {cache}" if cache else "")


def drop_cache(paths: list[Path]) -> None:
    """Drop the files' clean pages from the page cache (posix_fadvise), so the next reader reads them from storage.

    Files this process may not read, and systems without posix_fadvise, are left as they are.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


__all__ = ["usable_cores", "resolve_threads", "cpu_name", "cpu_isa", "cpu_cache", "cpu_description", "drop_cache"]
