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

STATE_FILE = "trainer_state.pt"


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


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


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
    state = {"step": step, "optimizer": optim, "scheduler": sched.state_dict(), "rng": _rng_state()}

    def add_state(tmp: Path) -> None:
        torch.save(state, tmp / STATE_FILE)
        (tmp / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    save_checkpoint(plain, Path(cfg.out) / "checkpoint", tokenizer=tokenizer, extra=add_state)


def restore(model, opt, sched, cfg: TrainConfig, d: Dist) -> int:
    """Load OUT/checkpoint into the (possibly sharded) model and optimiser; returns the step to continue from."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    from cosmoes.checkpoint import check_checkpoint_dir, load_model

    ckpt = check_checkpoint_dir(Path(cfg.out) / "checkpoint")
    if not (ckpt / STATE_FILE).exists():
        raise CosmoesError(f"cannot resume: {ckpt} has no {STATE_FILE}")
    try:
        state = torch.load(ckpt / STATE_FILE, weights_only=False)
    except Exception as exc:
        raise CosmoesError(f"corrupt training state {ckpt / STATE_FILE}: {exc}") from None
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, load_model(ckpt).state_dict(), options=opts)
    set_optimizer_state_dict(model, opt, state["optimizer"], options=opts)
    sched.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return int(state["step"])


def _log(metrics_path: Path, row: dict) -> None:
    with metrics_path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(metrics_path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint so the log reads as one uninterrupted run."""
    if metrics_path.exists():
        rows = [line for line in metrics_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        metrics_path.write_text("".join(r + "\n" for r in rows))


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


def _train(cfg: TrainConfig, resume: bool, d: Dist, stop_at: int) -> dict:
    tokenizer = load_training_tokenizer(cfg, resume)
    model_cfg = build_model_config(cfg, len(tokenizer))
    if cfg.batch_size % (d.world * cfg.grad_accum):
        raise CosmoesError(f"batch_size {cfg.batch_size} must divide by world_size×grad_accum = {d.world * cfg.grad_accum}")
    data = build_dataset(dataclasses.replace(cfg.data, seq_len=cfg.seq_len, seed=cfg.seed), tokenizer)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = shard_model(init_weights(Transformer(model_cfg), seed=cfg.seed).to(d.device), d)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay, fused=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg))
    out = Path(cfg.out)
    metrics_path = out / "metrics.jsonl"
    start = 0
    if resume:
        start = restore(model, opt, sched, cfg, d)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
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
            (Path(self.cfg.out) / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
