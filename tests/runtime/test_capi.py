"""The C API (export/include/cosmoes/cosmoes.h, libcosmoes) and the native tokenizer: the same text and tokens as the
Python runtime and the runner, a C program over the installed package, and every bad input an error, not a crash."""

import ctypes
import json
import shutil
import subprocess

import pytest

from cosmoes.data import held_out_documents
from cosmoes.config import DataConfig
from cosmoes.errors import CosmoesError
from cosmoes.runtime.capi import NativeSession, NativeTokenizer, last_error, library
from cosmoes.runtime.native import build_runner, generate_native, install_library
from cosmoes.runtime.python import BundleRuntime
from cosmoes.tokenizer import default_tokenizer

PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
NON_ASCII = "Naïve café owners in Zürich — “Ωμέγα”, 東京, Ærøskøbing, emoji 🙂 and a tab\there."


@pytest.fixture(scope="module")
def lib():
    return library()


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


def python_generate(bundle, policy, prompt, n, tokenizer):
    rt = BundleRuntime(bundle, policy=policy, threads=1)
    ids = rt.generate(tokenizer(prompt)["input_ids"], n, eos_id=tokenizer.eos_token_id)
    return ids, tokenizer.decode(ids, skip_special_tokens=True), rt.stats


# -- the tokenizer ---------------------------------------------------------------------------------------------------

def test_native_tokenizer_encodes_and_decodes_like_python_tokenizers(lib, tokenizer, micro_bundle_8da4w):
    native = NativeTokenizer(micro_bundle_8da4w / "tokenizer", lib=lib)
    texts = held_out_documents(DataConfig(), 6) + [NON_ASCII, "", " leading and trailing spaces  ", "a\n\nb"]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert native.encode(text) == ids, text[:80]
        assert native.encode(text, add_bos=False) == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert native.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True), text[:80]
    assert native.eos == tokenizer.eos_token_id


def test_decoding_never_splits_a_character(lib, tokenizer, micro_bundle_8da4w):
    """Byte-level tokens can end inside a character: decoding token by token must equal decoding all at once."""
    native = NativeTokenizer(micro_bundle_8da4w / "tokenizer", lib=lib)
    ids = tokenizer(NON_ASCII, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)  # the text does split characters across tokens
    assert native.decode(ids) == NON_ASCII
    # an invalid sequence becomes U+FFFD, as Python's tokenizer shows it
    broken = ids[:1] + [i for i in ids if "\ufffd" in tokenizer.decode([i])][:1]
    assert native.decode(broken) == tokenizer.decode(broken)


# -- generation: the library, the runner and the Python runtime agree ------------------------------------------------

@pytest.mark.parametrize("policy", ["all", "swap", "lru:2"])
def test_library_runner_and_python_runtime_give_the_same_text(lib, tokenizer, micro_bundle_8da4w, policy):
    ids, text, py_stats = python_generate(micro_bundle_8da4w, policy, PROMPT, 24, tokenizer)
    streamed = []
    with NativeSession(micro_bundle_8da4w, policy=policy, threads=1, lib=lib) as s:
        got_text, got_ids = s.generate(PROMPT, 24, on_piece=streamed.append)
        stats = s.stats()
    assert got_ids == [i for i in ids if i != tokenizer.eos_token_id]
    assert got_text == text == "".join(streamed)
    assert stats["tokens"] == got_ids and stats["policy"] == policy
    assert stats["expert_loads"] == py_stats.loads and stats["expert_evictions"] == py_stats.evictions
    runner = subprocess.run([str(build_runner()), str(micro_bundle_8da4w), "--prompt", PROMPT, "--gen", "24",
                             "--policy", policy, "--threads", "1"], capture_output=True, text=True)
    assert runner.returncode == 0, runner.stderr
    assert runner.stdout == PROMPT + text + "\n"


def test_ids_variant_gives_the_runners_tokens(lib, tokenizer, micro_bundle_8da4w):
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    with NativeSession(micro_bundle_8da4w, policy="lru:2", threads=1, lib=lib) as s:
        got = s.generate_ids(prompt_ids, 20, temperature=0.8, top_p=0.9, seed=7)
        again = s.generate_ids(prompt_ids, 20, temperature=0.8, top_p=0.9, seed=7)
    runner = generate_native(micro_bundle_8da4w, prompt_ids, 20, policy="lru:2", threads=1, temperature=0.8,
                             top_p=0.9, seed=7)
    assert got == again == runner.tokens


def test_generate_native_cli_prints_what_the_python_runtime_prints(cosmoes_run, micro_bundle_8da4w, tmp_path):
    argv = ["generate", str(micro_bundle_8da4w), "--prompt", PROMPT, "--max-new-tokens", "16", "--policy", "lru:2",
            "--threads", "1"]
    python, native = cosmoes_run.run(argv, tmp_path), cosmoes_run.run(argv + ["--native"], tmp_path)
    cosmoes_run.check([python, native])
    assert native.status == 0 and native.stdout == python.stdout
    assert native.stdout.startswith(PROMPT) and len(native.stdout) > len(PROMPT) + 1


def test_a_c_program_links_the_installed_package(micro_bundle_8da4w, tokenizer, tmp_path):
    """What an app does: find_package(cosmoes) from an installed prefix, a C11 program, no Python anywhere."""
    prefix = install_library(tmp_path / "prefix")
    assert (prefix / "include" / "cosmoes" / "cosmoes.h").is_file()
    assert (prefix / "lib" / "cmake" / "cosmoes" / "cosmoesConfig.cmake").is_file()
    src = tmp_path / "client"
    shutil.copytree(__import__("pathlib").Path(__file__).parent / "capi_client", src)
    for cmd in (["cmake", "-S", str(src), "-B", str(src / "build"), f"-DCMAKE_PREFIX_PATH={prefix}"],
                ["cmake", "--build", str(src / "build")]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    # the installed prefix stands alone: move it, and the program still finds libcosmoes and its libraries
    moved = tmp_path / "moved"
    shutil.move(str(prefix), moved)
    env = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(moved / "lib")}
    for policy in ("all", "swap", "lru:2"):
        proc = subprocess.run([str(src / "build" / "capi_client"), str(micro_bundle_8da4w), policy, "24", PROMPT],
                              capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        ids, text, py_stats = python_generate(micro_bundle_8da4w, policy, PROMPT, 24, tokenizer)
        assert proc.stdout == text
        assert f"ids: {','.join(str(i) for i in ids if i != tokenizer.eos_token_id)}" in proc.stderr
        stats = json.loads(proc.stderr.split("stats: ", 1)[1].splitlines()[0])
        assert stats["runner"] == "cosmoes-native" and stats["peak_rss_mb"] > 0 and stats["policy"] == policy
        assert stats["expert_loads"] == py_stats.loads


# -- bad input: a status and one line, never a crash ----------------------------------------------------------------

def _open(lib, bundle, options):
    handle = lib.cosmoes_open(None if bundle is None else str(bundle).encode(),
                              None if options is None else options.encode())
    return handle, last_error(lib)


@pytest.mark.parametrize("options, message", [
    ("{not json", "options is not valid JSON"),
    ("[1, 2]", "options must be a JSON object"),
    ('{"policy": "lru:1"}', "lru needs N >= top_k = 2"),
    ('{"policy": "fifo"}', "unknown expert cache policy 'fifo'"),
    ('{"policy": 3}', "options.policy must be a string"),
    ('{"threads": -1}', "options.threads = -1 must be a number in [0, 1024]"),
    ('{"threads": 1.5}', "options.threads = 1.5 must be an integer"),
    ('{"budget_mb": 0.01}', "memory budget 0.0 MB is below this bundle's minimum"),
    ('{"budget_mb": -3}', "options.budget_mb = -3 must be a number > 0"),
    ('{"check_sha": "yes"}', "options.check_sha must be true or false"),
    ('{"prefetch": 1}', "options.prefetch must be true or false"),
    ('{"polcy": "swap"}', 'options: unknown key "polcy" (valid: policy, budget_mb, threads, check_sha, prefetch)'),
])
def test_bad_options_are_refused_with_one_line(lib, micro_bundle_8da4w, options, message):
    handle, error = _open(lib, micro_bundle_8da4w, options)
    assert not handle and message in error and "\n" not in error
    assert lib.cosmoes_last_status() == 1  # COSMOES_INVALID_ARGUMENT: the caller's option, not the bundle


def test_prefetch_option_asks_ahead_and_keeps_the_tokens(lib, micro_bundle_8da4w):
    """"prefetch": true gives the runner's --prefetch: the same text, and asks and hits in the statistics."""
    plain = NativeSession(micro_bundle_8da4w, threads=1, lib=lib)
    ahead = NativeSession(micro_bundle_8da4w, threads=1, lib=lib, prefetch=True)
    prompt = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
              "want of a wife.")
    with plain, ahead:
        assert ahead.generate(prompt, 16) == plain.generate(prompt, 16)
        s = ahead.stats()
        assert s["prefetch"] is True and 0 < s["expert_prefetch_hits"] <= min(s["expert_prefetched"],
                                                                               s["expert_loads"])
        assert plain.stats()["expert_prefetched"] == 0


def test_missing_and_corrupt_bundles_are_refused(lib, micro_bundle_8da4w, tmp_path):
    # a folder whose name mentions "policy" is still a missing bundle (the status, not the message, says which)
    handle, error = _open(lib, tmp_path / "policy-nowhere", None)
    assert not handle and "policy-nowhere" in error and lib.cosmoes_last_status() == 2  # COSMOES_BAD_BUNDLE
    handle, error = _open(lib, None, None)
    assert not handle and error == "bundle_dir is NULL" and lib.cosmoes_last_status() == 1
    broken = tmp_path / "broken"
    shutil.copytree(micro_bundle_8da4w, broken)
    with open(broken / "experts.bin", "r+b") as f:
        f.truncate(1000)
    handle, error = _open(lib, broken, None)
    assert not handle and "experts.bin" in error and "truncated" in error
    with pytest.raises(CosmoesError, match="is not a tokenizer.json|no tokenizer.json|tokenizer not found"):
        NativeTokenizer(tmp_path / "nowhere", lib=lib)


def test_generation_refusals(lib, micro_bundle_8da4w):
    s = NativeSession(micro_bundle_8da4w, threads=1, lib=lib)
    h = s.handle
    assert lib.cosmoes_stats_json(h) is None and "no statistics yet" in last_error(lib)
    too_long = " ".join(["word"] * 200)  # max_seq_len is 64
    cb = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_int32, ctypes.c_void_p)(lambda p, i, u: 0)
    assert lib.cosmoes_generate(h, too_long.encode(), None, cb, None) == 3  # COSMOES_TOO_LONG
    assert "exceed the bundle's max_seq_len 64" in last_error(lib)
    assert lib.cosmoes_generate(h, b"hi", b'{"max_new_tokens": 0}', cb, None) == 1
    assert "params.max_new_tokens = 0" in last_error(lib)
    assert lib.cosmoes_generate(h, b"hi", b'{"top_p": 0}', cb, None) == 1
    assert lib.cosmoes_generate(h, b"\xff\xfe", None, cb, None) == 1 and "not valid UTF-8" in last_error(lib)
    assert lib.cosmoes_generate(h, None, None, cb, None) == 1 and last_error(lib) == "prompt is NULL"
    assert lib.cosmoes_generate(None, b"hi", None, cb, None) == 1 and last_error(lib) == "session is NULL"
    assert lib.cosmoes_generate_ids(h, (ctypes.c_int32 * 1)(99999), 1, None, (ctypes.c_int32 * 64)(), 64,
                                    None) == 1
    assert "outside the vocabulary" in last_error(lib)
    # a callback that stops at once: generation ends cleanly after one token
    seen = []
    stop = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_int32, ctypes.c_void_p)(
        lambda p, i, u: seen.append(i) or 1)
    assert lib.cosmoes_generate(h, b"Once upon a time", b'{"max_new_tokens": 20}', stop, None) == 0
    assert len(seen) == 1 and s.stats()["tokens"] == seen
    s.reset()
    s.close()
    lib.cosmoes_close(h)  # closing twice: refused, not a double free
    assert "already closed" in last_error(lib)
    assert lib.cosmoes_generate(h, b"hi", None, cb, None) == 5  # COSMOES_CLOSED
    lib.cosmoes_close(None)
    lib.cosmoes_reset(None)
    lib.cosmoes_free(None)


def test_close_from_another_thread_waits_for_the_running_generation(lib, micro_bundle_8da4w):
    import threading

    s = NativeSession(micro_bundle_8da4w, threads=1, lib=lib)
    handle, started, result = s.handle, threading.Event(), {}

    def on_piece(_piece):
        started.set()

    def generate():
        result["ids"] = s.generate("Once upon a time", 40, on_piece=on_piece)[1]

    worker = threading.Thread(target=generate)
    worker.start()
    assert started.wait(60)
    closer = threading.Thread(target=lib.cosmoes_close, args=(handle,))
    closer.start()  # blocks inside the library until the generation returns
    worker.join(120)
    closer.join(120)
    assert not worker.is_alive() and not closer.is_alive()
    assert len(result["ids"]) == 40  # the generation ran to its end
    cb = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_int32, ctypes.c_void_p)(lambda p, i, u: 0)
    assert lib.cosmoes_generate(handle, b"hi", None, cb, None) == 5 and "closed" in last_error(lib)
