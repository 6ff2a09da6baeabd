"""The `cosmoes` command line: thin typer commands over the library (help text comes from docstrings)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from cosmoes.errors import CosmoesError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="CoSMoEs: compact sparse Mixture-of-Experts — train, evaluate, export, benchmark.")


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


@app.command()
def info(source: str = typer.Argument(..., help="preset name, checkpoint directory or config.json"),
         as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Print a model's shape and its active/total parameter counts."""
    from cosmoes.config import describe, human, load_model_config

    d = describe(load_model_config(source))
    if as_json:
        return _print_json(d)
    typer.echo(f"{d['name']} ({d['kind']}): {human(d['active_params'])} active / {human(d['total_params'])} total")
    typer.echo(f"  layers={d['num_layers']} heads={d['num_heads']} kv_heads={d['num_kv_heads']} "
               f"hidden={d['hidden_size']} ffn={d['ffn_dim']} vocab={d['vocab_size']}")
    if d["num_experts"]:
        typer.echo(f"  experts={d['num_experts']} top_k={d['top_k']} wd_rank={d['wd_rank']}")
    if d["expected"]:
        e = d["expected"]
        typer.echo(f"  paper Table 1: {human(e['active_params'])} active / {human(e['total_params'])} total")


@app.command()
def align(source: str = typer.Argument(..., help="MoE preset name, checkpoint directory or config.json"),
          as_json: bool = typer.Option(False, "--json")):
    """Derive the FLOP-aligned (FA) and parameter-aligned (PA) dense counterparts of an MoE model."""
    from cosmoes.config import align as align_configs, describe, human, load_model_config

    a = align_configs(load_model_config(source))
    rows = [("moe", a.moe), ("flop-aligned dense", a.flop_aligned), ("param-aligned dense", a.param_aligned)]
    if as_json:
        return _print_json({k: describe(c) | {"config": c.to_dict()} for k, c in rows})
    for label, c in rows:
        typer.echo(f"{label:>20}: layers={c.n_layers} heads={c.n_heads} hidden={c.dim} ffn={c.ffn_dim} "
                   f"active={human(c.num_params(True))} total={human(c.num_params(False))}")


# --- commands added by other modules go below this line ---


@app.command()
def init(preset: str = typer.Argument(..., help="preset name"),
         out: Path = typer.Argument(..., help="checkpoint directory to write"),
         seed: int = typer.Option(0, help="random seed")):
    """Write a randomly initialised checkpoint of a preset (for speed benchmarks of paper-sized models)."""
    from cosmoes.checkpoint import init_checkpoint
    from cosmoes.tokenizer import default_tokenizer

    typer.echo(f"wrote {init_checkpoint(preset, out, seed=seed, tokenizer=default_tokenizer())}")


@app.command()
def train(preset: str = typer.Option("tiny-moe", help="preset name or config.json"),
          out: Path = typer.Option(Path("runs/tiny-moe"), help="output directory (checkpoint/, metrics.jsonl)"),
          data: Optional[List[str]] = typer.Option(None, help="text/jsonl/parquet files or dirs, or a HF dataset "
                                                              "name (default: the embedded corpus)"),
          tokenizer: Optional[Path] = typer.Option(None, help="tokenizer dir (default: the shipped one)"),
          steps: int = typer.Option(200), batch_size: int = typer.Option(16), seq_len: int = typer.Option(128),
          grad_accum: int = typer.Option(1), lr: float = typer.Option(3e-3), warmup_steps: int = typer.Option(20),
          lb_coef: float = typer.Option(0.01, help="sequence-level load-balancing loss weight"),
          bles_coef: float = typer.Option(0.0, help="block-wise expert selection (BlES) loss weight"),
          bles_temperature: float = typer.Option(1.0, help="tau of the BlES softmax (Eq. 2)"),
          eval_every: int = typer.Option(50), log_every: int = typer.Option(10), save_every: int = typer.Option(100),
          seed: int = typer.Option(0),
          resume: bool = typer.Option(False, help="continue OUT/checkpoint bit-for-bit"),
          stop_at: Optional[int] = typer.Option(None, help="stop after this step (schedule still spans --steps)")):
    """Pre-train a model (LM + load-balancing + optional BlES loss); works under torchrun with FSDP2."""
    from cosmoes.data import DataConfig
    from cosmoes.train import TrainConfig, train as run_training

    cfg = TrainConfig(preset=preset, out=str(out), steps=steps, batch_size=batch_size, seq_len=seq_len,
                      grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps, lb_coef=lb_coef,
                      bles_coef=bles_coef, bles_temperature=bles_temperature, eval_every=eval_every,
                      log_every=log_every, save_every=save_every, seed=seed,
                      tokenizer=str(tokenizer) if tokenizer else None, data=DataConfig(sources=list(data or [])))
    summary = run_training(cfg, resume=resume, stop_at=stop_at)
    if summary is not None:
        _print_summary(summary)


def _print_summary(summary: dict) -> None:
    for key, value in summary.items():
        typer.echo(f"{key:>16}: {value:.4g}" if isinstance(value, float) else f"{key:>16}: {value}")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app()
    except CosmoesError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
