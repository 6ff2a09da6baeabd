"""Per-target export recipes (android, ios, host), kept as JSON data in cosmoes/export/recipes/ (§3.4 on-device).

A recipe fixes the defaults of `cosmoes export --target T`: quantisation, the quantisation modes the target
allows, tokens per call, the context length and the largest KV cache the device class holds, threads, delegate
options and how the bundle is packaged for the device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cosmoes.errors import CosmoesError
from cosmoes.formats import EMBEDDING_QUANT_MODES, QUANT_MODES

RECIPE_DIR = Path(__file__).parent / "recipes"

# Modes that exist in torchao but are refused for every target, with the reason the user sees.
REFUSED_QUANT = {
    "4w": "4w is not supported by the XNNPACK delegate in executorch 1.5.1 (wrong results); use 8da4w",
}


@dataclass
class Recipe:
    """Export defaults and limits for one deployment target."""

    target: str
    description: str
    quant: str
    group_size: int
    quant_embedding: str
    allowed_quant: list[str]
    allowed_quant_embedding: list[str]
    max_chunk: int
    threads: int  # 0 = use every core
    max_seq_len: int | None = None  # default context (capped at what the model was trained for); None: the model's
    max_kv_cache_mb: float | None = None  # the largest fp32 KV cache (all positions) the device class holds
    delegate: dict = field(default_factory=dict)
    packaging: str = ""


def targets() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.json"))


def load_recipe(target: str) -> Recipe:
    """The recipe of ``target``; an unknown target lists the known ones."""
    path = RECIPE_DIR / f"{target}.json"
    if not path.is_file():
        raise CosmoesError(f"unknown export target {target!r}; choose one of: {', '.join(targets())}")
    try:
        return Recipe(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise CosmoesError(f"corrupt recipe {path}: {exc}") from None


def check_quant(target: str, quant: str, quant_embedding: str = "none") -> Recipe:
    """Refuse quantisation modes that are unknown, known-broken, or not allowed for ``target``."""
    recipe = load_recipe(target)
    if quant in REFUSED_QUANT:
        raise CosmoesError(REFUSED_QUANT[quant])
    if quant not in QUANT_MODES:
        raise CosmoesError(f"unknown quantisation {quant!r}; choose one of: {', '.join(recipe.allowed_quant)}")
    if quant not in recipe.allowed_quant:
        raise CosmoesError(f"quantisation {quant!r} is not supported for target {target}; "
                           f"choose one of: {', '.join(recipe.allowed_quant)}")
    if quant_embedding not in EMBEDDING_QUANT_MODES:
        raise CosmoesError(f"unknown embedding quantisation {quant_embedding!r}; "
                           f"choose one of: {', '.join(recipe.allowed_quant_embedding)}")
    if quant_embedding not in recipe.allowed_quant_embedding:
        raise CosmoesError(f"embedding quantisation {quant_embedding!r} is not supported for target {target}; "
                           f"choose one of: {', '.join(recipe.allowed_quant_embedding)}")
    return recipe


__all__ = ["Recipe", "RECIPE_DIR", "targets", "load_recipe", "check_quant"]
