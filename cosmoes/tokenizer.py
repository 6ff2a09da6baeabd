"""Byte-level BPE tokenizer: train with `tokenizers`, save/load as a transformers fast tokenizer (§3.1).

The paper uses the Llama-3 tokenizer (128k vocabulary); offline we train a small byte-level BPE with the same
special-token names. Encoding with special tokens prepends <|begin_of_text|>, as Llama-3 does, so prompts at
evaluation time look like the documents seen in training ([bos] text [eos], see cosmoes.data).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from cosmoes.errors import CosmoesError

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]  # ids 0, 1, 2
DEFAULT_TOKENIZER_DIR = Path(__file__).parent / "tokenizer"
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1  # every byte, the special tokens and at least one merge


def _bpe(vocab_size: int) -> tuple[Tokenizer, trainers.BpeTrainer]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # the full byte alphabet up front: any UTF-8 text encodes without an unknown token
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return tok, trainer


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def train_tokenizer(files: list[Path], vocab_size: int, out: Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on text files (.txt, .txt.gz, .jsonl, .parquet or directories) and save it to `out`."""
    from cosmoes.data import DataConfig, iter_documents

    if vocab_size < MIN_VOCAB:
        raise CosmoesError(f"vocab_size must be at least {MIN_VOCAB} (256 bytes + special tokens), got {vocab_size}")
    for f in files:
        if not Path(f).exists():
            raise CosmoesError(f"data path does not exist: {f}")
    if not files:
        raise CosmoesError("no training files given")
    tok, trainer = _bpe(vocab_size)
    docs = iter_documents(DataConfig(sources=[str(f) for f in files]))
    tok.train_from_iterator(docs, trainer)
    tokenizer = _wrap(tok)
    save_tokenizer(tokenizer, Path(out))
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Write tokenizer files to `out` atomically (temp dir, then rename); replaces an existing tokenizer dir."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "tokenizer.json").exists())):
        raise CosmoesError(f"refusing to overwrite {out}: it exists and is not a tokenizer directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; a shipped/shared tokenizer must stay readable
    old = out.parent / f"{tmp.name}.old"
    try:
        tokenizer.save_pretrained(str(tmp))
        if out.exists():
            out.rename(old)  # the old files stay whole until the new ones are in place
        try:
            tmp.rename(out)
        except OSError:
            if old.exists():
                old.rename(out)
            raise
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)


def load_tokenizer(path: Path | str) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory (tokenizer.json + tokenizer_config.json); CosmoesError if missing or corrupt."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise CosmoesError(f"no tokenizer at {path} (expected {path / 'tokenizer.json'})")
    try:
        json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # json, tokenizers and transformers each raise their own types for a broken file
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise CosmoesError(f"corrupt tokenizer at {path}: {first}") from exc
    if tokenizer.eos_token_id is None:
        raise CosmoesError(f"tokenizer at {path} has no eos token")
    return tokenizer


def default_tokenizer() -> PreTrainedTokenizerFast:
    """The 8192-token byte-level BPE shipped in cosmoes/tokenizer/, trained on the embedded corpus."""
    return load_tokenizer(DEFAULT_TOKENIZER_DIR)
