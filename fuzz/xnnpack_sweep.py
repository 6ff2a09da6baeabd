"""Random overwrites inside the XNNPACK delegate payloads of the fuzz bundle's programs, run through the native
runner: the sweep behind fuzz/README.md's "What a hostile program can still do".

    .venv/bin/python fuzz/xnnpack_sweep.py [--cases 4000] [--seed 0] [--timeout 20] [--runner PATH]
                                           [--work build/fuzz/work] [--keep DIR]

Each case copies the tiny MoE bundle (WORK/bundle's backbone.pte and experts.pte with WORK/seeds/moe.json as its
manifest; `make fuzz` or fuzz/make_seed_bundle.py lays them out), overwrites 1-64 random bytes (the count
log-uniform: as many 1-2 byte changes, a number that still verifies, as 32-64 byte ones) at a random place inside
one XNNPACK payload (XNNHeader, graph flatbuffer or constant data; never the program flatbuffer around it, which
ExecuTorch's own verifier covers), rewrites the manifest's size and sha256 to match, so only the program itself can
refuse the change, and runs the runner on a short prompt with every expert resident. Outcomes:

    ok        exit 0 (the bytes changed nothing that matters, or only the numbers)
    refused   exit 2 with exactly one `error:` line (the runtime's refusal)
    other     any other exit status, or a refusal that is not one line
    signal    killed by a signal (SIGSEGV, SIGBUS, SIGABRT, ...)
    timeout   still running after --timeout seconds

The summary line counts each; with --keep, the program and manifest of every signal, timeout and other case are
kept there. Exit status 1 when any case ended in a signal or a timeout.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROGRAMS = ("backbone.pte", "experts.pte")
PROMPT = ["--prompt-ids", "1,2,3,4,5,6,7,8,9,10", "--gen", "3", "--policy", "all", "--threads", "1"]


class Flat:
    """Just enough of a flatbuffer reader to find the delegate payloads (field ids from ExecuTorch's program.fbs)."""

    def __init__(self, data: bytes):
        self.b = data

    def u(self, at: int, n: int) -> int:
        return int.from_bytes(self.b[at:at + n], "little")

    def field(self, table: int, fid: int) -> int:
        vtable = table - struct.unpack_from("<i", self.b, table)[0]
        slot = 4 + 2 * fid
        if slot + 2 > self.u(vtable, 2):
            return 0
        off = self.u(vtable + slot, 2)
        return table + off if off else 0

    def scalar(self, table: int, fid: int, n: int) -> int:
        """A scalar field, or 0 (every default here) when flatc left it out."""
        at = self.field(table, fid)
        return self.u(at, n) if at else 0

    def follow(self, at: int) -> int:
        return at + self.u(at, 4)

    def vector(self, table: int, fid: int) -> list[int]:
        """Positions of a vector-of-tables field's elements."""
        at = self.field(table, fid)
        if not at:
            return []
        vec = self.follow(at)
        return [self.follow(vec + 4 + 4 * i) for i in range(self.u(vec, 4))]

    def string(self, table: int, fid: int) -> str:
        at = self.field(table, fid)
        if not at:
            return ""
        s = self.follow(at)
        return self.b[s + 4:s + 4 + self.u(s, 4)].decode(errors="replace")


def xnnpack_payloads(data: bytes) -> list[tuple[int, int]]:
    """(start, end) in the file of every distinct XNNPACK delegate payload of a .pte."""
    if data[8:12] != b"eh00":
        raise SystemExit("not an ExecuTorch program with an extended header")
    segment_base = struct.unpack_from("<Q", data, 24)[0]
    fb = Flat(data)
    root = fb.follow(0)
    segments = [(fb.scalar(s, 0, 8), fb.scalar(s, 1, 8)) for s in fb.vector(root, 4)]
    inline = fb.vector(root, 3)  # backend_delegate_data: BackendDelegateInlineData { data: [ubyte] }
    found = set()
    for plan in fb.vector(root, 1):
        for delegate in fb.vector(plan, 7):
            if fb.string(delegate, 0) != "XnnpackBackend":
                continue
            ref = fb.follow(fb.field(delegate, 1))
            location, index = fb.scalar(ref, 0, 1), fb.scalar(ref, 1, 4)
            if location == 1:  # SEGMENT
                offset, size = segments[index]
                found.add((segment_base + offset, segment_base + offset + size))
            else:
                vec = fb.follow(fb.field(inline[index], 0))
                found.add((vec + 4, vec + 4 + fb.u(vec, 4)))
    return sorted(found)


def one_error_line(stderr: str) -> bool:
    return sum(line.startswith("error:") for line in stderr.splitlines()) == 1


def run_case(runner: Path, bundle: Path, timeout: float) -> tuple[str, str]:
    try:
        proc = subprocess.run([str(runner), str(bundle), *PROMPT], capture_output=True, text=True, timeout=timeout,
                              errors="replace")
    except subprocess.TimeoutExpired:
        return "timeout", ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    if proc.returncode == 0:
        return "ok", ""
    if proc.returncode < 0:
        return "signal", f"signal {-proc.returncode}"
    if proc.returncode == 2 and one_error_line(proc.stderr):
        return "refused", errors[0]
    return "other", f"exit {proc.returncode}: " + (errors[-1] if errors else proc.stderr.strip()[-200:])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per run before it counts as a timeout")
    ap.add_argument("--runner", type=Path, help="default: cosmoes.runtime.native.build_runner()")
    ap.add_argument("--work", type=Path, default=Path("build/fuzz/work"), help="fuzz/make_seed_bundle.py's WORK")
    ap.add_argument("--keep", type=Path, help="keep the inputs of signal/timeout/other cases here")
    args = ap.parse_args(argv)

    if args.runner is None:
        from cosmoes.runtime.native import build_runner
        args.runner = build_runner()
    manifest = json.loads((args.work / "seeds" / "moe.json").read_text())
    originals = {name: (args.work / "bundle" / name).read_bytes() for name in PROGRAMS}
    payloads = [(name, span) for name in PROGRAMS for span in xnnpack_payloads(originals[name])]
    print(f"{len(payloads)} XNNPACK payloads in {', '.join(PROGRAMS)} "
          f"({sum(e - s for _, (s, e) in payloads)} bytes); runner {args.runner}", flush=True)

    rng = random.Random(args.seed)
    counts: collections.Counter[str] = collections.Counter()
    messages: collections.Counter[str] = collections.Counter()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="xnnpack-sweep-") as tmp:
        bundle = Path(tmp)
        for name in PROGRAMS:
            (bundle / name).write_bytes(originals[name])
        for case in range(args.cases):
            name, (start, end) = rng.choice(payloads)
            # log-uniform 1-64 bytes
            n = min(int(2 ** rng.uniform(0, 6.01)), end - start)
            at = rng.randint(start, end - n)
            data = bytearray(originals[name])
            data[at:at + n] = rng.randbytes(n)
            (bundle / name).write_bytes(data)
            m = json.loads(json.dumps(manifest))
            for program in m["programs"].values():
                if program["file"] == name:
                    program["bytes"], program["sha256"] = len(data), hashlib.sha256(data).hexdigest()
            (bundle / "manifest.json").write_text(json.dumps(m, indent=1))
            outcome, detail = run_case(args.runner, bundle, args.timeout)
            counts[outcome] += 1
            if outcome == "refused":  # grouped by what is wrong: no path, method or numbers
                why = re.sub(r"^.*corrupt ExecuTorch program: (method \S+ delegate \d+: )?", "", detail)
                why = re.sub(r"'[^']*'", "'…'", re.sub(r"/\S*/", "", why))
                messages[re.sub(r"(?<![A-Z\d])\d+", "N", why)[:100]] += 1
            else:
                if outcome != "ok":
                    print(f"case {case}: {outcome} ({detail}) — {name} bytes {at}..{at + n}", flush=True)
                    if args.keep:
                        keep = args.keep / f"case-{case}-{outcome}"
                        keep.mkdir(parents=True, exist_ok=True)
                        shutil.copy(bundle / name, keep / name)
                        shutil.copy(bundle / "manifest.json", keep / "manifest.json")
                        other = next(p for p in PROGRAMS if p != name)
                        (keep / other).write_bytes(originals[other])
            (bundle / name).write_bytes(originals[name])
            if (case + 1) % 250 == 0:
                print(f"{case + 1} cases, {time.monotonic() - t0:.0f} s: {dict(counts)}", flush=True)
    print(f"{args.cases} cases in {time.monotonic() - t0:.0f} s: " +
          ", ".join(f"{k} {counts[k]}" for k in ("ok", "refused", "other", "signal", "timeout")))
    for text, count in messages.most_common(12):
        print(f"  {count:5d}  {text}")
    return 1 if counts["signal"] or counts["timeout"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
