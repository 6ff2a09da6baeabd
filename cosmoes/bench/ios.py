"""`cosmoes bench --device ios`: statistics JSON collected on an iPhone (ios_demo/) in the report every device gets.

No Mac or iPhone can be driven from here, so an iPhone run is collected by hand (ios_demo/README.md: the demo app's
XCTest benchmark or BenchRun writes one statistics JSON per run into the app's Documents/cosmoes-bench/) and read
back with ``--stats FILE``. Each file is checked against the statistics schema the C API writes
(cosmoes_stats_json, plus the "device" object BenchRun adds): a file that is not that schema, or that holds the
{"error": ...} BenchRun writes on failure, is a one-line error naming the file and the field. The rows then go through
the same derived figures, table and bench.json/csv/png as every other device (cosmoes/bench/harness.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from cosmoes.bench.harness import BenchReport, derived, write_outputs
from cosmoes.errors import CosmoesError
from cosmoes.export.manifest import load_manifest
from cosmoes.provenance import command_line, git_commit

HOW_TO_COLLECT = ("--device ios reads statistics collected on an iPhone: run the XCTest benchmark or the demo app's "
                  "BenchRun there, copy the JSON files out of the app's Documents/cosmoes-bench/ and pass each with "
                  "--stats FILE (steps: ios_demo/README.md)")

# The fields a row needs (the table's columns and the derived figures), with their JSON types.
NUMBER, INTEGER, TEXT, LIST, OBJECT, BOOL = "a number", "an integer", "a string", "a list", "an object", "true or false"
REQUIRED = {"policy": TEXT, "prompt_tokens": INTEGER, "generated_tokens": INTEGER, "ttft_ms": NUMBER,
            "prefill_tok_s": NUMBER, "decode_tok_s": NUMBER, "peak_rss_mb": NUMBER, "rss_baseline_mb": NUMBER,
            "expert_loads": INTEGER, "expert_evictions": INTEGER, "expert_loads_decode": NUMBER,
            "non_expert_mb": NUMBER, "active_expert_mb": NUMBER, "exrep_mean": NUMBER, "tokens": LIST,
            "device": OBJECT}
OPTIONAL = {"resident_per_layer": LIST, "arena_mb": NUMBER, "expert_load_ms_mean": NUMBER,
            "expert_evict_ms_mean": NUMBER, "mem_read_gb_s": NUMBER,
            "resident_mb": OBJECT, "rss_after_load_mb": NUMBER, "expert_pages_shared": BOOL}


def _type_ok(value, kind: str) -> bool:
    if kind == TEXT:
        return isinstance(value, str)
    if kind == LIST:
        return isinstance(value, list)
    if kind == OBJECT:
        return isinstance(value, dict)
    if kind == BOOL:
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return kind == NUMBER or float(value).is_integer()


def load_ios_stats(path: Path) -> dict:
    """One statistics file from an iPhone, checked; a bad one is a CosmoesError naming the file and field."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CosmoesError(f"{path}: cannot read it ({exc.__class__.__name__}: {exc})") from None
    try:
        stats = json.loads(text)
    except ValueError as exc:  # a copy cut short, or not JSON at all
        raise CosmoesError(f"{path}: not JSON ({exc})") from None
    if not isinstance(stats, dict):
        raise CosmoesError(f"{path}: not a statistics object (the top level is a {type(stats).__name__})")
    if "error" in stats:
        raise CosmoesError(f"{path}: field 'error': the run on the phone failed: {str(stats['error'])[:300]}")
    for key in REQUIRED:
        if key not in stats:
            raise CosmoesError(f"{path}: missing field '{key}' (not the statistics JSON that BenchRun writes)")
    for key, kind in {**REQUIRED, **OPTIONAL}.items():
        if key in stats and not _type_ok(stats[key], kind):
            raise CosmoesError(f"{path}: field '{key}' must be {kind}, got {json.dumps(stats[key])[:60]}")
    return stats


def _check_bundle(path: Path, stats: dict, non_expert_mb: float, bundle: Path) -> None:
    # the stored bytes outside the experts identify the bundle a run used: a file from another bundle would give
    # wrong derived figures (the same rounding as the C++ writer, six significant digits)
    if not math.isclose(stats["non_expert_mb"], non_expert_mb, rel_tol=1e-5, abs_tol=1e-6):
        raise CosmoesError(f"{path}: field 'non_expert_mb' is {stats['non_expert_mb']:g}, but {bundle} has "
                           f"{non_expert_mb:g}: these are statistics of another bundle")


def _device(rows: list[dict]) -> dict:
    devices = [r["device"] for r in rows]
    if all(d == devices[0] for d in devices):
        return dict(devices[0], kind="ios")
    return {"kind": "ios", "model": "several iOS devices", "devices": devices}


def ios_report(bundle: str | Path, stats_files: list[Path], out: str | Path, command: str | None = None) -> BenchReport:
    """The bench report of iPhone runs, one row per statistics file; bench.json/csv/png are written to ``out``."""
    if not stats_files:
        raise CosmoesError(HOW_TO_COLLECT)
    bundle, out = Path(bundle), Path(out)
    manifest = load_manifest(bundle)
    rows = []
    for path in stats_files:
        stats = load_ios_stats(path)
        _check_bundle(path, stats, manifest.non_expert_total() / 1e6, bundle)
        stats.update(derived(stats, manifest))
        stats["stats_file"] = str(path)
        rows.append(stats)
    config = {"device": "ios", "stats_files": [str(p) for p in stats_files]}
    report = BenchReport(str(bundle), _device(rows), config, rows[0]["prompt_tokens"], rows=rows,
                         command=command or command_line(), commit=git_commit())
    write_outputs(report, out)
    return report
