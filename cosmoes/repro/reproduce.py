"""Small-scale reproduction of the paper's model comparison (§3.1, Tables 2–3, Figures 5–6) on the embedded corpus.

Five models see the same tokens in the same order with the same hyper-parameters: the FLOP-aligned (FA) dense
model, the MoE, the MoE with the BlES loss, the weight-decomposed (WD) MoE and the parameter-aligned (PA) dense
model (``config.align`` of the MoE). Each is scored on the same validation blocks (loss, perplexity) and, if
sparse, on its routing (ExRep, ΔUni via ``cosmoes.eval.routing_report``); a Markdown report with plots goes to docs/results/.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from cosmoes.config import align, get_preset, human
from cosmoes.data import DataConfig, build_dataset
from cosmoes.errors import CosmoesError
from cosmoes.provenance import git_commit
from cosmoes.repro.config import (ALL_MODELS, DEFAULT_BLES_COEF, DEFAULT_BLES_TEMPERATURE, LABELS,  # noqa: F401
                                  ReproduceConfig)
from cosmoes.train import TrainConfig, train


def model_specs(cfg: ReproduceConfig) -> dict[str, tuple[str, float]]:
    """model key -> (preset name or config.json path, BlES coefficient); writes the PA dense config.json."""
    unknown = [m for m in cfg.models if m not in ALL_MODELS]
    if unknown or not cfg.models:
        raise CosmoesError(f"unknown model(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ALL_MODELS)}")
    moe = get_preset(f"{cfg.family}-moe")
    specs = {"dense-fa": (f"{cfg.family}-dense", 0.0), "moe": (moe.name, 0.0), "moe-bles": (moe.name, cfg.bles_coef),
             "wd-moe": (f"{cfg.family}-wd", 0.0)}
    for preset, _ in specs.values():
        get_preset(preset)  # an unknown family fails here, before any training
    if "dense-pa" in cfg.models:
        pa = align(moe).param_aligned
        path = Path(cfg.out) / "configs" / f"{pa.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(pa.to_dict(), indent=2))
        specs["dense-pa"] = (str(path), 0.0)
    return {m: specs[m] for m in cfg.models}


def train_config(cfg: ReproduceConfig, key: str, preset: str, bles_coef: float) -> TrainConfig:
    """The training run of one model; only the preset and the BlES settings differ between models."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.steps // 20)
    return TrainConfig(preset=preset, out=str(Path(cfg.out) / key), steps=cfg.steps, batch_size=cfg.batch_size,
                       seq_len=cfg.seq_len, lr=cfg.lr, warmup_steps=warmup, lb_coef=cfg.lb_coef, bles_coef=bles_coef,
                       bles_temperature=cfg.bles_temperature if bles_coef else 1.0,
                       log_every=max(1, min(10, cfg.steps // 50)), eval_every=max(10, cfg.steps // 10),
                       save_every=max(1, cfg.steps // 5), seed=cfg.seed, data=DataConfig(sources=list(cfg.data)),
                       progress=cfg.progress)


def _run_state(tcfg: TrainConfig) -> str:
    """'done', 'resume' or 'fresh': a run counts only if it was started with exactly this configuration."""
    out = Path(tcfg.out)
    try:
        saved = json.loads((out / "train_config.json").read_text())
    except (OSError, ValueError):
        return "fresh"
    wanted = tcfg.to_dict()
    if {k: v for k, v in saved.items() if k != "progress"} != {k: v for k, v in wanted.items() if k != "progress"}:
        return "fresh"
    try:
        if json.loads((out / "summary.json").read_text()).get("steps") == tcfg.steps:
            return "done"
    except (OSError, ValueError):
        pass
    from cosmoes.train import STATE_JSON, STATE_TENSORS

    # a checkpoint of an older cosmoes (pickled trainer_state.pt) cannot be resumed: such a run starts afresh
    state = [out / "checkpoint" / name for name in (STATE_JSON, STATE_TENSORS)]
    return "resume" if all(p.is_file() for p in state) else "fresh"


def train_models(cfg: ReproduceConfig, log: Callable[[str], None]) -> dict[str, dict]:
    """Train (or resume, or skip when already trained) every model; returns key -> summary with s/step."""
    specs = model_specs(cfg)
    summaries = {}
    for i, (key, (preset, bles)) in enumerate(specs.items(), 1):
        tcfg = train_config(cfg, key, preset, bles)
        state = _run_state(tcfg)
        tag = f"[{i}/{len(specs)}] {key}"
        if state == "done":
            summary = json.loads((Path(tcfg.out) / "summary.json").read_text())
            log(f"{tag}: already trained in {tcfg.out}, skipping")
        else:
            log(f"{tag}: {'resuming' if state == 'resume' else 'training'} {Path(preset).stem}, {cfg.steps} steps "
                f"x {cfg.batch_size} x {cfg.seq_len} tokens -> {tcfg.out}")
            t0 = time.perf_counter()
            summary = train(tcfg, resume=state == "resume")
            log(f"{tag}: done in {time.perf_counter() - t0:.0f} s, val loss {summary['val_loss']:.3f}")
        tps = summary.get("tokens_per_s")
        summary["s_per_step"] = cfg.batch_size * cfg.seq_len / tps if tps else None
        summaries[key] = summary
    return summaries


@torch.no_grad()
def validation_loss(checkpoint: str | Path, val_blocks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy over every given validation block (per token, fp32)."""
    from cosmoes.checkpoint import load_model

    model = load_model(checkpoint).eval()
    total, count = 0.0, 0
    for start in range(0, len(val_blocks), batch_size):
        block_BS = val_blocks[start:start + batch_size]
        logits_BTV = model(block_BS[:, :-1]).logits.float()
        total += float(F.cross_entropy(logits_BTV.flatten(0, 1), block_BS[:, 1:].flatten(), reduction="sum"))
        count += block_BS[:, 1:].numel()
    return total / count


def evaluate_models(cfg: ReproduceConfig, summaries: dict[str, dict], log: Callable[[str], None]) -> dict:
    """Validation loss/perplexity on the same blocks for all, and routing reports of the sparse models."""
    from cosmoes.eval.routing_report import routing_reports
    from cosmoes.checkpoint import load_tokenizer_of

    first = next(iter(summaries.values()))["checkpoint"]
    data = build_dataset(DataConfig(sources=list(cfg.data), seq_len=cfg.seq_len, seed=cfg.seed),
                         load_tokenizer_of(first))
    val = data.val[: cfg.eval_blocks] if cfg.eval_blocks else data.val
    if len(val) == 0:
        raise CosmoesError("no validation blocks to evaluate on")
    for key, summary in summaries.items():
        log(f"eval {key}: validation loss on {len(val)} blocks")
        summary["eval_loss"] = validation_loss(summary["checkpoint"], val, cfg.eval_batch_size)
        summary["eval_ppl"] = math.exp(summary["eval_loss"])
    sparse = [k for k, s in summaries.items() if s["kind"] != "dense"]
    reports = {}
    if sparse:
        log(f"routing of {', '.join(sparse)} on {cfg.routing_samples} held-out documents")
        reports = routing_reports([summaries[k]["checkpoint"] for k in sparse], list(cfg.data) or None,
                                  cfg.routing_samples, cfg.routing_tokens, names=sparse)
    return {"val_blocks": len(val), "val_tokens": int(val[:, 1:].numel()), "routing": reports,
            "curve_val_blocks": curve_val_blocks(cfg, len(data.val))}


def curve_val_blocks(cfg: ReproduceConfig, total: int) -> int:
    """Distinct validation blocks behind the periodic validation loss logged during training: `cosmoes.train`'s
    `validate` scores up to `eval_batches` batches of them."""
    batches = min(TrainConfig.eval_batches, max(1, total // cfg.batch_size))
    return min(batches * cfg.batch_size, total)


def lm_eval_models(cfg: ReproduceConfig, summaries: dict[str, dict], log: Callable[[str], None]) -> dict[str, dict]:
    """Zero-shot lm-eval (`cosmoes eval`) of every model on the first ``cfg.eval_limit`` documents of each (sub)task.

    Each report is kept as OUT/<model>/lm-eval.json and reused while its checkpoint and the task set are unchanged,
    so a rerun that only re-plots costs no evaluation.
    """
    if not cfg.eval_limit:
        return {}
    from cosmoes.eval.harness import EvalConfig, evaluate, known_task_names, write_report_json

    ecfg = EvalConfig(tasks=tuple(cfg.eval_tasks) or tuple(known_task_names()), limit=cfg.eval_limit,
                      batch_size=cfg.eval_batch_size)
    reports = {}
    for key, summary in summaries.items():
        path = Path(cfg.out) / key / "lm-eval.json"
        reports[key] = saved_lm_eval(path, summary["checkpoint"], ecfg)
        if reports[key] is not None:
            log(f"lm-eval {key}: reusing {path}")
            continue
        log(f"lm-eval {key}: Table 2 tasks, first {cfg.eval_limit} documents of each (sub)task")
        report = evaluate(summary["checkpoint"], ecfg, log=lambda line: log(f"  {line}"))
        write_report_json(report, path)
        reports[key] = report.to_dict()
    return reports


def saved_lm_eval(path: Path, checkpoint: str | Path, ecfg) -> dict | None:
    """The lm-eval report at ``path`` if it was written after the checkpoint's weights, for the same tasks and limit."""
    from cosmoes.artifacts import resolve_checkpoint
    from cosmoes.eval.harness import resolve_tasks

    weights = [w.stat().st_mtime for w in resolve_checkpoint(checkpoint).glob("*.safetensors")]
    if not path.is_file() or not weights or path.stat().st_mtime <= max(weights):
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        return None
    tasks = [t.name for t in resolve_tasks(ecfg.tasks)]
    return saved if saved.get("limit") == ecfg.limit and [t["name"] for t in saved["tasks"]] == tasks else None


# held-out prompts, tokens of each, then decode steps timed per policy: one generated sequence says little about a
# model's routing (§3.4.2 uses 100 samples). Sampled, not greedy: greedy text of a tiny model falls into loops that
# reuse the same experts, and one such loop decided whole comparisons.
OFFLOAD_PROMPTS, OFFLOAD_PROMPT, OFFLOAD_GEN = 8, 64, 128
OFFLOAD_TEMPERATURE, OFFLOAD_TOP_P = 1.0, 0.9


def export_sparse_models(cfg: ReproduceConfig, summaries: dict[str, dict], log) -> dict[str, Path]:
    """An 8da4w host bundle of every sparse model (OUT/<model>/bundle-8da4w), exported once and then reused."""
    from cosmoes.export.bundle import ExportConfig, export_bundle

    bundles = {}
    for key, summary in summaries.items():
        if summary["kind"] == "dense":
            continue
        bundle = Path(cfg.out) / key / "bundle-8da4w"
        if not bundle_is_current(bundle, summary["checkpoint"]):
            log(f"export {key} (8da4w) -> {bundle}")
            export_bundle(summary["checkpoint"], bundle, ExportConfig(target="host", quant="8da4w"), progress=None)
        bundles[key] = bundle
    return bundles


def bundle_is_current(bundle: Path, checkpoint: str | Path) -> bool:
    """True if ``bundle`` was exported from ``checkpoint`` after its weights were last written, in this cosmoes'
    bundle format.

    A model retrained with changed settings keeps its run directory, so the recorded source path alone would let a
    stale bundle through.
    """
    from cosmoes.artifacts import MANIFEST_NAME, resolve_checkpoint
    from cosmoes.export.manifest import FORMAT_VERSION

    manifest, ckpt = bundle / MANIFEST_NAME, resolve_checkpoint(checkpoint)
    weights = [p.stat().st_mtime for p in ckpt.glob("*.safetensors")]
    if not manifest.is_file() or not weights:
        return False
    recorded = json.loads(manifest.read_text())
    return (recorded.get("format_version") == FORMAT_VERSION
            and recorded.get("source", {}).get("checkpoint") == str(Path(checkpoint).resolve())
            and manifest.stat().st_mtime > max(weights))


def offload_speeds(bundles: dict[str, Path], out: Path, log, prompt_len: int = OFFLOAD_PROMPT,
                   gen: int = OFFLOAD_GEN, prompts: int = OFFLOAD_PROMPTS) -> dict[str, dict]:
    """Decode speed and expert loads per decoded token of each bundle under swap, lru:2k and all (native runner),
    pooled over the first ``prompts`` held-out documents as prompts."""
    from cosmoes.bench.harness import BenchConfig, run_bench
    from cosmoes.export.manifest import load_manifest

    speeds = {}
    for key, bundle in bundles.items():
        k = load_manifest(bundle, verify=False).config["top_k"]
        policies = ["swap", f"lru:{2 * k}", "all"]
        log(f"offloaded decoding of {key}: {', '.join(policies)}, {prompts} prompts x ({prompt_len} + {gen} "
            "tokens), 1 thread")
        rows: dict[str, list[dict]] = {policy: [] for policy in policies}
        for doc in range(prompts):
            bench = BenchConfig(policies=policies, prompt_len=prompt_len, prompt_doc=doc, gen=gen,
                                temperature=OFFLOAD_TEMPERATURE, top_p=OFFLOAD_TOP_P, seed=doc, warmup=1, repeats=1,
                                threads=1, probe=False)
            for row in run_bench(bundle, bench, out / key / f"prompt-{doc}", log=lambda _: None).rows:
                if "error" not in row:
                    rows[row["policy"]].append(row)
        speeds[key] = {policy: _pooled(runs, gen) for policy, runs in rows.items() if runs}
    return speeds


def _pooled(runs: list[dict], gen: int) -> dict:
    """One policy's runs over several prompts: tok/s as total decoded tokens over total decode time (every run
    decodes as many), loads per decoded token and ExRep averaged, and each prompt's loads per token."""
    loads = [run["expert_loads_decode"] / (gen - 1) for run in runs]
    return {"decode_tok_s": len(runs) / sum(1 / run["decode_tok_s"] for run in runs),
            "exrep": statistics.fmean(run["exrep_mean"] for run in runs),
            "loads_per_token": statistics.fmean(loads), "loads_per_token_per_prompt": loads}


def run_reproduction(cfg: ReproduceConfig, log: Callable[[str], None] | None = None) -> dict:
    """Train, evaluate and write the report; returns results.json's content."""
    from cosmoes.eval.routing_report import report_json

    log = log or (lambda msg: print(f"[reproduce] {msg}", file=sys.stderr, flush=True))
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise CosmoesError("steps and batch_size must be positive")
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise CosmoesError(f"threads must be positive, got {cfg.threads}")
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    summaries = train_models(cfg, log)
    evaluation = evaluate_models(cfg, summaries, log)
    accuracy = lm_eval_models(cfg, summaries, log)
    offload = {}
    if cfg.offload:
        offload = offload_speeds(export_sparse_models(cfg, summaries, log), Path(cfg.out) / "bench", log)
    results = {
        "command": cfg.command(), "commit": git_commit(), "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, torch {torch.__version__}, intra-op threads: {torch.get_num_threads()}",
        "config": dataclasses.asdict(cfg), "val_blocks": evaluation["val_blocks"],
        "val_tokens": evaluation["val_tokens"], "curve_val_blocks": evaluation["curve_val_blocks"],
        "models": summaries, "lm_eval": accuracy,
        "routing": {k: report_json(r) for k, r in evaluation["routing"].items()}, "offload": offload,
        "wall_s": time.perf_counter() - started,
    }
    for path in write_report(cfg, results, evaluation["routing"]):
        log(f"wrote {path}")
    return results


def write_report(cfg: ReproduceConfig, results: dict, reports: dict[str, dict]) -> list[Path]:
    """results.json, reproduction.md, loss_curves.png and the routing figures under cfg.results."""
    from cosmoes.eval.routing_report import write_routing_outputs

    out = Path(cfg.results)
    out.mkdir(parents=True, exist_ok=True)
    written = write_routing_outputs(reports, out) if reports else []
    written.append(plot_training_curves({k: Path(cfg.out) / k / "metrics.jsonl" for k in results["models"]},
                                        out / "loss_curves.png", validation_title(cfg, results)))
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "reproduction.md").write_text(format_report(cfg, results))
    return written + [out / "results.json", out / "reproduction.md"]


def validation_title(cfg: ReproduceConfig, results: dict) -> str:
    """The loss curves' validation panel says which blocks its periodic validation loss was computed on."""
    data = ", ".join(Path(source).name for source in cfg.data) or "the embedded corpus"
    return f"validation loss\n(held-out documents of {data}, {results['curve_val_blocks']} blocks)"


def plot_training_curves(metrics: dict[str, Path], path: Path, val_title: str = "validation loss") -> Path:
    """Training LM loss, validation loss and (sparse models) batch ExRep against the step, one line per model;
    ``val_title`` names the validation set the middle panel shows."""
    from cosmoes.eval.routing_report import _figure, _save

    fig = _figure(13, 3.6)
    ax_train, ax_val, ax_exrep = fig.subplots(1, 3)
    for key, metrics_path in metrics.items():
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        label = LABELS.get(key, key)
        ax_train.plot([r["step"] for r in rows], [r["lm_loss"] for r in rows], label=label, lw=1)
        val = [r for r in rows if "val_loss" in r]
        ax_val.plot([r["step"] for r in val], [r["val_loss"] for r in val], marker="o", ms=3, label=label)
        if any(r["exrep"] for r in rows):
            ax_exrep.plot([r["step"] for r in rows], [100 * r["exrep"] for r in rows], label=label, lw=1)
    for ax, title in ((ax_train, "training LM loss"), (ax_val, val_title), (ax_exrep, "batch ExRep (%)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _params(summary: dict) -> str:
    active, total = summary["params_active"], summary["params_total"]
    return human(active) if active == total else f"{human(active)} ({human(total)})"


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def results_table(results: dict) -> str:
    """The Markdown results table (Tables 2–3 at small scale): one row per model."""
    lines = ["| Model | Preset | Params active (total) | Val loss | Val PPL | ExRep % ↓ | ΔUni % ↓ | s/step |",
             "|---|---|---|---|---|---|---|---|"]
    for key, s in results["models"].items():
        r = results["routing"].get(key, {})
        lines.append(f"| {LABELS[key]} | {s['model']} | {_params(s)} | {s['eval_loss']:.4f} | {s['eval_ppl']:.2f} | "
                     f"{_fmt(r.get('exrep_pct'), '.2f')} | {_fmt(r.get('delta_uniform_pct'), '.2f')} | "
                     f"{_fmt(s.get('s_per_step'), '.2f')} |")
    return "\n".join(lines)


def accuracy_table(lm_eval: dict[str, dict]) -> str:
    """Table 2's columns at small scale: zero-shot accuracy (%) per task and the average, one row per model."""
    if not lm_eval:
        return ""
    first = next(iter(lm_eval.values()))
    ran = sum(t["status"] == "ok" for t in first["tasks"])
    avg = "Avg" if ran == len(first["tasks"]) else f"Avg ({ran}/{len(first['tasks'])})"
    lines = ["| Model | " + " | ".join(t["label"] for t in first["tasks"]) + f" | {avg} |",
             "|---|" + "---|" * (len(first["tasks"]) + 1)]
    for key, report in lm_eval.items():
        cells = [_fmt(100 * t["score"] if t["score"] is not None else None, ".2f") for t in report["tasks"]]
        lines.append(f"| {LABELS.get(key, key)} | " + " | ".join(cells) +
                     f" | {_fmt(100 * report['average'] if report['average'] is not None else None, '.2f')} |")
    return "\n".join(lines)


def accuracy_notes(lm_eval: dict[str, dict]) -> list[str]:
    """Per task: the split, the documents scored of those in it, and how it differs from stock lm-eval (or why
    it was skipped); the same for every model, so read from the first report."""
    notes = []
    for t in next(iter(lm_eval.values()))["tasks"]:
        if t["status"] != "ok":
            notes.append(f"- {t['label']}: skipped: {t['reason']}")
            continue
        extra = "".join(f"; {note}" for note in t["notes"])
        notes.append(f"- {t['label']}: {t['split']} split, {t['n_samples']:,} of {t['split_docs']:,} documents{extra}")
    return notes


def offload_table(offload: dict) -> str:
    """Offloaded decoding (§3.4.2): tokens/s per policy and expert loads per decoded token under swap."""
    if not offload:
        return ""
    policies = list(next(iter(offload.values())))
    lines = ["| Model | " + " | ".join(f"{p} tok/s" for p in policies) + " | loads/token (swap) | "
             "range over prompts | decode ExRep % | lru ÷ all |", "|---|" + "---|" * (len(policies) + 4)]
    for key, rows in offload.items():
        cells = [_fmt(rows.get(p, {}).get("decode_tok_s"), ".1f") for p in policies]
        swap, lru, every = rows.get("swap", {}), rows.get(policies[1], {}), rows.get("all", {})
        ratio = lru["decode_tok_s"] / every["decode_tok_s"] if lru and every else None
        spread = swap.get("loads_per_token_per_prompt") or []
        span = f"{min(spread):.2f}–{max(spread):.2f}" if spread else "-"
        lines.append(f"| {LABELS.get(key, key)} | " + " | ".join(cells) +
                     f" | {_fmt(swap.get('loads_per_token'), '.2f')} | {span} | "
                     f"{_fmt(100 * swap['exrep'] if swap else None, '.1f')} | {_fmt(ratio, '.2f')} |")
    return "\n".join(lines)


def format_report(cfg: ReproduceConfig, results: dict) -> str:
    """The Markdown report: provenance, set-up, the results table and the figures."""
    tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    routing = results["routing"]
    lines = [
        "# Small-scale reproduction: dense vs. MoE vs. BlES vs. WD (Tables 2–3, Figures 5–6)", "",
        f"Produced by `{results['command']}` at commit `{results['commit']}` on {results['date']} "
        f"({results['machine']}; {results['wall_s'] / 60:.1f} min in all).", "",
        f"Each model: {cfg.steps} steps × {cfg.batch_size} sequences × {cfg.seq_len} tokens = {tokens:,} training "
        f"tokens of {', '.join(cfg.data) or 'the embedded corpus'} (same batches, same order), AdamW lr {cfg.lr} "
        f"with warm-up and cosine decay, load-balancing weight {cfg.lb_coef}; the + BlES model adds the BlES loss "
        f"with weight {cfg.bles_coef} (softmax temperature τ = {cfg.bles_temperature}). The PA dense model is `align({cfg.family}-moe).param_aligned`.", "",
        f"Validation: the same {results['val_blocks']} held-out blocks ({results['val_tokens']:,} predicted tokens, "
        f"documents never trained on) for every model. Routing (`cosmoes routing`): ExRep and ΔUni in percent, "
        f"averaged over MoE layers, on {cfg.routing_samples} held-out documents (first {cfg.routing_tokens} tokens "
        "each); definitions in [docs/routing-metrics.md](../routing-metrics.md).", "",
        results_table(results),
    ]
    if results.get("lm_eval"):
        first = next(iter(results["lm_eval"].values()))
        lines += ["", f"Zero-shot accuracy in percent (`cosmoes eval`, lm-eval {first['lm_eval_version']}; Table 2's "
                  "columns, acc_norm where lm-eval reports it, else acc) on the first "
                  f"{cfg.eval_limit} documents of each (sub)task: a quick check at small scale, not the full sets. "
                  "Split and documents per task below; the paper's Table 2 scores the test splits.", "",
                  accuracy_table(results["lm_eval"]), "", *accuracy_notes(results["lm_eval"])]
    if results.get("offload"):
        lines += ["", f"Offloaded decoding with the native runner (`cosmoes bench`, 8da4w bundles, 1 thread; "
                  f"{OFFLOAD_PROMPTS} prompts, each the first {OFFLOAD_PROMPT} tokens of a held-out document, then "
                  f"{OFFLOAD_GEN} tokens sampled at temperature {OFFLOAD_TEMPERATURE}, top-p {OFFLOAD_TOP_P}, the "
                  "same tokens under every policy): tokens/s per expert-cache policy (decoded tokens over decode time, "
                  "pooled over the prompts), expert loads per decoded token under swap (Eq. 8; mean, and the range "
                  "over prompts), the routing's ExRep over those sequences, and lru:2k's speed as a fraction of "
                  "all's.", "",
                  offload_table(results["offload"])]
    lines += ["", "Paper, Table 3 (phone-sized MoE, 100 C4 samples): MoE ExRep 43.82 %, ΔUni 9.60 %; "
              "+ BlES ExRep 6.55 %, ΔUni 9.67 %.", "",
              "s/step: wall time per training step on the machine above, periodic validation and checkpoints "
              "included (a shared machine's load varies)."]
    if routing:
        lines += ["", "Per-layer routing (ExRep / ΔUni %):", ""]
        for key, r in routing.items():
            per_layer = ", ".join(f"L{i} {x:.1f} / {d:.1f}" for i, (x, d) in
                                  enumerate(zip(r["exrep_pct_per_layer"], r["delta_uniform_pct_per_layer"])))
            lines.append(f"- {LABELS[key]}: {per_layer}")
    lines += ["", "![training curves](loss_curves.png)", ""]
    if routing:
        lines += ["Figure 5 style: expert activations of one held-out sample (35 tokens, middle MoE layer).", ""]
        lines += [f"![{LABELS[k]}](fig5_{k}.png)" for k in routing]
        lines += ["", "Figure 6 style: per-layer ΔUni.", "", "![per-layer ΔUni](fig6.png)", ""]
    return "\n".join(lines)
