"""On-device benchmark harness: the native runner per expert-cache policy, locally or over adb (§3.4.3, Table 4).

`run_bench` runs ``cosmoes_runner`` once per policy (all, swap, lru:N, or a memory budget) on real held-out text,
collects its JSON statistics (latency, peak RSS, expert loads, ExRep), optionally runs Hugging Face transformers'
eager ``generate`` on the same weights for ratios, and writes bench.json, bench.csv and a decode-speed-vs-memory
plot. A failed run is recorded with its error and the others go on.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cosmoes.bench.devices import open_device, parse_device
from cosmoes.config import check_number, check_threads
from cosmoes.formats import MAX_THREADS
from cosmoes.errors import CosmoesError, InvalidValue
from cosmoes.export.manifest import Manifest, load_manifest
from cosmoes.export.policy import parse_policy, sweep_policies
from cosmoes.provenance import command_line, git_commit
from cosmoes.runtime.native import last_line
from cosmoes.system import resolve_threads, usable_cores


@dataclass
class BenchConfig:
    """What to benchmark and how: device, policies, prompt/generation lengths, repeats, comparison."""

    device: str = "local"  # local | adb | adb:SERIAL | qemu | qemu:CPU (the linux-aarch64 runner, emulated)
    policies: list[str] = field(default_factory=lambda: ["all", "swap"])
    sweep: bool = False  # swap, every lru:N from top_k up, and all
    budgets_mb: list[float] = field(default_factory=list)  # extra runs with --budget-mb
    prompt_len: int = 64
    prompt_doc: int = 0  # which held-out document the prompt is taken from (0 .. PROMPT_DOCS-1)
    gen: int = 64
    temperature: float = 0.0  # 0: greedy; else temperature + top-p sampling from a seeded stream
    top_p: float = 1.0
    seed: int = 0
    warmup: int = 1
    repeats: int = 3
    threads: int | None = None  # None: the bundle's recipe
    compare: bool = False  # add transformers eager generate (fp32) on the same weights
    probe: bool = True  # measure memory bandwidth and file read speed for the roofline / I/O columns
    cold_experts: bool = False  # int4 experts: an evicted expert leaves the page cache too, so each load reads storage
    prefetch: bool = False  # int4 experts: each layer's are asked for while the layer before runs (docs/export.md)
    runner: str | None = None  # runner binary for the device (adb: an Android build); local: built on first use
    app: bool = False  # adb: run the installed demo app's BenchActivity instead of a pushed runner
    timeout_s: float = 1800.0

    def validate(self) -> None:
        for name in ("prompt_len", "gen", "repeats"):
            if getattr(self, name) < 1:
                raise InvalidValue(name, f"must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise InvalidValue("warmup", f"must be >= 0, got {self.warmup}")
        check_number("temperature", self.temperature, low=0.0)
        if not 0 < self.top_p <= 1:
            raise InvalidValue("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= self.prompt_doc < PROMPT_DOCS:
            raise InvalidValue("prompt_doc", f"must be in 0..{PROMPT_DOCS - 1}, got {self.prompt_doc}")
        for budget in self.budgets_mb:
            check_number("budget_mb", budget, low=0.0, inclusive=False)
        check_number("timeout_s", self.timeout_s, low=0.0, inclusive=False)
        kind, _ = parse_device(self.device)
        if self.app and self.temperature > 0:
            raise CosmoesError("--app decodes greedily (BenchActivity takes no sampling extras): leave --temperature out")
        if self.threads is not None:
            # this machine's cores bound a local run; a phone's are unknown until it answers, so only the manifest's
            # bound applies there
            check_threads(self.threads, usable_cores() if kind == "local" else MAX_THREADS)


PROMPT_DOCS = 50  # held-out documents a prompt can start at; each has 400+ tokens, so prompts do not overlap


def bench_prompt(bundle: Path, manifest: Manifest, prompt_len: int, doc: int = 0) -> list[int]:
    """The first ``prompt_len`` tokens of held-out real text (the embedded corpus' validation split), starting at
    its ``doc``-th document (documents follow on if one is shorter than the prompt)."""
    from cosmoes.data import DataConfig, held_out_documents
    from cosmoes.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(manifest.tokenizer_dir(bundle))
    ids: list[int] = []
    for text in held_out_documents(DataConfig(), samples=PROMPT_DOCS)[doc:]:
        ids += tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= prompt_len:
            return ids[:prompt_len]
    raise InvalidValue("prompt_len", f"{prompt_len} is more than the {len(ids)} tokens of held-out text")


def runner_args(cfg: BenchConfig, policy: str | None, budget_mb: float | None, prompt_file: str) -> list[str]:
    args = ["--prompt-file", prompt_file, "--gen", str(cfg.gen), "--warmup", str(cfg.warmup),
            "--repeats", str(cfg.repeats)]
    args += ["--budget-mb", str(budget_mb)] if budget_mb is not None else ["--policy", str(policy)]
    if cfg.threads is not None:
        args += ["--threads", str(cfg.threads)]
    if cfg.temperature > 0:
        args += ["--temperature", str(cfg.temperature), "--top-p", str(cfg.top_p), "--seed", str(cfg.seed)]
    if cfg.probe:
        args.append("--probe")
    if cfg.cold_experts:
        args.append("--cold-experts")
    if cfg.prefetch:
        args.append("--prefetch")
    return args


def derived(stats: dict, manifest: Manifest) -> dict:
    """Roofline and I/O figures from one run's statistics (bytes from the manifest, bandwidth from the probe)."""
    embedding = manifest.non_expert_bytes.get("embedding", 0)
    # decode reads every weight once per token except the embedding table (one row) and the unselected experts
    weights = manifest.non_expert_total() - embedding + stats["active_expert_mb"] * 1e6
    # a decode step attends over the cache slots in use: on average the prompt plus half the generated tokens
    mean_context = stats["prompt_tokens"] + stats["generated_tokens"] / 2
    kv = manifest.memory["kv_bytes_per_position"] * mean_context  # fp32 K and V of every layer
    out = {"weights_mb_per_token": weights / 1e6, "kv_mb_per_token": kv / 1e6}
    if "arena_mb" in stats:
        # what the runtime holds besides weights: the process before loading plus the planned arenas (KV caches,
        # activations); peak RSS is compared with that plus the stored bytes of the active weights
        out["fixed_overhead_mb"] = stats["rss_baseline_mb"] + stats["arena_mb"]
        active = manifest.non_expert_total() / 1e6 + stats["active_expert_mb"]
        out["peak_rss_vs_active"] = stats["peak_rss_mb"] / (active + out["fixed_overhead_mb"])
    bw = stats.get("mem_read_gb_s") or 0
    if bw:
        out["roofline_tok_s"] = bw * 1e9 / weights
        out["roofline_fraction"] = stats["decode_tok_s"] / out["roofline_tok_s"]
        out["roofline_fraction_with_kv"] = stats["decode_tok_s"] * (weights + kv) / (bw * 1e9)
        out.update(_stage_bandwidth(stats, manifest, kv, bw * 1e9))
    return out


def _stage_bandwidth(stats: dict, manifest: Manifest, kv: float, bytes_per_s: float) -> dict:
    """Each decode stage's bytes read against its time at the probed bandwidth: the layers (attention weights
    and the KV cache) and the experts as fractions of it, the head as its time over the time to read its bytes."""
    stages = stats.get("decode_breakdown_ms") or {}
    read_ms = lambda n: n / bytes_per_s * 1e3  # noqa: E731
    out = {}
    attention = manifest.non_expert_bytes.get("attention", 0) + kv
    if stages.get("layers", 0) > 0 and attention:
        out["layers_bandwidth_fraction"] = read_ms(attention) / stages["layers"]
    if stages.get("experts", 0) > 0 and stats.get("active_expert_mb"):
        out["experts_bandwidth_fraction"] = read_ms(stats["active_expert_mb"] * 1e6) / stages["experts"]
    head = manifest.non_expert_bytes.get("head", 0)
    if stages.get("head", 0) > 0 and head:
        out["head_vs_read"] = stages["head"] / read_ms(head)
    return out


@dataclass
class BenchReport:
    bundle: str
    device: dict
    config: dict
    prompt_tokens: int
    rows: list[dict] = field(default_factory=list)  # one per policy: runner stats + derived, or {"error": ...}
    eager: dict | None = None
    command: str = ""  # the command line that produced this page
    commit: str = ""  # the cosmoes checkout's commit ('-dirty': with uncommitted changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_bench(bundle: str | Path, cfg: BenchConfig, out: str | Path,
              log: Callable[[str], None] = print, command: str | None = None) -> BenchReport:
    """Benchmark ``bundle`` per policy on the configured device; results are rewritten to ``out`` after each run.

    ``command`` is recorded as what produced the results (default: this process' command line).
    """
    cfg.validate()
    bundle, out = Path(bundle), Path(out)
    manifest = load_manifest(bundle)
    for policy in cfg.policies:  # a typo is the user's to fix, not a run to record as failed
        parse_policy(policy, manifest.config["top_k"])
    prompt = bench_prompt(bundle, manifest, cfg.prompt_len, cfg.prompt_doc)
    if cfg.prompt_len + cfg.gen - 1 > manifest.max_seq_len:
        raise CosmoesError(f"a prompt of {cfg.prompt_len} tokens + {cfg.gen} new tokens exceed the bundle's max_seq_len "
                           f"{manifest.max_seq_len}")
    device = open_device(cfg.device, cfg.runner, log, app=cfg.app)  # before anything is written: a refusal leaves no out/
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompt.txt").write_text(" ".join(map(str, prompt)) + "\n")
    report = BenchReport(str(bundle), device.info(), dataclasses.asdict(cfg), len(prompt),
                         command=command or command_line(), commit=git_commit())
    device.prepare(bundle, manifest, out / "prompt.txt")
    cfg_top_k, experts = manifest.config["top_k"], manifest.config["num_experts"]
    runs = [(p, None) for p in (sweep_policies(cfg_top_k, experts) if cfg.sweep else cfg.policies)]
    runs += [(None, b) for b in cfg.budgets_mb]
    for i, (policy, budget) in enumerate(runs, 1):
        label = policy or f"budget {budget:g} MB"
        log(f"[{i}/{len(runs)}] {label}: {cfg.warmup} warm-up + {cfg.repeats} runs of {len(prompt)} + {cfg.gen} tokens")
        t0 = time.time()
        try:
            stats = device.run(runner_args(cfg, policy, budget, device.prompt_path), cfg.timeout_s)
            stats.update(derived(stats, manifest))
            if budget is not None:
                stats["policy"] = f"budget:{budget:g}MB={stats['policy']}"
        except CosmoesError as exc:
            stats = {"policy": label, "error": str(exc)}
            log(f"    failed: {exc}")
        stats["wall_s"] = round(time.time() - t0, 1)
        report.rows.append(stats)
        write_outputs(report, out)
    if cfg.compare:
        report.eager = eager_baseline(manifest, prompt, cfg, log)
        write_outputs(report, out)
    return report


def eager_baseline(manifest: Manifest, prompt: list[int], cfg: BenchConfig, log) -> dict:
    """transformers eager fp32 ``generate`` on the bundle's source weights, in a fresh process (its own RSS)."""
    import subprocess
    import sys

    if not manifest.source:
        raise CosmoesError("this bundle does not record its source weights (exported before cosmoes 0.2); "
                           "re-export it to use --compare")
    threads = resolve_threads(cfg.threads if cfg.threads is not None else manifest.threads)
    request = {"source": manifest.source, "prompt": prompt, "gen": cfg.gen, "repeats": cfg.repeats,
               "warmup": cfg.warmup, "threads": threads, "max_seq_len": manifest.max_seq_len,
               "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed}
    log(f"[compare] transformers eager fp32 generate, {threads} thread(s)")
    proc = subprocess.run([sys.executable, "-m", "cosmoes.bench.eager"], input=json.dumps(request),
                          capture_output=True, text=True, errors="replace", timeout=cfg.timeout_s)
    if proc.returncode != 0:
        return {"error": last_line(proc.stderr)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


COLUMNS = [("policy", "policy", "{}"), ("decode_tok_s", "decode tok/s", "{:.1f}"), ("ttft_ms", "TTFT ms", "{:.1f}"),
           ("prefill_tok_s", "prefill tok/s", "{:.0f}"), ("peak_rss_mb", "peak RSS MB", "{:.1f}"),
           ("expert_loads", "loads", "{:.0f}"), ("expert_loads_decode", "loads/decode", "{:.0f}"),
           ("expert_load_ms_mean", "ms/load", "{:.3f}"), ("expert_evict_ms_mean", "ms/evict", "{:.3f}"),
           ("expert_read_ms", "read ms", "{:.2f}"),
           ("exrep_mean", "ExRep", "{:.3f}"), ("peak_rss_vs_active", "RSS/active", "{:.2f}"),
           ("roofline_fraction", "roofline", "{:.2f}")]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def format_table(report: BenchReport) -> str:
    """One line per policy (and the eager baseline), with decode speed as a ratio to eager when compared."""
    eager = report.eager if report.eager and "error" not in report.eager else None
    head = [title for _, title, _ in COLUMNS] + (["× eager"] if eager else [])
    lines = []
    for row in report.rows:
        if "error" in row:
            lines.append([row.get("policy", "?"), f"FAILED: {row['error']}"])
            continue
        cells = [_cell(row, key, fmt) for key, _, fmt in COLUMNS]
        if eager:
            cells.append(f"{row['decode_tok_s'] / eager['decode_tok_s']:.2f}")
        lines.append(cells)
    if report.eager:
        e = report.eager
        lines.append(["eager fp32", f"FAILED: {e['error']}"] if "error" in e else
                     ["eager fp32", f"{e['decode_tok_s']:.1f}", f"{e['ttft_ms']:.1f}", f"{e['prefill_tok_s']:.0f}",
                      f"{e['peak_rss_mb']:.1f}"] + ["-"] * (len(head) - 6) + ["1.00"])
    widths = [max(len(str(r[i])) for r in [head, *lines] if i < len(r) and not str(r[1]).startswith("FAILED"))
              for i in range(len(head))]
    fmt_row = lambda r: "  ".join(str(c).rjust(w) if j else str(c).ljust(w)  # noqa: E731
                                  for j, (c, w) in enumerate(zip(r, widths)))
    text = [fmt_row(head)]
    text += [fmt_row(r) if not str(r[1]).startswith("FAILED") else "  ".join(r) for r in lines]
    text += resident_table(report.rows)
    kernels = sorted({str(r["expert_kernels"]) for r in report.rows if "expert_kernels" in r})
    if kernels:  # which of the runtime's kernel families ran the experts (int4), or XNNPACK
        cold = any(r.get("cold_experts") for r in report.rows)
        text.append(f"expert kernels: {', '.join(kernels)}" + (" (cold: every load read storage)" if cold else ""))
    if any(r.get("expert_pages_shared") for r in report.rows):
        text.append("expert pages shared: this device's pages are larger than the bundle's segment alignment, so a "
                    "loaded expert keeps parts of its neighbours resident; re-export the bundle (cosmoes export)")
    text += prefetch_lines(report.rows)
    if report.device.get("emulated"):  # a qemu run: the figures time the emulator, not a phone
        text.append(f"timings emulated: {report.device.get('model', 'qemu')}")
    return "\n".join(text)


def prefetch_lines(rows: list[dict]) -> list[str]:
    """Per policy run with --prefetch: how many of its loads had been asked for a layer ahead, and how many asks
    went unused."""
    out = []
    for r in rows:
        if "error" in r or not r.get("prefetch") or "expert_prefetch_hits" not in r:
            continue
        loads, hits, asked = r["expert_loads"], r["expert_prefetch_hits"], r["expert_prefetched"]
        out.append(f"prefetch {r['policy']}: {hits} of {loads} loads asked for ahead "
                   f"({100 * r['expert_prefetch_hit_rate']:.0f} %), {asked - hits} of {asked} asks unused")
    return out


RESIDENT_KINDS = ("embedding", "attention", "head", "dense_ffn", "experts", "kv_cache", "activations", "runtime")


def resident_table(rows: list[dict]) -> list[str]:
    """Resident MB by kind at the end of each policy's last run, anonymous + file-backed (the runner's
    resident_mb), beside RSS right after load and at its peak."""
    measured = [r for r in rows if "error" not in r and r.get("resident_mb")]
    if not measured:
        return []
    kinds = [k for k in RESIDENT_KINDS if any(k in r["resident_mb"] for r in measured)]
    head = ["resident MB"] + kinds + ["after load", "peak"]
    lines = [head]
    for r in measured:
        cells = [r["policy"]]
        for k in kinds:
            v = r["resident_mb"].get(k)
            ok = isinstance(v, dict) and all(isinstance(v.get(part), (int, float)) for part in ("anon", "file"))
            cells.append("-" if not ok else f"{v['anon']:.1f}" + (f"+{v['file']:.1f}f" if v["file"] > 0.05 else ""))
        after = r.get("rss_after_load_mb")
        lines.append(cells + ["-" if after is None else f"{after:.1f}", f"{r['peak_rss_mb']:.1f}"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["", *["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths)))
                 for row in lines]]
    out.append("(anonymous MB, +N f: file-backed pages read in place; -1: not reported by this system)")
    return out


def write_outputs(report: BenchReport, out: Path) -> list[Path]:
    """bench.json (everything), bench.csv (one row per run) and bench.png, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [_atomic_text(out / "bench.json", json.dumps(report.to_dict(), indent=2) + "\n")]
    rows = [dict(r, device=report.device.get("model") or report.device.get("kind")) for r in report.rows]
    if report.eager:
        rows.append(dict(report.eager, policy="eager-fp32"))
    keys = ["policy"] + sorted({k for r in rows for k in r if k != "policy" and not isinstance(r[k], (list, dict))})
    tmp = out / "bench.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out / "bench.csv")
    paths.append(out / "bench.csv")
    if any("error" not in r for r in report.rows):
        paths.append(plot_tradeoff(report, out / "bench.png"))
    return paths


def _atomic_text(path: Path, text: str) -> Path:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def plot_tradeoff(report: BenchReport, path: Path) -> Path:
    """Decode tokens/s against peak RSS, one point per policy: the memory/latency trade-off of §3.4.3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ok = [r for r in report.rows if "error" not in r]
    ax.plot([r["peak_rss_mb"] for r in ok], [r["decode_tok_s"] for r in ok], "o", color="tab:blue")
    # policies with close speeds sit close together: from the slowest up, labels alternate below and above
    for i, r in enumerate(sorted(ok, key=lambda r: r["decode_tok_s"])):
        ax.annotate(r["policy"], (r["peak_rss_mb"], r["decode_tok_s"]), textcoords="offset points",
                    xytext=(6, 4 if i % 2 else -11), fontsize=8)
    if report.eager and "error" not in report.eager:
        e = report.eager
        ax.plot([e["peak_rss_mb"]], [e["decode_tok_s"]], "s", color="tab:red")
        ax.annotate("transformers eager fp32", (e["peak_rss_mb"], e["decode_tok_s"]), textcoords="offset points",
                    xytext=(-6, 6), ha="right", fontsize=8)
        ax.set_xscale("log")  # eager fp32 holds ~10x the memory of the exported policies
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("peak RSS (MB)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{Path(report.bundle).name} on {report.device.get('model') or report.device.get('cpu', 'host')}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
