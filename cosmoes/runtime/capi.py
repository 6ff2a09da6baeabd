"""The native library's C API (export/include/cosmoes/cosmoes.h) from Python, through ctypes (§3.4.2 on device).

What an app does over JNI or Swift, done from Python: `cosmoes generate --native` runs on it, and the tests use it to
hold the library to the same tokens and text as the runner and the Python runtime. The library is built (cached)
with the runner by cosmoes.runtime.native.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Callable

from cosmoes.errors import CosmoesError

_TOKEN_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_int32, ctypes.c_void_p)
_lib: ctypes.CDLL | None = None


def library(path: str | Path | None = None, progress: Callable[[str], None] | None = None) -> ctypes.CDLL:
    """libcosmoes with its C signatures declared; built on first use (``progress`` hears of it) unless ``path``
    names one."""
    global _lib
    if path is None and _lib is not None:
        return _lib
    default = path is None
    if default:
        from cosmoes.runtime.native import library_path

        path = library_path(progress)
    lib = ctypes.CDLL(str(path))
    c = ctypes
    sigs = {
        "cosmoes_version": (c.c_char_p, []),
        "cosmoes_last_error": (c.c_char_p, []),
        "cosmoes_last_status": (c.c_int, []),
        "cosmoes_open": (c.c_void_p, [c.c_char_p, c.c_char_p]),
        "cosmoes_generate": (c.c_int, [c.c_void_p, c.c_char_p, c.c_char_p, _TOKEN_CALLBACK, c.c_void_p]),
        "cosmoes_generate_ids": (c.c_int, [c.c_void_p, c.POINTER(c.c_int32), c.c_size_t, c.c_char_p,
                                           c.POINTER(c.c_int32), c.c_size_t, c.POINTER(c.c_size_t)]),
        "cosmoes_stats_json": (c.c_void_p, [c.c_void_p]),
        "cosmoes_free": (None, [c.c_void_p]),
        "cosmoes_reset": (None, [c.c_void_p]),
        "cosmoes_close": (None, [c.c_void_p]),
        "cosmoes_tokenizer_open": (c.c_void_p, [c.c_char_p]),
        "cosmoes_tokenizer_encode": (c.c_int, [c.c_void_p, c.c_char_p, c.c_int, c.POINTER(c.c_int32), c.c_size_t,
                                               c.POINTER(c.c_size_t)]),
        "cosmoes_tokenizer_decode": (c.c_void_p, [c.c_void_p, c.POINTER(c.c_int32), c.c_size_t]),
        "cosmoes_tokenizer_eos": (c.c_int32, [c.c_void_p]),
        "cosmoes_tokenizer_close": (None, [c.c_void_p]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    if default:
        _lib = lib
    return lib


def last_error(lib: ctypes.CDLL) -> str:
    return (lib.cosmoes_last_error() or b"").decode("utf-8", "replace")


def _owned_text(lib: ctypes.CDLL, pointer: int | None) -> str | None:
    """A string the library allocated, copied and freed."""
    if not pointer:
        return None
    try:
        return ctypes.string_at(pointer).decode("utf-8")
    finally:
        lib.cosmoes_free(pointer)


def _ids(values: list[int]):
    return (ctypes.c_int32 * max(1, len(values)))(*values)


class NativeSession:
    """A bundle opened with cosmoes_open: text or ids in, tokens out, the library's statistics JSON."""

    def __init__(self, bundle: str | Path, policy: str = "swap", budget_mb: float | None = None, threads: int = 0,
                 check_sha: bool = True, lib: ctypes.CDLL | None = None, prefetch: bool = False):
        self.lib = lib or library()
        options = {"policy": policy, "threads": threads, "check_sha": check_sha, "prefetch": prefetch}
        if budget_mb is not None:
            options["budget_mb"] = budget_mb
        self.handle = self.lib.cosmoes_open(str(bundle).encode(), json.dumps(options).encode())
        if not self.handle:
            raise CosmoesError(last_error(self.lib))

    def _check(self, status: int) -> None:
        if status != 0:
            raise CosmoesError(last_error(self.lib))

    def generate(self, prompt: str, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, on_piece: Callable[[str], bool | None] | None = None) -> tuple[str, list[int]]:
        """The continuation's text and token ids; ``on_piece`` sees each piece as it is generated (True stops)."""
        pieces, ids = [], []

        def callback(piece: bytes, token: int, _user) -> int:
            text = piece.decode("utf-8")
            pieces.append(text)
            if token >= 0:
                ids.append(token)
            return 1 if on_piece is not None and on_piece(text) else 0

        params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
        keep = _TOKEN_CALLBACK(callback)  # referenced until the call returns
        self._check(self.lib.cosmoes_generate(self.handle, prompt.encode("utf-8", "surrogateescape"),
                                              json.dumps(params).encode(), keep, None))
        return "".join(pieces), ids

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0) -> list[int]:
        out = (ctypes.c_int32 * max_new_tokens)()
        n = ctypes.c_size_t(0)
        params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
        self._check(self.lib.cosmoes_generate_ids(self.handle, _ids(prompt_ids), len(prompt_ids),
                                                  json.dumps(params).encode(), out, max_new_tokens,
                                                  ctypes.byref(n)))
        return list(out[:n.value])

    def stats(self) -> dict:
        text = _owned_text(self.lib, self.lib.cosmoes_stats_json(self.handle))
        if text is None:
            raise CosmoesError(last_error(self.lib))
        return json.loads(text)

    def reset(self) -> None:
        self.lib.cosmoes_reset(self.handle)

    def close(self) -> None:
        if self.handle:
            self.lib.cosmoes_close(self.handle)
            self.handle = None

    def __enter__(self) -> "NativeSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NativeTokenizer:
    """The library's tokenizer (pytorch/tokenizers over a tokenizer.json)."""

    def __init__(self, path: str | Path, lib: ctypes.CDLL | None = None):
        self.lib = lib or library()
        self.handle = self.lib.cosmoes_tokenizer_open(str(path).encode())
        if not self.handle:
            raise CosmoesError(last_error(self.lib))

    @property
    def eos(self) -> int:
        return self.lib.cosmoes_tokenizer_eos(self.handle)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        n = ctypes.c_size_t(0)
        raw = text.encode("utf-8")
        self.lib.cosmoes_tokenizer_encode(self.handle, raw, int(add_bos), None, 0, ctypes.byref(n))  # the count
        out = (ctypes.c_int32 * max(1, n.value))()
        if self.lib.cosmoes_tokenizer_encode(self.handle, raw, int(add_bos), out, n.value, ctypes.byref(n)) != 0:
            raise CosmoesError(last_error(self.lib))
        return list(out[:n.value])

    def decode(self, ids: list[int]) -> str:
        text = _owned_text(self.lib, self.lib.cosmoes_tokenizer_decode(self.handle, _ids(ids), len(ids)))
        if text is None:
            raise CosmoesError(last_error(self.lib))
        return text

    def close(self) -> None:
        if self.handle:
            self.lib.cosmoes_tokenizer_close(self.handle)
            self.handle = None
