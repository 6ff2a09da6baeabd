"""Pre-training with the LM loss, the sequence-level load-balancing loss and the BlES loss (§2.3, §3.1).

One code path for a single process and for torchrun (FSDP2 `fully_shard`, gloo on CPU / NCCL on GPU).
Resuming restores model, optimiser, scheduler, data position and RNG, so 10 + 10 steps equal 20 steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

# TrainConfig and DataConfig live torch-free in cosmoes.config (the CLI reads their defaults); imported from here too
from cosmoes.config import DataConfig, ModelConfig, TrainConfig, get_preset, load_model_config  # noqa: F401
from cosmoes.data import build_dataset, get_batch
from cosmoes.errors import CosmoesError
from cosmoes.losses import bles_loss_layers, load_balancing_loss_layers
from cosmoes.model import Transformer, init_weights

# The training state next to the weights: tensors in safetensors, the rest in JSON. Neither format can run code
# when read (pickle can), so resuming from a run directory someone else wrote is safe.
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
LEGACY_STATE = "trainer_state.pt"  # what earlier versions pickled; refused, never read
STATE_FORMAT = "cosmoes-trainer-state"
STATE_VERSION = 1
RUN_CONFIG = "train_config.json"
RESUME_MAY_CHANGE = ("steps", "out", "progress")  # a resumed run may be extended, moved or shown differently


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio·lr (as a multiplier of cfg.lr)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the torchrun process group if launched by torchrun; otherwise a single process."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def shard_model(model: Transformer, d: Dist) -> torch.nn.Module:
    """FSDP2: each block its own unit, then the root (embeddings, norm, head)."""
    if d.world == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block)
    return fully_shard(model)


def compute_losses(model, x_BT, y_BT, cfg: TrainConfig, model_cfg: ModelConfig) -> dict:
    """LM cross-entropy plus the weighted routing losses; returns every term for logging."""
    out = model(x_BT)
    lm = F.cross_entropy(out.logits.flatten(0, 1).float(), y_BT.flatten())
    zero = lm.new_zeros(())
    lb = bles = exrep = zero
    if out.router_logits:
        lb = load_balancing_loss_layers(out.router_logits, model_cfg.top_k)
        # h_norm of Eq. 5 is the ExRep of the batch (at the BlES temperature, which only rescales logits)
        bles, exrep = bles_loss_layers(out.router_logits, model_cfg.top_k, cfg.bles_temperature)
    loss = lm + cfg.lb_coef * lb + cfg.bles_coef * bles
    return {"loss": loss, "lm_loss": lm, "lb_loss": lb, "bles_loss": bles, "exrep": exrep}


def build_model_config(cfg: TrainConfig, vocab: int) -> ModelConfig:
    model_cfg = load_model_config(cfg.preset) if Path(cfg.preset).exists() else get_preset(cfg.preset)
    if vocab > model_cfg.vocab_size:
        raise CosmoesError(f"tokenizer has {vocab} tokens but {model_cfg.name} has vocab_size {model_cfg.vocab_size}")
    if cfg.seq_len > model_cfg.max_seq_len:
        raise CosmoesError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
    return model_cfg


@torch.no_grad()
def validate(model, blocks, cfg: TrainConfig, model_cfg: ModelConfig, d: Dist) -> float:
    model.eval()
    losses = []
    n = min(cfg.eval_batches, max(1, len(blocks) // cfg.batch_size))
    for i in range(n):
        x, y = get_batch(blocks, i, cfg.batch_size, seed=cfg.seed + 1, rank=d.rank, world_size=d.world)
        losses.append(compute_losses(model, x.to(d.device), y.to(d.device), cfg, model_cfg)["lm_loss"])
    model.train()
    return _mean_across_ranks(torch.stack(losses).mean(), d)


def _mean_across_ranks(t: torch.Tensor, d: Dist) -> float:
    if d.world > 1:
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)  # gloo has no AVG; SUM / world works on every backend
        t = t / d.world
    return float(t)


def save_training_checkpoint(model, opt, sched, step: int, cfg: TrainConfig, model_cfg: ModelConfig, tokenizer,
                             d: Dist) -> None:
    """Gather full weights and optimiser state on rank 0 and write OUT/checkpoint atomically."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    from cosmoes.checkpoint import save_checkpoint

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=opts)
    optim = get_optimizer_state_dict(model, opt, options=opts)
    if not d.main:
        return
    plain = Transformer(model_cfg)
    plain.load_state_dict(weights)
    names = [name for name, _ in model.named_parameters()]
    tensors, meta = training_state(optim, sched.state_dict(), step, names)

    def add_state(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": STATE_FORMAT})
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1))
        (tmp / RUN_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2))

    save_checkpoint(plain, Path(cfg.out) / "checkpoint", tokenizer=tokenizer, extra=add_state)


def training_state(optim: dict, sched_state: dict, step: int, names: list[str]) -> tuple[dict, dict]:
    """(tensors, JSON) of everything a resume needs besides the weights; ``optim`` is keyed by parameter name."""
    unknown = set(optim["state"]) - set(names)
    if unknown:  # would be dropped silently below
        raise RuntimeError(f"optimiser state for parameters the model does not name: {sorted(unknown)[:3]}")
    tensors = {"rng/torch": torch.get_rng_state()}
    per_param = {}
    for name in names:  # every parameter listed: AdamW creates a parameter's state only at its first gradient
        state = optim["state"].get(name, {})
        per_param[name] = sorted(state)
        for key, value in state.items():
            tensors[f"optimizer/{name}/{key}"] = torch.as_tensor(value).contiguous()
    meta = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": step,
            "optimizer": {"param_groups": optim["param_groups"], "state": per_param},
            "scheduler": sched_state, "python_random": random.getstate()}
    return tensors, meta


def check_resumable(cfg: TrainConfig) -> Path:
    """OUT/checkpoint if ``cfg`` can continue it; otherwise a one-line error that says why not."""
    from cosmoes.checkpoint import check_checkpoint_dir, read_json

    ckpt = check_checkpoint_dir(Path(cfg.out) / "checkpoint")
    load_model_config(ckpt)  # its own one-line message for a bad config.json, before the tokenizer reads it too
    if not (ckpt / STATE_JSON).is_file() or not (ckpt / STATE_TENSORS).is_file():
        if (ckpt / LEGACY_STATE).exists():
            raise CosmoesError(f"cannot resume {cfg.out}: its checkpoint was written by an older cosmoes "
                               f"({LEGACY_STATE}, which is never unpickled); start a new run")
        raise CosmoesError(f"cannot resume {cfg.out}: {ckpt} has no {STATE_JSON} and {STATE_TENSORS}")
    saved = read_json(ckpt / RUN_CONFIG, "run configuration")
    if not isinstance(saved, dict):
        raise CosmoesError(f"corrupt run configuration {ckpt / RUN_CONFIG}: not a JSON object")
    changes = config_changes(saved, cfg.to_dict())
    if changes:
        raise CosmoesError(f"cannot resume {cfg.out}: {', '.join(changes)} differ from the run's {RUN_CONFIG}")
    return ckpt


def config_changes(saved: dict, wanted: dict) -> list[str]:
    """'field old -> new' for every setting that differs, except those a resume may change."""
    old = {**_flat(TrainConfig().to_dict()), **_flat(saved)}  # a field newer than the run: its default
    new = _flat(json.loads(json.dumps(wanted)))  # tuples as JSON reads them back
    fields = list(new) + [k for k in old if k not in new]
    return [f"{k} {_shown(old.get(k, _ABSENT))} -> {_shown(new.get(k, _ABSENT))}" for k in fields
            if k not in RESUME_MAY_CHANGE and old.get(k, _ABSENT) != new.get(k, _ABSENT)]


def _flat(d: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_ABSENT = object()


def _shown(value) -> str:
    if value is _ABSENT:
        return "(absent)"
    return value if isinstance(value, str) else json.dumps(value)


@dataclass
class TrainingState:
    """A checkpoint's training state, checked against the live model, optimiser and scheduler."""

    step: int
    optimizer: dict  # as set_optimizer_state_dict takes it: {"state": {name: {key: tensor}}, "param_groups": [...]}
    scheduler: dict
    torch_rng: torch.Tensor
    python_rng: tuple


def read_training_state(ckpt: Path, model, opt, sched) -> TrainingState:
    """Read and validate OUT/checkpoint's training state; every problem is a one-line error naming file and field."""
    from cosmoes.checkpoint import read_json

    meta = read_json(ckpt / STATE_JSON, "training state")
    tensors = _read_state_tensors(ckpt / STATE_TENSORS)
    bad = _Fail(ckpt / STATE_JSON)
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        bad("format", f"is not {STATE_FORMAT!r}: not a cosmoes training state")
    if meta.get("version") != STATE_VERSION:
        bad("version", f"is {meta.get('version')!r}; this cosmoes reads version {STATE_VERSION}")
    step = meta.get("step")
    if type(step) is not int or step < 0:
        bad("step", f"is {step!r}, not a step number")
    params = dict(model.named_parameters())
    optim = meta.get("optimizer")
    if not isinstance(optim, dict):
        bad("optimizer", "is not an object")
    groups = _param_groups(optim.get("param_groups"), opt, params, bad)
    state = _optimizer_tensors(optim.get("state"), tensors, params, _Fail(ckpt / STATE_TENSORS), bad)
    scheduler = _like(meta.get("scheduler"), sched.state_dict(), "scheduler", bad)
    if scheduler["last_epoch"] != step:
        bad("scheduler.last_epoch", f"is {scheduler['last_epoch']}, not the step {step}")
    rng = tensors.get("rng/torch")
    if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        _Fail(ckpt / STATE_TENSORS)("rng/torch", "is missing or not a CPU generator state")
    return TrainingState(step, {"state": state, "param_groups": groups}, scheduler, rng,
                         _python_rng(meta.get("python_random"), bad))


class _Fail:
    """Raises the one-line error for a field of a training-state file."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, field: str, problem: str):
        raise CosmoesError(f"corrupt training state {self.path}: {field} {problem}")


def _read_state_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError, ...: the message is what the user can act on
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CosmoesError(f"corrupt training state {path}: {type(exc).__name__}: {first}") from None


def _param_groups(groups, opt, params: dict, bad: _Fail) -> list:
    """The saved param groups, shaped like the live optimiser's and naming its parameters in order."""
    names = {id(p): name for name, p in params.items()}
    live = [{**g, "params": [names[id(p)] for p in g["params"]]} for g in opt.param_groups]
    groups = _like(groups, live, "optimizer.param_groups", bad)
    for i, (g, lv) in enumerate(zip(groups, live)):
        if g["params"] != lv["params"]:
            bad(f"optimizer.param_groups[{i}].params", "do not name this model's parameters in order")
    return groups


def _optimizer_tensors(listed, tensors: dict, params: dict, bad_tensor: _Fail, bad: _Fail) -> dict:
    """Per-parameter optimiser state from the tensor file: every parameter listed, every tensor present and shaped."""
    if not isinstance(listed, dict) or set(listed) != set(params):
        bad("optimizer.state", "does not list exactly this model's parameters")
    state, expected = {}, {"rng/torch"}
    for name, keys in listed.items():
        if not isinstance(keys, list) or not all(isinstance(k, str) and k and "/" not in k for k in keys):
            bad(f"optimizer.state.{name}", "is not a list of state names")
        p = params[name]
        for key in keys:
            tname = f"optimizer/{name}/{key}"
            t = tensors.get(tname)
            expected.add(tname)
            if t is None:
                bad_tensor(tname, "is missing")
            if key == "step":
                if t.shape != () or not t.is_floating_point() or not math.isfinite(float(t)) or float(t) < 0:
                    bad_tensor(tname, "is not a non-negative step count")
            elif t.shape != p.shape or t.dtype != p.dtype:
                bad_tensor(tname, f"is {list(t.shape)} {t.dtype} where the parameter is {list(p.shape)} {p.dtype}")
        state[name] = {key: tensors[f"optimizer/{name}/{key}"] for key in keys}
    extra = sorted(set(tensors) - expected)
    if extra:
        bad_tensor(extra[0], "is not part of a training state")
    return {name: s for name, s in state.items() if s}


def _like(value, live, field: str, bad: _Fail):
    """``value`` (read from JSON) shaped like ``live``, the live optimiser's or scheduler's own state: same types,
    finite numbers; fields it lacks are taken from ``live`` (a newer torch), fields ``live`` lacks are refused."""
    if isinstance(live, dict):
        if not isinstance(value, dict):
            bad(field, "is not an object")
        unknown = sorted(set(value) - set(live))
        if unknown:
            bad(f"{field}.{unknown[0]}", "is not a field this version knows")
        return {k: _like(value[k], v, f"{field}.{k}", bad) if k in value else v for k, v in live.items()}
    if isinstance(live, (list, tuple)):
        if not isinstance(value, list) or len(value) != len(live):
            bad(field, f"is not a list of {len(live)}")
        items = [_like(v, lv, f"{field}[{i}]", bad) for i, (v, lv) in enumerate(zip(value, live))]
        return tuple(items) if isinstance(live, tuple) else items
    if live is None or isinstance(live, (bool, str, int)):
        if type(value) is not type(live):
            bad(field, f"is {json.dumps(value)[:40]}, not a {type(live).__name__}")
        return value
    if isinstance(live, float):
        if type(value) not in (int, float) or not math.isfinite(value):
            bad(field, f"is {json.dumps(value)[:40]}, not a finite number")
        return float(value)
    raise TypeError(f"{field}: no JSON form for {type(live).__name__}")  # a live state this code does not know


def _python_rng(value, bad: _Fail) -> tuple:
    """random.getstate() as JSON wrote it: (3, 625 32-bit words, gauss_next)."""
    if not (isinstance(value, list) and len(value) == 3 and value[0] == 3 and isinstance(value[1], list)
            and len(value[1]) == 625 and all(type(w) is int and 0 <= w < 2 ** 32 for w in value[1])
            and value[1][-1] <= 624 and (value[2] is None or type(value[2]) is float)):
        bad("python_random", "is not a Python random state")
    return 3, tuple(value[1]), value[2]


def restore(model, opt, sched, cfg: TrainConfig, d: Dist) -> int:
    """Load OUT/checkpoint into the (possibly sharded) model and optimiser; returns the step to continue from."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    from cosmoes.checkpoint import load_model

    ckpt = check_resumable(cfg)
    state = read_training_state(ckpt, model, opt, sched)
    if state.step > cfg.steps:
        raise CosmoesError(f"cannot resume {cfg.out}: its checkpoint is at step {state.step}, "
                           f"past --steps {cfg.steps}")
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, load_model(ckpt).state_dict(), options=opts)
    set_optimizer_state_dict(model, opt, state.optimizer, options=opts)
    sched.load_state_dict(state.scheduler)
    torch.set_rng_state(state.torch_rng)
    random.setstate(state.python_rng)
    return state.step


def _log(metrics_path: Path, row: dict) -> None:
    with metrics_path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(metrics_path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint so the log reads as one uninterrupted run.

    A run killed while logging leaves a torn last line: it, and any other line that is not a row, is dropped with
    a one-line warning.
    """
    from cosmoes.checkpoint import write_text_atomic

    if not metrics_path.exists():
        return
    try:
        raw = metrics_path.read_bytes()
    except OSError as exc:
        raise CosmoesError(f"cannot read {metrics_path}: {exc.strerror or exc}") from None
    lines, kept, bad = raw.split(b"\n"), [], []
    for number, line in enumerate(lines, 1):
        row = _metrics_row(line)
        if row is None and line.strip():
            bad.append(number)
        elif row is not None and row["step"] <= step:
            kept.append(json.dumps(row) + "\n")
    if bad:
        torn = bad == [len(lines)]  # only the last line, which has no newline
        what = "a torn last line (the run was interrupted while logging)" if torn else \
            f"{len(bad)} unreadable line{'s' if len(bad) > 1 else ''} ({', '.join(map(str, bad[:10]))})"
        print(f"warning: {metrics_path}: dropped {what}", file=sys.stderr, flush=True)
    write_text_atomic(metrics_path, "".join(kept))


def _metrics_row(line: bytes) -> dict | None:
    """One metrics row, or None for a line that is not one."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    ok = isinstance(row, dict) and type(row.get("step")) is int
    return row if ok else None


def load_training_tokenizer(cfg: TrainConfig, resume: bool):
    """A resumed run keeps the tokenizer saved in its checkpoint, whatever the default is now."""
    from cosmoes.checkpoint import load_tokenizer_of
    from cosmoes.tokenizer import default_tokenizer, load_tokenizer

    if resume and (Path(cfg.out) / "checkpoint" / "tokenizer.json").exists():
        return load_tokenizer_of(Path(cfg.out) / "checkpoint")
    return load_tokenizer(cfg.tokenizer) if cfg.tokenizer else default_tokenizer()


def train(cfg: TrainConfig, resume: bool = False, stop_at: int | None = None) -> dict:
    """Run (or continue) a training run; returns the final summary (also written to OUT/summary.json).

    ``stop_at`` ends this invocation after that step (checkpointed) without changing the LR schedule, as an
    interruption would; ``resume`` then continues from OUT/checkpoint.
    """
    d = setup_distributed()
    try:
        return _train(cfg, resume, d, stop_at or cfg.steps)
    finally:
        if d.world > 1:
            dist.destroy_process_group()


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """(AdamW, its warm-up + cosine LambdaLR) for ``model``."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay, fused=False)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg))


def _train(cfg: TrainConfig, resume: bool, d: Dist, stop_at: int) -> dict:
    from cosmoes.checkpoint import write_text_atomic

    if resume:
        check_resumable(cfg)  # before the data is read: a wrong flag fails in a second
    tokenizer = load_training_tokenizer(cfg, resume)
    model_cfg = build_model_config(cfg, len(tokenizer))
    if cfg.batch_size % (d.world * cfg.grad_accum):
        raise CosmoesError(f"batch_size {cfg.batch_size} must divide by world_size×grad_accum = {d.world * cfg.grad_accum}")
    data = build_dataset(dataclasses.replace(cfg.data, seq_len=cfg.seq_len, seed=cfg.seed), tokenizer)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = shard_model(init_weights(Transformer(model_cfg), seed=cfg.seed).to(d.device), d)
    opt, sched = build_optimizer(model, cfg)
    out = Path(cfg.out)
    metrics_path = out / "metrics.jsonl"
    start = 0
    if resume:
        start = restore(model, opt, sched, cfg, d)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / RUN_CONFIG, json.dumps(cfg.to_dict(), indent=2))
        if resume:
            _truncate_metrics(metrics_path, start)
        else:
            metrics_path.unlink(missing_ok=True)
    run = _Run(model, opt, sched, cfg, model_cfg, tokenizer, d, metrics_path)
    return run.loop(start, min(stop_at, cfg.steps), data)


@dataclass
class _Run:
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    cfg: TrainConfig
    model_cfg: ModelConfig
    tokenizer: object
    d: Dist
    metrics_path: Path

    def step(self, step: int, train_blocks) -> dict:
        cfg, d = self.cfg, self.d
        x, y = get_batch(train_blocks, step, cfg.batch_size, seed=cfg.seed, rank=d.rank, world_size=d.world)
        totals: dict[str, torch.Tensor] = {}
        for xm, ym in zip(x.chunk(cfg.grad_accum), y.chunk(cfg.grad_accum)):
            with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=d.device.type == "cuda"):
                terms = compute_losses(self.model, xm.to(d.device), ym.to(d.device), cfg, self.model_cfg)
            (terms["loss"] / cfg.grad_accum).backward()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0) + v.detach().float().cpu() / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        totals["grad_norm"] = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        return totals

    def loop(self, start: int, stop: int, data) -> dict:
        from tqdm import tqdm

        cfg, d = self.cfg, self.d
        tokens_per_step = cfg.batch_size * cfg.seq_len
        bar = tqdm(range(start, stop), initial=start, total=cfg.steps, disable=not (cfg.progress and d.main),
                   desc=f"train {self.model_cfg.name}", unit="step", dynamic_ncols=True)
        t0, row = time.perf_counter(), {}
        self.model.train()
        for step in bar:
            terms = self.step(step, data.train)
            done = step + 1
            if done % cfg.log_every == 0 or done in (1, stop):
                row = {"step": done, **{k: _mean_across_ranks(v, d) for k, v in terms.items()},
                       "lr": self.sched.get_last_lr()[0], "tokens": done * tokens_per_step}
                if done % cfg.eval_every == 0 or done == stop:
                    row["val_loss"] = validate(self.model, data.val, cfg, self.model_cfg, d)
                if d.main:
                    _log(self.metrics_path, row)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", exrep=f"{row['exrep']:.2f}")
            if done % cfg.save_every == 0 or done == stop:
                save_training_checkpoint(self.model, self.opt, self.sched, done, cfg, self.model_cfg,
                                         self.tokenizer, d)
        bar.close()
        elapsed = time.perf_counter() - t0
        return self.summarise(row, stop, start, elapsed, tokens_per_step)

    def summarise(self, row: dict, stop: int, start: int, elapsed: float, tokens_per_step: int) -> dict:
        summary = {
            "model": self.model_cfg.name, "kind": self.model_cfg.kind, "steps": stop,
            "params_active": self.model_cfg.num_params(True), "params_total": self.model_cfg.num_params(False),
            "train_loss": row.get("lm_loss"), "val_loss": row.get("val_loss"),
            "val_ppl": math.exp(row["val_loss"]) if row.get("val_loss") is not None else None,
            "exrep": row.get("exrep"), "lb_loss": row.get("lb_loss"), "bles_loss": row.get("bles_loss"),
            "tokens_per_s": (stop - start) * tokens_per_step / elapsed if elapsed > 0 else None,
            "world_size": self.d.world, "checkpoint": str(Path(self.cfg.out) / "checkpoint"),
        }
        if self.d.main:
            from cosmoes.checkpoint import write_text_atomic

            write_text_atomic(Path(self.cfg.out) / "summary.json", json.dumps(summary, indent=2))
        return summary
