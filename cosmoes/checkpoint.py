"""Checkpoints on disk: a transformers directory (config.json + model.safetensors + tokenizer), written atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from cosmoes.artifacts import resolve_checkpoint
from cosmoes.config import ModelConfig, get_preset, load_model_config
from cosmoes.errors import CosmoesError


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``out`` only if the block finishes.

    An interrupted or failed write leaves ``out`` as it was: never half-written.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(model, out: str | Path, tokenizer=None,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` (a `Transformer`) with its tokenizer as a transformers checkpoint directory, atomically.

    ``extra(tmp_dir)`` may add files (training state) that must land together with the weights.
    """
    from cosmoes.hf import CosmoeForCausalLM

    kwargs = {}
    if tokenizer is not None:
        kwargs = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    hf_model = CosmoeForCausalLM.from_transformer(model, **kwargs)
    with atomic_dir(out) as tmp, _no_progress_bars():
        hf_model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
    return Path(out)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Unless verbose: transformers draws a "Writing model shards" bar for our one-file checkpoints, a 0/1 → 1/1
    line on every save that says nothing."""
    from transformers.utils import logging as hf_logging

    from cosmoes.quiet import verbose

    hide = hf_logging.is_progress_bar_enabled() and not verbose()
    if hide:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hide:
            hf_logging.enable_progress_bar()


def check_checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint directory, or a one-line error saying what is missing."""
    path = resolve_checkpoint(path)
    if not path.exists():
        raise CosmoesError(f"checkpoint not found: {path}")
    if not path.is_dir() or not (path / "config.json").exists():
        raise CosmoesError(f"not a cosmoes checkpoint (no config.json): {path}")
    if not any(path.glob("*.safetensors")):
        raise CosmoesError(f"checkpoint has no weights (*.safetensors): {path}")
    return path


def load_hf_model(path: str | Path, dtype=None):
    """`CosmoeForCausalLM` from a checkpoint directory; corrupt files give a one-line error."""
    import torch

    from cosmoes.hf import CosmoeForCausalLM

    path = check_checkpoint_dir(path)
    load_model_config(path)  # validates config.json first, with our own message
    try:
        model = CosmoeForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    except Exception as exc:  # safetensors/transformers raise many types for truncated or bad files
        raise CosmoesError(f"corrupt checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def load_model(path: str | Path, dtype=None):
    """The plain `Transformer` of a checkpoint directory."""
    return load_hf_model(path, dtype).model


def load_tokenizer_of(path: str | Path, required: bool = True):
    """The tokenizer saved beside a checkpoint (None if absent and not required)."""
    path = resolve_checkpoint(path)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        if required:
            raise CosmoesError(f"checkpoint has no tokenizer: {path}")
        return None
    from transformers import AutoTokenizer

    import cosmoes.hf  # noqa: F401  (AutoTokenizer reads config.json too: model_type "cosmoe" must be registered)

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise CosmoesError(f"corrupt tokenizer in {path}: {str(exc).splitlines()[0]}") from None


def model_from_source(source: str | Path, seed: int = 0):
    """A checkpoint directory's model, or a randomly initialised preset (for speed work)."""
    from cosmoes.model import Transformer, init_weights

    if Path(source).exists():
        return load_model(source)
    return init_weights(Transformer(get_preset(str(source))), seed=seed).eval()


def init_checkpoint(source: str | Path, out: str | Path, seed: int = 0, tokenizer=None) -> Path:
    """Write a randomly initialised checkpoint of a preset name or config.json, as `cosmoes train --preset` reads
    them (used for speed benchmarks of paper-sized models)."""
    from cosmoes.model import Transformer, init_weights

    model = init_weights(Transformer(load_model_config(source)), seed=seed)
    return save_checkpoint(model, out, tokenizer=tokenizer)


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CosmoesError(f"{what} not found: {path}") from None
    except ValueError as exc:
        raise CosmoesError(f"corrupt {what} {path}: {exc}") from None


__all__ = ["atomic_dir", "save_checkpoint", "load_hf_model", "load_model", "load_tokenizer_of", "model_from_source",
           "init_checkpoint", "check_checkpoint_dir", "read_json", "ModelConfig"]
