"""Tests for cosmoes.tokenizer: training, round trips, the shipped tokenizer and the `tokenizer train` command."""

import gzip
import sys

import pytest
from typer.testing import CliRunner

from cosmoes.cli import app, main
from cosmoes.config import get_preset
from cosmoes.data import corpus_files
from cosmoes.errors import CosmoesError
from cosmoes.tokenizer import BOS, EOS, PAD, default_tokenizer, load_tokenizer, train_tokenizer

SAMPLE = "It is a truth universally acknowledged, that a single man in possession of a good fortune.\n\n" \
         "Naïve café — 東京 😀, tabs\tand  double  spaces.\n"


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    """~30 kB of the embedded corpus as a .txt.gz file."""
    with gzip.open(corpus_files()[0], "rt", encoding="utf-8") as f:
        text = f.read(30_000)
    path = tmp_path_factory.mktemp("text") / "small.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(text)
    return path


def test_train_round_trips_and_reloads(small_text, tmp_path):
    out = tmp_path / "tok"
    tok = train_tokenizer([small_text], vocab_size=300, out=out)
    assert len(tok) == 300
    assert [tok.convert_tokens_to_ids(t) for t in (BOS, EOS, PAD)] == [0, 1, 2]
    ids = tok(SAMPLE)["input_ids"]
    assert ids[0] == tok.bos_token_id  # Llama-3 style: encoding starts with <|begin_of_text|>
    assert tok.decode(ids, skip_special_tokens=True) == SAMPLE  # byte-level: any text, exactly
    assert len(ids) < len(SAMPLE.encode())  # merges were learned
    again = load_tokenizer(out)
    assert again(SAMPLE)["input_ids"] == ids
    assert (again.bos_token, again.eos_token, again.pad_token) == (BOS, EOS, PAD)


def test_train_overwrites_tokenizer_but_not_other_dirs(small_text, tmp_path):
    out = tmp_path / "tok"
    train_tokenizer([small_text], vocab_size=280, out=out)
    assert len(train_tokenizer([small_text], vocab_size=300, out=out)) == 300
    assert len(load_tokenizer(out)) == 300
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(CosmoesError, match="refusing to overwrite"):
        train_tokenizer([small_text], vocab_size=300, out=other)
    assert (other / "keep.txt").read_text() == "x"


def test_train_rejects_bad_input(small_text, tmp_path):
    with pytest.raises(CosmoesError, match="vocab_size must be at least"):
        train_tokenizer([small_text], vocab_size=100, out=tmp_path / "t")
    with pytest.raises(CosmoesError, match="data path does not exist"):
        train_tokenizer([tmp_path / "missing.txt"], vocab_size=300, out=tmp_path / "t")


def test_load_missing_or_corrupt(tmp_path):
    with pytest.raises(CosmoesError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CosmoesError, match="corrupt tokenizer"):
        load_tokenizer(tmp_path)


def test_default_tokenizer_matches_tiny_presets():
    tok = default_tokenizer()
    assert len(tok) == get_preset("tiny-moe").vocab_size == 8192
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    ids = tok(SAMPLE)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == SAMPLE
    english = "And the evening and the morning were the first day. Mr. Darcy said he would call upon them."
    assert len(english) / len(tok(english, add_special_tokens=False)["input_ids"]) > 3.5  # trained on English prose


def test_cli_tokenizer_train(small_text, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli-tok"
    result = CliRunner().invoke(app, ["tokenizer", "train", str(small_text), "--vocab-size", "290", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(load_tokenizer(out)) == 290
    monkeypatch.setattr(sys, "argv", ["cosmoes", "tokenizer", "train", str(tmp_path / "nope.txt"), "--out", str(out)])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert "error: data path does not exist" in capsys.readouterr().err
