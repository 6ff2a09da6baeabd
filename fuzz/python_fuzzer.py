"""Atheris (libFuzzer for Python) targets on cosmoes' parsers of files a user may be handed: only CosmoesError may
escape any of them, as a one-line refusal; any other exception is a finding.

    .venv/bin/python fuzz/python_fuzzer.py TARGET [libFuzzer flags] [CORPUS_DIR ...]

TARGET is one of:
    config    cosmoes.config.load_model_config on the input as a checkpoint's config.json
    manifest  cosmoes.export.manifest.load_manifest(verify=False) on the input as a bundle's manifest.json, in a copy
              of COSMOES_FUZZ_BUNDLE (the programs fuzz/make_seed_bundle.py laid out), so file checks run too
    metrics   cosmoes.train._truncate_metrics, the metrics.jsonl reader a resumed run uses, on the input as the log
    policy    cosmoes.export.policy.parse_policy on the input split into a top_k and a policy string
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["cosmoes"]):  # coverage for cosmoes' own code, not torch's
    from cosmoes.config import load_model_config
    from cosmoes.errors import CosmoesError
    from cosmoes.export.manifest import load_manifest
    from cosmoes.export.policy import parse_policy
    from cosmoes.train import _truncate_metrics

WORK = Path(tempfile.mkdtemp(prefix="cosmoes-pyfuzz-"))


def fuzz_config(data: bytes) -> None:
    path = WORK / "config.json"
    path.write_bytes(data)
    load_model_config(path)


def bundle_dir() -> Path:
    """A private copy of the fuzz bundle (links kept as links), made once: each input replaces its manifest.json."""
    dst = WORK / "bundle"
    if not dst.exists():
        seed = os.environ.get("COSMOES_FUZZ_BUNDLE")
        if not seed or not Path(seed).is_dir():
            sys.exit("set COSMOES_FUZZ_BUNDLE to the directory fuzz/make_seed_bundle.py wrote (bundle/)")
        shutil.copytree(seed, dst, symlinks=True)
    return dst


def fuzz_manifest(data: bytes) -> None:
    bundle = bundle_dir()
    (bundle / "manifest.json").write_bytes(data)
    load_manifest(bundle, verify=False)


def fuzz_metrics(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    step = fdp.ConsumeIntInRange(-1, 1 << 20)
    path = WORK / "metrics.jsonl"
    path.write_bytes(fdp.ConsumeBytes(fdp.remaining_bytes()))
    with contextlib.redirect_stderr(io.StringIO()):  # its one-line warnings, thousands of times
        _truncate_metrics(path, step)


def fuzz_policy(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    top_k = fdp.ConsumeIntInRange(0, 64)
    parse_policy(fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes()), top_k)


TARGETS = {"config": fuzz_config, "manifest": fuzz_manifest, "metrics": fuzz_metrics, "policy": fuzz_policy}


def one_input(target):
    def test(data: bytes) -> None:
        try:
            target(data)
        except CosmoesError:
            pass  # the refusal every bad input must end in
    return test


def warm_up(target) -> None:
    """One valid-looking call under instrumentation: the cosmoes modules a parser imports lazily (on first use) get
    coverage too, without instrumenting torch or the standard library."""
    with atheris.instrument_imports(include=["cosmoes"]), contextlib.redirect_stderr(io.StringIO()):
        try:
            target(b'{"format": "cosmoes-executorch-bundle", "format_version": 3, "step": 1}')
        except Exception:  # noqa: BLE001 (any outcome: only the imports matter here)
            pass


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python_fuzzer.py {{{','.join(TARGETS)}}} [libFuzzer flags] [corpus dirs]")
    target = TARGETS[sys.argv[1]]
    try:
        warm_up(target)
        atheris.Setup([sys.argv[0], *sys.argv[2:]], one_input(target))
        atheris.Fuzz()
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
