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


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app()
    except CosmoesError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
