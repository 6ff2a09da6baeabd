"""What a path on the command line is: a checkpoint, a training run, an exported bundle, a config.json or a preset.

The one place that tells these apart (file names included), so every command reads a path the same way. No torch.
"""

from __future__ import annotations

from pathlib import Path

from cosmoes.errors import CosmoesError

CONFIG_NAME = "config.json"  # a checkpoint's model configuration (transformers' name)
CHECKPOINT_DIR = "checkpoint"  # where a training run keeps its latest checkpoint: OUT/checkpoint/
MANIFEST_NAME = "manifest.json"  # an exported bundle's table of contents (cosmoes.export.manifest)


def resolve_checkpoint(path: str | Path) -> Path:
    """A training run's output directory stands for its latest checkpoint (OUT/checkpoint); other paths are kept."""
    path = Path(path)
    if not (path / CONFIG_NAME).exists() and (path / CHECKPOINT_DIR / CONFIG_NAME).exists():
        return path / CHECKPOINT_DIR
    return path


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` is an exported bundle directory (it has a bundle manifest)."""
    return (Path(path) / MANIFEST_NAME).is_file()


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint directory, or a training run whose checkpoint exists."""
    return (resolve_checkpoint(path) / CONFIG_NAME).is_file()


def model_format(path: str | Path) -> str:
    """"bundle" or "checkpoint" (a run directory counts); a directory that is neither is a one-line error.

    A path that does not exist is left to the checkpoint loader, whose "checkpoint not found" says so.
    """
    path = Path(path)
    if is_bundle(path):
        return "bundle"
    if not path.exists() or is_checkpoint(path):
        return "checkpoint"
    raise CosmoesError(f"{path} is neither a cosmoes checkpoint (no {CONFIG_NAME}) nor an exported bundle "
                       f"(no {MANIFEST_NAME})")


def config_path(source: str | Path) -> Path | None:
    """The config.json a model source names: a checkpoint's or run's, or a .json file; None for a preset name.

    A source with a '/' or a .json suffix is a path even if nothing is there, so a mistyped path never reads as
    an unknown preset.
    """
    path = Path(source)
    if path.is_dir():
        return resolve_checkpoint(path) / CONFIG_NAME
    if path.suffix == ".json" or path.exists():
        return path
    if len(path.parts) > 1:
        raise CosmoesError(f"{source}: no such checkpoint directory or config.json")
    return None


__all__ = ["CONFIG_NAME", "CHECKPOINT_DIR", "MANIFEST_NAME", "resolve_checkpoint", "is_bundle", "is_checkpoint",
           "model_format", "config_path"]
