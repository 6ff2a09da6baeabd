"""Pre-training data: read text sources, tokenise, pack into fixed-length blocks, deterministic batches (§3.1–3.2).

The paper pre-trains on FineWeb-Edu (`HuggingFaceFW/fineweb-edu`, streamed from the Hugging Face Hub); offline, the
default source is the public-domain corpus shipped in `cosmoes/corpus/` (Jane Austen's six novels and the KJV Bible).

How a source string is read (checked in this order):
  1. an existing file (.txt, .txt.gz, .jsonl, .jsonl.gz, .parquet) or a directory (every such file inside, sorted);
  2. a Hugging Face Hub dataset id `owner/name` or `owner/name:config` — exactly one '/', not starting with
     '.', '/' or '~', and not ending in a data-file extension — streamed with `datasets.load_dataset(streaming=True)`;
  3. anything else is an error: "data path does not exist: ...".

Documents: each .jsonl/.parquet/Hub record is one document; a .txt file is cut at blank lines into paragraphs which
are grouped into documents of at least `doc_chars` characters (a chapter-sized unit for the novels). Each document
is tokenised as [bos] + text + [eos]; the validation split holds out whole documents (seeded), so no text is shared
between train and val. Blocks hold seq_len+1 tokens so that x = block[:-1] and y = block[1:].
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from cosmoes.config import DataConfig  # defined torch-free there so the CLI reads its defaults without torch
from cosmoes.errors import CosmoesError

CORPUS_DIR = Path(__file__).parent / "corpus"
DEFAULT_HUB_DATASET = "HuggingFaceFW/fineweb-edu"
# Streaming a 1.3T-token Hub dataset needs a stop; used when DataConfig.max_docs is None for a Hub source.
HUB_DEFAULT_MAX_DOCS = 100_000
TEXT_SUFFIXES = (".txt", ".txt.gz")
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
_NOT_HUB_SUFFIXES = TEXT_SUFFIXES + RECORD_SUFFIXES + (".gz", ".json", ".csv", ".arrow", ".md")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(:[\w.-]+)?")
_TOKENIZE_BATCH = 1024


@dataclass
class PackedData:
    """Token blocks of shape (N, seq_len+1), int64, for the train and validation splits."""

    train: torch.Tensor
    val: torch.Tensor
    n_train_docs: int
    n_val_docs: int

    @property
    def seq_len(self) -> int:
        return self.train.shape[1] - 1


def corpus_files() -> list[Path]:
    """The embedded corpus files, sorted."""
    return sorted(p for p in CORPUS_DIR.iterdir() if _suffix(p) in TEXT_SUFFIXES)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in sorted(TEXT_SUFFIXES + RECORD_SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


def is_hub_id(source: str) -> bool:
    """True if `source` reads as a Hub dataset id (`owner/name[:config]`) rather than a local path."""
    return (_HUB_ID.fullmatch(source) is not None and not source.startswith((".", "~"))
            and not source.lower().endswith(_NOT_HUB_SUFFIXES))


def resolve_source(source: str) -> list[Path] | str:
    """Local data files behind `source` (file or directory), or the Hub id itself; CosmoesError otherwise."""
    path = Path(source).expanduser()
    if path.is_file():
        if not _suffix(path):
            raise CosmoesError(f"unsupported data file {source} (use .txt, .txt.gz, .jsonl, .jsonl.gz or .parquet)")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p))
        if not files:
            raise CosmoesError(f"no .txt/.txt.gz/.jsonl/.parquet files in directory {source}")
        return files
    if is_hub_id(source):
        return source
    raise CosmoesError(f"data path does not exist: {source}")


def split_paragraphs(text: str, doc_chars: int) -> list[str]:
    """Cut text at blank lines and group consecutive paragraphs into documents of at least doc_chars characters."""
    docs, current, size = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        current.append(para)
        size += len(para)
        if size >= doc_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs


def _read_text(path: Path) -> str:
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise CosmoesError(f"could not read {path} as UTF-8 text: {exc}") from exc


def _records(source: str, records, text_field: str) -> Iterator[str]:
    """Yield the text field of each record of a `datasets` stream, with one-line errors."""
    it = iter(records)
    while True:
        try:
            record = next(it)
        except StopIteration:
            return
        except Exception as exc:  # datasets/pyarrow raise many types for unreadable or unreachable data
            raise CosmoesError(f"could not read {source}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
        if text_field not in record:
            raise CosmoesError(f"{source}: record has no field {text_field!r} (fields: {sorted(record)})")
        text = record[text_field]
        if isinstance(text, str) and text.strip():
            yield text


def _stream(builder_or_name: str, split: str, data_files: str | None = None):
    import datasets

    name, _, config = builder_or_name.partition(":")
    try:
        return datasets.load_dataset(name, config or None, data_files=data_files, split=split, streaming=True)
    except Exception as exc:  # offline, unknown dataset, bad config or split: all user-facing
        label = data_files or builder_or_name
        raise CosmoesError(f"could not load dataset {label}: {str(exc).splitlines()[0] if str(exc) else exc!r}") \
            from exc


def _file_documents(path: Path, cfg: DataConfig) -> Iterator[str]:
    suffix = _suffix(path)
    if suffix in TEXT_SUFFIXES:
        yield from split_paragraphs(_read_text(path), cfg.doc_chars)
        return
    builder = "parquet" if suffix == ".parquet" else "json"
    # `datasets` files a lone data file under the "train" split whatever cfg.hf_split says
    yield from _records(str(path), _stream(builder, "train", data_files=str(path)), cfg.text_field)


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """All documents of cfg.sources (or the embedded corpus), in source order, capped at cfg.max_docs."""
    sources = cfg.sources or [str(p) for p in corpus_files()]
    resolved = [resolve_source(s) for s in sources]  # fail on a bad path before reading anything

    def generate() -> Iterator[str]:
        for src in resolved:
            if isinstance(src, str):
                cap = cfg.max_docs or HUB_DEFAULT_MAX_DOCS
                yield from islice(_records(src, _stream(src, cfg.hf_split), cfg.text_field), cap)
            else:
                for path in src:
                    yield from _file_documents(path, cfg)

    return islice(generate(), cfg.max_docs) if cfg.max_docs else generate()


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out round(val_fraction * n) documents (at least one) chosen by a seeded permutation; order is kept."""
    if not 0.0 <= val_fraction < 1.0:
        raise CosmoesError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * len(docs)))
    if n_val and len(docs) - n_val < 1:
        raise CosmoesError(f"only {len(docs)} document(s): too few to hold out a validation split")
    val_idx = set(np.random.default_rng(seed).permutation(len(docs))[:n_val].tolist())
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def held_out_documents(cfg: DataConfig, samples: int) -> list[str]:
    """Up to ``samples`` documents of cfg's validation split, a seeded subset in corpus order."""
    if samples < 1:
        raise CosmoesError(f"samples must be positive, got {samples}")
    _, val_docs = split_documents(list(iter_documents(cfg)), cfg.val_fraction, cfg.seed)
    if not val_docs:
        raise CosmoesError("no held-out documents: the training split used val_fraction 0")
    # the validation split keeps corpus order (Austen before the Bible); a seeded draw spreads the sample over it
    picked = np.sort(np.random.default_rng(cfg.seed).permutation(len(val_docs))[:samples])
    return [val_docs[i] for i in picked]


def tokenize_documents(docs: list[str], tokenizer) -> np.ndarray:
    """One int64 stream: [bos] + tokens + [eos] per document (bos only if the tokenizer has one)."""
    if tokenizer.eos_token_id is None:
        raise CosmoesError("the tokenizer has no eos token; it is needed to separate documents")
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    eos = [tokenizer.eos_token_id]
    parts = []
    for start in range(0, len(docs), _TOKENIZE_BATCH):
        ids = tokenizer(docs[start:start + _TOKENIZE_BATCH], add_special_tokens=False)["input_ids"]
        parts.append(np.fromiter((t for seq in ids for t in bos + seq + eos), dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def pack_blocks(tokens: np.ndarray, seq_len: int) -> torch.Tensor:
    """Cut a token stream into non-overlapping (N, seq_len+1) blocks; the tail shorter than a block is dropped."""
    width = seq_len + 1
    n = len(tokens) // width
    return torch.from_numpy(tokens[: n * width].reshape(n, width).copy())


def build_dataset(cfg: DataConfig, tokenizer) -> PackedData:
    """Read, split by document, tokenise and pack cfg's sources into train/val blocks."""
    if cfg.seq_len < 1:
        raise CosmoesError(f"seq_len must be positive, got {cfg.seq_len}")
    if cfg.max_docs is not None and cfg.max_docs < 1:
        raise CosmoesError(f"max_docs must be positive, got {cfg.max_docs}")
    if cfg.seed < 0:
        raise CosmoesError(f"seed must be non-negative, got {cfg.seed}")
    docs = list(iter_documents(cfg))
    if not docs:
        raise CosmoesError(f"no text found in {cfg.sources or 'the embedded corpus'}")
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.seed)
    train = pack_blocks(tokenize_documents(train_docs, tokenizer), cfg.seq_len)
    val = pack_blocks(tokenize_documents(val_docs, tokenizer), cfg.seq_len)
    if len(train) == 0:
        raise CosmoesError(f"not enough text for one training block of {cfg.seq_len + 1} tokens")
    if val_docs and len(val) == 0:
        raise CosmoesError(f"validation split is shorter than one block of {cfg.seq_len + 1} tokens; "
                           "raise val_fraction or lower seq_len")
    return PackedData(train=train, val=val, n_train_docs=len(train_docs), n_val_docs=len(val_docs))


@lru_cache(maxsize=4)
def _epoch_order(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    # SeedSequence mixes (seed, epoch) so that no two pairs share a permutation (unlike seed + epoch)
    return torch.from_numpy(np.random.default_rng((seed, epoch)).permutation(n_blocks))


def get_batch(blocks: torch.Tensor, step: int, batch_size: int, seed: int, rank: int = 0,
              world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets (x_BT, y_BT) for one step: a pure function of (step, seed).

    The global batch of `step` is rows [step*batch_size, (step+1)*batch_size) of an endless stream that visits
    every block once per epoch in a seeded per-epoch order, so training resumes exactly from a step number.
    With data parallelism, rank r takes rows r::world_size of the global batch (batch_size/world_size rows).
    """
    n = blocks.shape[0]
    if n == 0:
        raise CosmoesError("no data blocks to draw a batch from")
    if seed < 0 or step < 0:
        raise CosmoesError(f"seed and step must be non-negative, got seed={seed} step={step}")
    if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
        raise CosmoesError(f"batch_size {batch_size} must split evenly over world_size {world_size} "
                           f"with 0 <= rank < world_size (rank {rank})")
    rows = torch.arange(step * batch_size + rank, (step + 1) * batch_size, world_size)
    epochs, positions = rows // n, rows % n
    idx = torch.empty_like(rows)
    for epoch in epochs.unique().tolist():
        mask = epochs == epoch
        idx[mask] = _epoch_order(n, seed, epoch)[positions[mask]]
    picked_BS = blocks[idx]
    return picked_BS[:, :-1].contiguous(), picked_BS[:, 1:].contiguous()
