"""Checkpoints on disk: a transformers directory (config.json + model.safetensors + tokenizer), written atomically."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
import sys
from pathlib import Path
from typing import Callable, Iterator

from cosmoes.artifacts import resolve_checkpoint
from cosmoes.config import ModelConfig, get_preset, load_model_config
from cosmoes.errors import CosmoesError


# Temp and old copies sit beside their target as `.NAME.tmp-HOST-PID-RANDOM`: hidden, never taken for the real
# thing, and a later write can tell a dead writer's leftovers (removed) from a live writer's (left alone).
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
_SIBLING = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[0-9a-f]+")


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``out`` only if the block finishes.

    An interrupted or failed write (SIGKILL and power loss included) leaves ``out`` as it was: never half-written,
    and never missing where the file system can swap two names in one step (Linux, macOS); elsewhere a kill in the
    instant between two renames leaves the old copy beside it, which the next write puts back.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(out)
    tmp = _new_sibling(out, "tmp", os.mkdir)
    try:
        yield tmp
        _sync_tree(tmp)
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap it holds the previous version


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a file so that a reader sees the old or the new content, never a torn one (temp file + rename)."""
    path = Path(path)
    clear_leftovers(path)
    tmp = _new_sibling(path, "tmp", lambda p: open(p, "x").close())  # "x" honours the umask, unlike mkstemp
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def clear_leftovers(target: str | Path) -> None:
    """Remove the temp copies that killed writers left beside ``target``; bring back an old copy if it is missing.

    Only leftovers of processes that are gone are touched (same host, pid not running).
    """
    target = Path(target)
    if not target.parent.is_dir():
        return
    for sibling in target.parent.iterdir():
        m = _SIBLING.fullmatch(sibling.name)
        if not m or m["name"] != target.name or not _gone(m["host"], int(m["pid"])):
            continue
        if m["kind"] == "old" and not target.exists():
            os.replace(sibling, target)  # killed between the two renames of the fallback swap
        elif sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)


def _gone(host: str, pid: int) -> bool:
    """Whether the writer that named a leftover is known to have ended (never guessed for another host)."""
    if host != _HOST or os.name != "posix" or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, someone else's
        return False
    return False


def _new_sibling(target: Path, kind: str, create: Callable[[Path], None]) -> Path:
    """Create (with ``create``) a fresh hidden sibling of ``target`` named for this host and process."""
    for _ in range(100):
        path = target.with_name(f".{target.name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            create(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {target}")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Put ``tmp`` at ``out``; a previous ``out`` ends up at ``tmp``. At every instant ``out`` is one or the other."""
    if not out.exists() and not out.is_symlink():
        os.replace(tmp, out)
    elif not _exchange(tmp, out):
        # No atomic exchange here: two renames. A kill between them leaves `.NAME.old-...`, which the next write
        # (clear_leftovers) puts back.
        old = _new_sibling(out, "old", lambda p: None)
        os.replace(out, old)
        os.replace(tmp, out)
        os.replace(old, tmp)
    _fsync_dir(out.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (renameat2 RENAME_EXCHANGE, renamex_np RENAME_SWAP); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2
        rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), 2)  # RENAME_SWAP
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # this file system cannot
        return False
    raise OSError(err, os.strerror(err), str(b))


def _sync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk, so after a power cut the rename never lands first."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # folders cannot be opened for fsync elsewhere
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        # use_safetensors: never fall back to a pickled pytorch_model.bin someone put beside the weights
        model = CosmoeForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, use_safetensors=True)
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
    from cosmoes.config import check_out_dir
    from cosmoes.model import Transformer, init_weights

    check_out_dir("out", out)
    model = init_weights(Transformer(load_model_config(source)), seed=seed)
    return save_checkpoint(model, out, tokenizer=tokenizer)


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CosmoesError(f"{what} not found: {path}") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; RecursionError: deep nesting
        raise CosmoesError(f"corrupt {what} {path}: {exc}") from None
    except OSError as exc:
        raise CosmoesError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


__all__ = ["atomic_dir", "write_text_atomic", "clear_leftovers", "save_checkpoint", "load_hf_model", "load_model",
           "load_tokenizer_of", "model_from_source", "init_checkpoint", "check_checkpoint_dir", "read_json",
           "ModelConfig"]
