"""cosmoes.cli: `info`, `align` and `init` (preset or config.json) through typer's CliRunner, one real
`python -m cosmoes.cli` process for the error path, and one-line errors from `cosmoes.checkpoint.load_model` for
missing or truncated checkpoints."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from cosmoes.checkpoint import load_model
from cosmoes.cli import app
from cosmoes.config import PAPER_TABLE1, get_preset
from cosmoes.errors import CosmoesError

runner = CliRunner()


def invoke_json(*args: str) -> dict:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_info_json_for_wearable_moe():
    d = invoke_json("info", "wearable-moe", "--json")
    cfg = get_preset("wearable-moe")
    # Table 1: L=19, H=8, Hid=432, eight experts with two active (§3.1)
    assert (d["num_layers"], d["num_heads"], d["hidden_size"], d["num_experts"], d["top_k"]) == (19, 8, 432, 8, 2)
    assert d["active_params"] == cfg.num_params(active=True)
    assert d["total_params"] == cfg.num_params(active=False)
    want_active, want_total = PAPER_TABLE1["wearable-moe"]
    assert d["active_params"] == pytest.approx(want_active, rel=0.03)
    assert d["total_params"] == pytest.approx(want_total, rel=0.03)
    assert d["expected"] == {"active_params": want_active, "total_params": want_total}


def test_info_plain_text_mentions_counts_and_experts():
    result = runner.invoke(app, ["info", "tiny-wd"])
    assert result.exit_code == 0
    assert "tiny-wd (wd-moe)" in result.stdout and "experts=8 top_k=2 wd_rank=64" in result.stdout


def test_info_unknown_preset_raises_cosmoes_error_in_process():
    result = runner.invoke(app, ["info", "no-such-model", "--json"])
    assert isinstance(result.exception, CosmoesError)
    assert "valid presets" in str(result.exception)


def test_unknown_preset_is_one_error_line_and_exit_2_from_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "cosmoes.cli", "info", "no-such-model", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no-such-model" in lines[0]
    assert proc.stdout == ""


def test_align_json_for_tiny_moe():
    d = invoke_json("align", "tiny-moe", "--json")
    assert set(d) == {"moe", "flop-aligned dense", "param-aligned dense"}
    moe, fa, pa = d["moe"], d["flop-aligned dense"], d["param-aligned dense"]
    assert moe["active_params"] == get_preset("tiny-moe").num_params(active=True)
    assert fa["kind"] == pa["kind"] == "dense" and fa["num_experts"] == pa["num_experts"] == 0
    assert fa["active_params"] == pytest.approx(moe["active_params"], rel=0.02)
    assert pa["total_params"] == pytest.approx(moe["total_params"], rel=0.02)
    for dense in (fa, pa):
        assert (dense["num_layers"], dense["num_heads"], dense["hidden_size"]) == \
               (moe["num_layers"], moe["num_heads"], moe["hidden_size"])
        # the embedded full config rebuilds the same counts
        assert get_preset("tiny-moe").replace(**dense["config"]).num_params() == dense["total_params"]


def test_align_of_a_dense_preset_is_an_error():
    result = runner.invoke(app, ["align", "tiny-dense"])
    assert isinstance(result.exception, CosmoesError)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny-moe"
    result = runner.invoke(app, ["init", "tiny-moe", str(out), "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert str(out) in result.stdout
    return out


def test_init_writes_a_loadable_checkpoint(tiny_checkpoint):
    assert (tiny_checkpoint / "config.json").exists() and (tiny_checkpoint / "model.safetensors").exists()
    assert (tiny_checkpoint / "tokenizer.json").exists()
    # nothing left behind by the atomic write
    assert [p.name for p in tiny_checkpoint.parent.iterdir()] == ["tiny-moe"]
    model = load_model(tiny_checkpoint)
    assert model.config == get_preset("tiny-moe")
    assert model.num_params(active=True) == get_preset("tiny-moe").num_params(active=True)
    with torch.no_grad():
        out = model(torch.arange(10)[None])
    assert out.logits.shape == (1, 10, 8192) and torch.isfinite(out.logits).all()
    assert len(out.router_logits) == model.config.n_layers


def test_init_is_seeded(tiny_checkpoint, tmp_path):
    again = tmp_path / "again"
    assert runner.invoke(app, ["init", "tiny-moe", str(again), "--seed", "3"]).exit_code == 0
    a, b = load_model(tiny_checkpoint).state_dict(), load_model(again).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_takes_a_config_json_like_train_preset(tmp_path):
    cfg = get_preset("tiny-dense").replace(n_layers=2, ffn_dim=192, name="my-dense")
    path = tmp_path / "my-dense.json"
    path.write_text(json.dumps(cfg.to_dict()))
    out = tmp_path / "ckpt"
    result = runner.invoke(app, ["init", str(path), str(out), "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert load_model(out).config == cfg


def test_init_of_a_missing_config_json_is_an_error_before_writing(tmp_path):
    result = runner.invoke(app, ["init", str(tmp_path / "nowhere.json"), str(tmp_path / "ckpt")])
    assert isinstance(result.exception, CosmoesError) and "nowhere.json" in str(result.exception)
    assert not (tmp_path / "ckpt").exists()


def test_info_reads_a_checkpoint_dir(tiny_checkpoint):
    d = invoke_json("info", str(tiny_checkpoint), "--json")
    assert d["name"] == "tiny-moe"
    assert d["total_params"] == get_preset("tiny-moe").num_params()
    assert d["num_experts"] == 8 and d["top_k"] == 2
    assert invoke_json("info", str(tiny_checkpoint / "config.json"), "--json") == d


def test_load_model_missing_dir_is_a_one_line_error(tmp_path):
    with pytest.raises(CosmoesError, match="checkpoint not found") as err:
        load_model(tmp_path / "nowhere")
    assert "\n" not in str(err.value)
    with pytest.raises(CosmoesError, match="config.json"):
        load_model(tmp_path)  # exists, but is not a checkpoint


def test_load_model_truncated_safetensors_is_a_one_line_error(tiny_checkpoint, tmp_path):
    broken = shutil.copytree(tiny_checkpoint, tmp_path / "broken")
    weights = broken / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(CosmoesError, match="corrupt checkpoint") as err:
        load_model(broken)
    assert "\n" not in str(err.value)


def test_load_model_without_weights_is_a_one_line_error(tiny_checkpoint, tmp_path):
    broken = shutil.copytree(tiny_checkpoint, tmp_path / "no-weights")
    (broken / "model.safetensors").unlink()
    with pytest.raises(CosmoesError, match="no weights"):
        load_model(broken)


# -- numbers and paths from the user: refused by the library's configs, printed as the flag that set them ------------

def cli_error(monkeypatch, capsys, *args: str) -> str:
    """The one line `cosmoes ARGS` prints on stderr through the real entry point (exit 2)."""
    from cosmoes.cli import main

    monkeypatch.setattr(sys, "argv", ["cosmoes", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err[len("error: "):].rstrip("\n")


@pytest.fixture
def plain_file(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("not a directory\n")
    return path


@pytest.mark.parametrize("flag,value,message", [
    ("--lr", "nan", "--lr must be finite and > 0, got nan"), ("--lr", "inf", "--lr must be finite and > 0, got inf"),
    ("--lr", "-1", "--lr must be finite and > 0, got -1.0"),
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ("--grad-accum", "0", "--grad-accum must be at least 1, got 0"),
    ("--save-every", "0", "--save-every must be at least 1, got 0"), ("--steps", "0", "--steps must be at least 1, got 0"),
    ("--eval-every", "0", "--eval-every must be at least 1, got 0"),
    ("--log-every", "0", "--log-every must be at least 1, got 0"),
    ("--warmup-steps", "-1", "--warmup-steps must be at least 0, got -1"),
    ("--seq-len", "1", "--seq-len must be at least 2, got 1"),
    ("--lb-coef", "-0.5", "--lb-coef must be finite and >= 0, got -0.5"),
    ("--bles-coef", "nan", "--bles-coef must be finite and >= 0, got nan"),
    ("--bles-temperature", "0", "--bles-temperature must be finite and > 0, got 0.0"),
    ("--bles-temperature", "inf", "--bles-temperature must be finite and > 0, got inf"),
])
def test_train_refuses_bad_numbers(monkeypatch, capsys, tmp_path, flag, value, message):
    assert cli_error(monkeypatch, capsys, "train", "--out", tmp_path / "run", flag, value) == message
    assert not (tmp_path / "run").exists()


def test_out_must_not_be_an_existing_file(monkeypatch, capsys, plain_file, tmp_path):
    file_ = f"--out must be a directory, but {plain_file} is an existing file"
    assert cli_error(monkeypatch, capsys, "train", "--out", plain_file) == file_
    assert cli_error(monkeypatch, capsys, "train", "--out", plain_file / "run") == file_
    assert cli_error(monkeypatch, capsys, "export", "tiny-moe", "--target", "host", "--out", plain_file) == file_
    assert cli_error(monkeypatch, capsys, "bench", tmp_path / "nowhere", "--out", plain_file) == file_
    assert cli_error(monkeypatch, capsys, "routing", tmp_path / "nowhere", "--out", plain_file) == file_
    assert cli_error(monkeypatch, capsys, "reproduce", "--out", plain_file) == file_
    assert cli_error(monkeypatch, capsys, "reproduce", "--results", plain_file / "r") == \
        f"--results must be a directory, but {plain_file} is an existing file"
    assert cli_error(monkeypatch, capsys, "eval", tmp_path / "nowhere", "--json", plain_file / "report.json") == \
        f"--json must be a file in a directory, but {plain_file} is an existing file"


@pytest.mark.parametrize("args,message", [
    (["--lr", "nan"], "--lr must be finite and > 0, got nan"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--warmup-steps", "-2"], "--warmup-steps must be at least 0, got -2"),
    (["--bles-temperature", "-1"], "--bles-temperature must be finite and > 0, got -1.0"),
])
def test_reproduce_refuses_bad_numbers_before_training_anything(monkeypatch, capsys, tmp_path, args, message):
    assert cli_error(monkeypatch, capsys, "reproduce", "--out", tmp_path / "runs", *args) == message
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args,message", [
    (["--max-chunk", "0"], "--max-chunk must be positive, got 0"),
    (["--max-seq-len", "2000000"], "--max-seq-len must be at most 1048576, got 2000000"),
    (["--group-size", "0"], "--group-size must be positive, got 0"),
])
def test_export_refuses_bad_numbers(monkeypatch, capsys, tmp_path, args, message):
    assert cli_error(monkeypatch, capsys, "export", "tiny-moe", "--target", "host", "--out", tmp_path / "b",
                     *args) == message


@pytest.mark.parametrize("args,message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["--temperature", "nan"], "--temperature must be finite and >= 0, got nan"),
    (["--temperature", "inf"], "--temperature must be finite and >= 0, got inf"),
    (["--temperature", "-1"], "--temperature must be finite and >= 0, got -1.0"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-p", "nan"], "--top-p must be in (0, 1], got nan"),
])
def test_generate_refuses_bad_numbers_before_opening_the_bundle(monkeypatch, capsys, tmp_path, args, message):
    assert cli_error(monkeypatch, capsys, "generate", tmp_path / "nowhere", "--prompt", "x", *args) == message


@pytest.mark.parametrize("args,message", [
    (["--budget-mb", "nan"], "--budget-mb must be finite and > 0, got nan"),
    (["--budget-mb", "0"], "--budget-mb must be finite and > 0, got 0.0"),
    (["--temperature", "inf"], "--temperature must be finite and >= 0, got inf"),
    (["--threads", "-1"], "--threads must be between 0 (one per core) and {cores}, got -1"),
    (["--threads", "100000"], "--threads must be between 0 (one per core) and {cores}, got 100000"),
])
def test_bench_refuses_bad_numbers_before_opening_the_bundle(monkeypatch, capsys, tmp_path, args, message):
    from cosmoes.system import usable_cores

    assert cli_error(monkeypatch, capsys, "bench", tmp_path / "nowhere", "--out", tmp_path / "o", *args) == \
        message.format(cores=usable_cores())


def test_a_prompt_that_is_not_utf8_is_one_line_from_a_real_process(tmp_path):
    # the shell hands the bytes over as they are; Python turns them into lone surrogates (PEP 383)
    proc = subprocess.run([sys.executable, "-m", "cosmoes.cli", "generate", str(tmp_path), "--prompt".encode(),
                           b"\xff\xfe"], capture_output=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == b""
    assert proc.stderr == b"error: --prompt is not valid UTF-8\n"


def test_tokenizer_exceptions_become_one_line():
    from cosmoes.cli import _tokenizer_call

    def broken():
        raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]\nmore")

    with pytest.raises(CosmoesError) as err:
        _tokenizer_call(broken)
    assert str(err.value) == ("the bundle's tokenizer failed: TextEncodeInput must be Union[TextInputSequence, "
                              "Tuple[InputSequence, InputSequence]]")


def test_a_damaged_checkpoint_config_is_one_line_for_info(tmp_path, monkeypatch, capsys, tiny_checkpoint):
    broken = shutil.copytree(tiny_checkpoint, tmp_path / "broken")
    data = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(data | {"num_attention_heads": 0}))
    assert cli_error(monkeypatch, capsys, "info", broken) == \
        f"{broken / 'config.json'}: num_attention_heads = 0 must be at least 1"
