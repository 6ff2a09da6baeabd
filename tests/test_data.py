"""Tests for cosmoes.data: sources, document split, packing and deterministic, rank-split batches."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cosmoes.data import (CORPUS_DIR, DataConfig, build_dataset, corpus_files, get_batch, is_hub_id, iter_documents,
                          resolve_source, split_documents, split_paragraphs)
from cosmoes.errors import CosmoesError
from cosmoes.tokenizer import default_tokenizer


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture(scope="module")
def corpus_data(tok):
    return build_dataset(DataConfig(seq_len=64, val_fraction=0.1, max_docs=200), tok)


def test_embedded_corpus_is_shipped():
    files = corpus_files()
    assert len(files) >= 2 and all(f.name.endswith(".txt.gz") for f in files)
    assert sum(f.stat().st_size for f in files) < 10 * 2**20
    assert "public domain" in (CORPUS_DIR / "README.md").read_text().lower()
    docs = list(iter_documents(DataConfig(max_docs=50)))
    assert len(docs) == 50 and all(d.strip() for d in docs)


def test_split_paragraphs_groups_in_order():
    paras = [f"paragraph {i} " + "x" * (1 + i * 7 % 50) for i in range(40)]
    docs = split_paragraphs("\n\n\n".join(paras) + "\n\n  \n", doc_chars=200)
    assert "\n\n".join(docs).split("\n\n") == paras  # nothing lost, order kept, blank runs collapsed
    assert all(len(d) >= 200 for d in docs[:-1])


def test_blocks_shape_and_val_disjoint(corpus_data, tok):
    train, val = corpus_data.train, corpus_data.val
    assert train.dtype == val.dtype == torch.int64
    assert train.shape[1] == val.shape[1] == 65 and len(train) > len(val) > 0
    assert (corpus_data.n_train_docs, corpus_data.n_val_docs) == (180, 20)
    assert int(train.max()) < len(tok) and int((train == tok.eos_token_id).sum()) > 0
    train_rows = {tuple(r) for r in train.tolist()}
    assert not any(tuple(r) in train_rows for r in val.tolist())


def test_document_split_is_seeded_and_disjoint():
    docs = [f"doc {i}" for i in range(100)]
    train, val = split_documents(docs, 0.1, seed=3)
    assert len(val) == 10 and not set(train) & set(val) and set(train) | set(val) == set(docs)
    assert split_documents(docs, 0.1, seed=3) == (train, val)
    assert split_documents(docs, 0.1, seed=4)[1] != val
    assert split_documents(docs, 0.0, seed=3) == (docs, [])
    with pytest.raises(CosmoesError, match="val_fraction"):
        split_documents(docs, 1.0, seed=0)


def test_get_batch_is_a_pure_function_of_step_and_seed():
    blocks = torch.arange(12 * 5).reshape(12, 5)
    x, y = get_batch(blocks, step=1, batch_size=4, seed=7)
    assert x.shape == y.shape == (4, 4)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert all(torch.equal(a, b) for a, b in zip((x, y), get_batch(blocks, 1, 4, seed=7)))
    assert not torch.equal(x, get_batch(blocks, 2, 4, seed=7)[0])
    epoch = torch.cat([get_batch(blocks, s, 4, seed=7)[0] for s in range(3)])
    assert sorted(epoch[:, 0].tolist()) == list(range(0, 60, 5))  # each block exactly once per epoch
    next_epoch = torch.cat([get_batch(blocks, s, 4, seed=7)[0] for s in range(3, 6)])
    assert not torch.equal(epoch, next_epoch)  # a fresh order each epoch
    assert not torch.equal(epoch, torch.cat([get_batch(blocks, s, 4, seed=8)[0] for s in range(3)]))
    wrap = get_batch(blocks, 2, 5, seed=7)[0]  # rows 10..14 straddle epochs 0 and 1
    assert torch.equal(wrap[:2], epoch[10:12])


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_split_rebuilds_global_batch(corpus_data, world_size):
    x, y = get_batch(corpus_data.train, step=5, batch_size=8, seed=1)
    parts = [get_batch(corpus_data.train, 5, 8, seed=1, rank=r, world_size=world_size) for r in range(world_size)]
    for r, (xr, yr) in enumerate(parts):
        assert torch.equal(xr, x[r::world_size]) and torch.equal(yr, y[r::world_size])
    interleaved = torch.stack([p[0] for p in parts], dim=1).reshape_as(x)
    assert torch.equal(interleaved, x)
    with pytest.raises(CosmoesError, match="split evenly"):
        get_batch(corpus_data.train, 0, 6, seed=1, rank=0, world_size=4)


def test_source_rules(tmp_path):
    assert is_hub_id("HuggingFaceFW/fineweb-edu") and is_hub_id("HuggingFaceFW/fineweb-edu:sample-10BT")
    for not_hub in ("data/foo.txt", "./a/b", "/a/b", "a/b/c", "corpus", "a/b.jsonl", "~/x"):
        assert not is_hub_id(not_hub), not_hub
    assert resolve_source("HuggingFaceFW/fineweb-edu") == "HuggingFaceFW/fineweb-edu"
    for missing in ("data/foo.txt", "./nope", str(tmp_path / "nope.txt"), "nosuchname"):
        with pytest.raises(CosmoesError, match="data path does not exist"):
            list(iter_documents(DataConfig(sources=[missing])))
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(CosmoesError, match="unsupported data file"):
        resolve_source(str(tmp_path / "notes.csv"))
    with pytest.raises(CosmoesError, match="no .txt"):
        resolve_source(str(tmp_path))


def _records(n):
    return [f"Record {i}: " + " ".join(["the quick brown fox"] * (i % 5 + 3)) for i in range(n)]


def test_jsonl_parquet_txt_and_directory_inputs(tmp_path, tok):
    texts = _records(30)
    with open(tmp_path / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts[:10]))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[10:20])
    pq.write_table(pa.table({"text": texts[20:], "n": list(range(10))}), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text("First paragraph.\n\nSecond one.\n")
    assert list(iter_documents(DataConfig(sources=[str(tmp_path / "c.parquet")]))) == texts[20:]
    assert list(iter_documents(DataConfig(sources=[str(tmp_path)]))) == texts + ["First paragraph.\n\nSecond one."]
    assert list(iter_documents(DataConfig(sources=[str(tmp_path)], max_docs=12))) == texts[:12]
    data = build_dataset(DataConfig(sources=[str(tmp_path)], seq_len=16, val_fraction=0.2, seed=0), tok)
    assert data.train.shape[1] == 17 and len(data.val) > 0 and (data.n_train_docs, data.n_val_docs) == (25, 6)
    stream = torch.cat([data.train.flatten(), data.val.flatten()])
    assert int((stream == tok.bos_token_id).sum()) >= 25  # one [bos] per document, bar the dropped tails


def test_text_field_and_bad_records(tmp_path, tok):
    pq.write_table(pa.table({"body": _records(20)}), tmp_path / "x.parquet")
    with pytest.raises(CosmoesError, match="no field 'text'"):
        list(iter_documents(DataConfig(sources=[str(tmp_path / "x.parquet")])))
    docs = list(iter_documents(DataConfig(sources=[str(tmp_path / "x.parquet")], text_field="body")))
    assert docs == _records(20)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(CosmoesError, match="could not read"):
        list(iter_documents(DataConfig(sources=[str(tmp_path / "bad.jsonl")])))
    with pytest.raises(CosmoesError, match="not enough text"):
        build_dataset(DataConfig(sources=[str(tmp_path / "x.parquet")], text_field="body", seq_len=4096,
                                 val_fraction=0.0), tok)
