"""Routing of MoE checkpoints and bundles on held-out text: ExRep, ΔUni and Figures 5–6 (§3.3, §3.4.2, Table 3).

The paper measures routing on a 100-sample subset of C4; offline, the default sample is the validation split of
the embedded corpus — the very documents ``build_dataset`` holds out from training — so the routing is measured
on text the model never trained on. The metric definitions live in ``cosmoes.routing`` (docs/routing-metrics.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from cosmoes.artifacts import is_checkpoint, model_format, resolve_checkpoint
from cosmoes.checkpoint import check_checkpoint_dir, load_model, load_tokenizer_of
from cosmoes.config import ModelConfig, load_model_config
from cosmoes.data import DataConfig, held_out_documents, tokenize_documents
from cosmoes.errors import CosmoesError, InvalidValue
from cosmoes.routing import count_replacements, delta_uniform, expert_replacement_rate, selected_experts

FIG5_TOKENS = 35  # the paper's Figure 5 shows 35 consecutive tokens of one sample
_BATCH = 16  # samples of equal length run together; routing is per token, so batching changes nothing


def split_config(checkpoint: str | Path, data_sources: Sequence[str] | None) -> DataConfig:
    """The document split the checkpoint was trained with (its train_config.json), else the training defaults.

    Training replaces the data seed with the run's seed (``cosmoes.train``), so the run's seed decides the split.
    """
    cfg = DataConfig()
    state = resolve_checkpoint(checkpoint) / "train_config.json"
    if state.exists():
        try:
            trained = json.loads(state.read_text())
            cfg = dataclasses.replace(DataConfig(**trained.get("data", {})), seed=int(trained.get("seed", 0)))
        except (ValueError, TypeError) as exc:
            raise CosmoesError(f"corrupt training config {state}: {exc}") from None
    return dataclasses.replace(cfg, sources=list(data_sources or []))


@torch.no_grad()
def collect_selections(model, token_rows: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Run the model eagerly on each row of token ids; returns selected experts as [layer][sample] -> (T, K)."""
    cfg = model.config
    per_sample: list[list[torch.Tensor] | None] = [None] * len(token_rows)
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(token_rows):
        by_length.setdefault(len(row), []).append(i)
    for idx in by_length.values():
        for start in range(0, len(idx), _BATCH):
            chunk = idx[start:start + _BATCH]
            out = model(torch.stack([token_rows[i] for i in chunk]))
            layers_BTK = [selected_experts(r_BTE, cfg.top_k, cfg.router_temperature) for r_BTE in out.router_logits]
            for b, i in enumerate(chunk):
                per_sample[i] = [sel_BTK[b] for sel_BTK in layers_BTK]
    return [list(layer) for layer in zip(*per_sample)]


def pooled_stats(selected_per_layer: Sequence[Sequence[torch.Tensor]], num_experts: int) -> dict:
    """ExRep and ΔUni per layer over all samples (fractions), samples allowed to differ in length.

    ExRep pools Eq. 5 over samples — Σ floor(H_s/2) / Σ K·(T_s−1) — and ΔUni is ``delta_uniform`` of all the
    selected slots together; with equal lengths both equal ``routing.routing_stats`` on the stacked batch.
    ``delta_uniform_seq`` is the mean over samples of each sample's own ΔUni (a per-sequence balance).
    """
    exrep, delta, delta_seq = [], [], []
    for sel in selected_per_layer:
        weights = [len(s_TK) - 1 for s_TK in sel]
        rates = [expert_replacement_rate(s_TK[None], num_experts) for s_TK in sel]
        exrep.append(sum(w * r for w, r in zip(weights, rates)) / max(1, sum(weights)))
        delta.append(delta_uniform(torch.cat(list(sel))[None], num_experts))
        delta_seq.append(sum(delta_uniform(s_TK[None], num_experts) for s_TK in sel) / len(sel))
    return {"exrep": exrep, "delta_uniform": delta, "delta_uniform_seq": delta_seq}


@dataclasses.dataclass
class RoutedModel:
    """What ``routing_report`` measures: a checkpoint run eagerly in fp32, or an exported bundle run by ExecuTorch."""

    path: Path
    config: ModelConfig
    tokenizer: object
    split: DataConfig  # the held-out documents come from this split's validation side
    collect: Callable[[Sequence[torch.Tensor]], list[list[torch.Tensor]]]  # token rows -> [layer][sample] (T, K)
    format: str = "checkpoint"
    quant: str | None = None


def routing_report(checkpoint: str | Path, data_sources: list[str] | None = None, samples: int = 100,
                   max_tokens: int = 256) -> dict:
    """ExRep and ΔUni (in percent) of an MoE checkpoint or exported bundle per MoE layer and averaged, on held-out
    documents.

    Each sample is [bos] + the first tokens of one validation document, at most ``max_tokens`` long (and at most
    the model's max_seq_len). ``selected`` holds the selections for plots: [layer][sample] -> (T, K) expert ids;
    a bundle's are the experts its runtime ran (``BundleRuntime.stats``), so quantisation effects show.
    """
    if samples < 1:
        raise CosmoesError(f"samples must be positive, got {samples}")
    if max_tokens < 2:
        raise CosmoesError(f"max_tokens must be at least 2 (replacements need consecutive tokens), got {max_tokens}")
    if Path(checkpoint).suffix == ".pte":
        raise CosmoesError(f"{checkpoint}: pass the exported bundle's directory, not one of its programs")
    routed = (bundle_routed(checkpoint, data_sources) if model_format(checkpoint) == "bundle"
              else checkpoint_routed(checkpoint, data_sources))
    model_cfg, split = routed.config, routed.split
    docs = held_out_documents(split, samples)
    limit = min(max_tokens, model_cfg.max_seq_len)
    rows = [torch.from_numpy(tokenize_documents([doc], routed.tokenizer)[:limit]) for doc in docs]
    rows = [row for row in rows if len(row) >= 2]
    if not rows:
        raise CosmoesError("the held-out documents are too short to measure routing (need at least 2 tokens)")
    selected = routed.collect(rows)
    stats = pooled_stats(selected, model_cfg.num_experts)
    pct = {k: [100.0 * v for v in vals] for k, vals in stats.items()}
    return {
        "checkpoint": str(routed.path), "format": routed.format, "quant": routed.quant,
        "model": model_cfg.name, "kind": model_cfg.kind,
        "num_experts": model_cfg.num_experts, "top_k": model_cfg.top_k, "moe_layers": len(selected),
        "data": split.sources or "embedded corpus", "split": {"val_fraction": split.val_fraction, "seed": split.seed},
        "samples": len(rows), "tokens": sum(len(r) for r in rows), "max_tokens": limit,
        "exrep_pct": _mean(pct["exrep"]), "exrep_pct_per_layer": pct["exrep"],
        "delta_uniform_pct": _mean(pct["delta_uniform"]), "delta_uniform_pct_per_layer": pct["delta_uniform"],
        "delta_uniform_seq_pct": _mean(pct["delta_uniform_seq"]),
        "delta_uniform_seq_pct_per_layer": pct["delta_uniform_seq"],
        "selected": selected,
    }


def _require_moe(cfg: ModelConfig, where: str | Path) -> None:
    if not cfg.is_moe:
        raise CosmoesError(f"{where} is a dense model ({cfg.name}): it has no routing to analyse")


def checkpoint_routed(checkpoint: str | Path, data_sources: Sequence[str] | None) -> RoutedModel:
    """A checkpoint's eager model, measured on the validation split it was trained with (``split_config``)."""
    path = check_checkpoint_dir(checkpoint)
    model_cfg = load_model_config(path)
    _require_moe(model_cfg, checkpoint)
    model = load_model(path).eval()
    return RoutedModel(path, model_cfg, load_tokenizer_of(path), split_config(path, data_sources),
                       functools.partial(collect_selections, model))


def bundle_routed(bundle: str | Path, data_sources: Sequence[str] | None) -> RoutedModel:
    """An exported bundle under ``BundleRuntime(policy="all")``, measured with its own tokenizer.

    The split is its source checkpoint's (``split_config``) when the manifest records one that is still on disk,
    else the training defaults — the same documents a default training run held out.
    """
    from cosmoes.export.manifest import load_manifest
    from cosmoes.runtime.python import BundleRuntime

    manifest = load_manifest(bundle, verify=False)  # cheap checks (missing files, no tokenizer) before the runtime
    manifest.tokenizer_dir(bundle)
    model_cfg = manifest.model_config()
    _require_moe(model_cfg, bundle)
    runtime = BundleRuntime(bundle, policy="all")
    source = manifest.source.get("checkpoint")
    if source and is_checkpoint(source):
        split = split_config(source, data_sources)
    else:
        split = dataclasses.replace(DataConfig(), sources=list(data_sources or []))
    return RoutedModel(Path(bundle), model_cfg, runtime.tokenizer(), split,
                       functools.partial(bundle_selections, runtime), "bundle", manifest.quant)


def bundle_selections(runtime, token_rows: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Run each row of token ids through a ``BundleRuntime``; the experts it ran as [layer][sample] -> (T, K)."""
    per_sample = []
    for row in token_rows:
        runtime.logits(row)  # a new sequence: the runtime records this row's selections only
        per_sample.append([runtime.stats.selected(layer) for layer in range(len(runtime.stats.selections))])
    return [list(layer) for layer in zip(*per_sample)]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def model_label(checkpoint: str | Path) -> str:
    """A short name for a checkpoint: its run directory's name when given OUT or OUT/checkpoint."""
    path = Path(checkpoint).resolve()
    return path.parent.name if path.name == "checkpoint" else path.name


def routing_reports(checkpoints: Iterable[str | Path], data_sources: list[str] | None = None, samples: int = 100,
                    max_tokens: int = 256, names: Sequence[str] | None = None) -> dict[str, dict]:
    """``routing_report`` of several checkpoints or bundles, keyed by unique model labels (or ``names``)."""
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise CosmoesError("give at least one checkpoint")
    labels = list(names) if names is not None else [model_label(c) for c in checkpoints]
    if len(labels) != len(checkpoints):
        raise CosmoesError(f"{len(labels)} names for {len(checkpoints)} checkpoints")
    reports: dict[str, dict] = {}
    for label, ckpt in zip(labels, checkpoints):
        unique, n = label, 2
        while unique in reports:
            unique, n = f"{label}-{n}", n + 1
        reports[unique] = routing_report(ckpt, data_sources, samples, max_tokens)
    return reports


def report_json(report: dict) -> dict:
    """The report without its tensors (what routing.json stores)."""
    return {k: v for k, v in report.items() if k != "selected"}


def format_routing_table(reports: dict[str, dict]) -> str:
    """Table 3 style text: model, ExRep and ΔUni means, then ExRep and ΔUni per MoE layer (percent)."""
    lines = [f"{'model':<20} {'ExRep %':>8} {'ΔUni %':>8}  per layer (ExRep / ΔUni %)"]
    for name, r in reports.items():
        per_layer = "  ".join(f"L{i}:{x:.1f}/{d:.1f}" for i, (x, d) in
                              enumerate(zip(r["exrep_pct_per_layer"], r["delta_uniform_pct_per_layer"])))
        lines.append(f"{name:<20} {r['exrep_pct']:>8.2f} {r['delta_uniform_pct']:>8.2f}  {per_layer}")
    return "\n".join(lines)


def _figure(width: float, height: float):
    # a bare Figure renders with Agg and leaves pyplot's global backend state alone
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=120)


def plot_activation_map(selected_TK: torch.Tensor, num_experts: int, path: str | Path, title: str = "") -> Path:
    """Figure 5: the expert × token 0/1 activation map of one sample in one layer, with floor(H/2) in the title."""
    if not isinstance(selected_TK, torch.Tensor) or selected_TK.dim() != 2:
        raise CosmoesError("plot_activation_map needs one sample's (tokens, top_k) expert ids")
    T = selected_TK.shape[0]
    replacements = int(count_replacements(selected_TK[None], num_experts)) // 2
    active_ET = np.zeros((num_experts, T), dtype=np.int8)
    active_ET[selected_TK.long().T.numpy(), np.arange(T)[None, :]] = 1
    fig = _figure(max(4.0, 0.28 * T + 1.5), 0.35 * num_experts + 1.4)
    ax = fig.add_subplot()
    ax.imshow(active_ET, cmap="Greys", vmin=0, vmax=1.6, aspect="auto", interpolation="nearest")
    if T <= 64:  # the paper prints the 0/1 in each cell; past that they would not be legible
        for e, t in np.ndindex(active_ET.shape):
            ax.text(t, e, str(active_ET[e, t]), ha="center", va="center", fontsize=6,
                    color="white" if active_ET[e, t] else "black")
    ax.set_yticks(range(num_experts), [f"E{e + 1}" for e in range(num_experts)])
    ax.set_xlabel("token")
    used = int(active_ET.any(axis=1).sum())
    ax.set_title(f"{title}\nexpert replacements floor(H/2) = {replacements}, experts used {used}/{num_experts}"
                 .strip(), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_delta_uniform(models: dict[str, Sequence[float]], path: str | Path,
                       title: str = "Per-layer divergence from the uniform expert distribution") -> Path:
    """Figure 6: per-layer ΔUni (percent) of several models as grouped bars, one group per MoE layer."""
    if not models or any(len(v) == 0 for v in models.values()):
        raise CosmoesError("plot_delta_uniform needs at least one model with per-layer ΔUni values")
    n_layers = max(len(v) for v in models.values())
    width = 0.8 / len(models)
    fig = _figure(max(5.0, 0.45 * n_layers * max(1, len(models) / 2) + 2), 3.6)
    ax = fig.add_subplot()
    for m, (name, values) in enumerate(models.items()):
        ax.bar(np.arange(len(values)) + (m - (len(models) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(range(n_layers), [str(i) for i in range(n_layers)])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("ΔUni (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_routing_outputs(reports: dict[str, dict], out: str | Path, layer: int | None = None, sample: int = 0,
                          fig_tokens: int = FIG5_TOKENS) -> list[Path]:
    """routing.json, fig5_<model>.png (``fig_tokens`` tokens of one sample in ``layer``; default the middle
    MoE layer) and fig6.png under ``out``; returns the paths written."""
    out = Path(out)
    written = []
    for name, r in reports.items():
        n_layers = len(r["selected"])
        at = n_layers // 2 if layer is None else layer
        if not 0 <= at < n_layers:
            raise InvalidValue("layer", f"{layer} is out of range: {name} has MoE layers 0..{n_layers - 1}")
        at_sample = min(sample, len(r["selected"][at]) - 1)
        sel_TK = r["selected"][at][at_sample][:fig_tokens]
        written.append(plot_activation_map(sel_TK, r["num_experts"], out / f"fig5_{name}.png",
                                           title=f"{name}: layer {at}, sample {at_sample}, first {len(sel_TK)} tokens"))
    written.append(plot_delta_uniform({n: r["delta_uniform_pct_per_layer"] for n, r in reports.items()},
                                      out / "fig6.png"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.json").write_text(json.dumps({n: report_json(r) for n, r in reports.items()}, indent=2))
    written.append(out / "routing.json")
    return written
