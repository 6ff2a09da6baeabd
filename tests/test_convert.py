"""cosmoes.convert: checkpoints that transformers' own MixtralForCausalLM / LlamaForCausalLM load with our logits,
and the way back with identical weights."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, MixtralForCausalLM
from typer.testing import CliRunner

from cosmoes.checkpoint import load_hf_model, load_model, save_checkpoint
from cosmoes.cli import app
from cosmoes.config import get_preset
from cosmoes.convert import from_transformers, to_transformers
from cosmoes.errors import CosmoesError
from cosmoes.model import Transformer, init_weights
from cosmoes.tokenizer import MIN_VOCAB, train_tokenizer

HF_CLASS = {"mixtral": MixtralForCausalLM, "llama": LlamaForCausalLM}
CASES = [("tiny-moe", "mixtral"), ("tiny-dense", "llama")]


def random_model(preset: str, **changes) -> Transformer:
    return init_weights(Transformer(get_preset(preset).replace(**changes)), seed=0).eval()


def input_ids(batch=2, length=24, seed=1):
    return torch.randint(0, 8192, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "text.txt").write_text("It is a truth universally acknowledged, that a single man in possession of a good "
                                "fortune, must be in want of a wife.\n" * 20)
    return train_tokenizer([d / "text.txt"], MIN_VOCAB + 40, d / "tokenizer")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer):
    """{preset: (our model, our checkpoint dir, transformers checkpoint dir)}; the MoE source carries a tokenizer."""
    root = tmp_path_factory.mktemp("convert")
    out = {}
    for preset, kind in CASES:
        model = random_model(preset)
        src = save_checkpoint(model, root / preset, tokenizer=tokenizer if kind == "mixtral" else None)
        out[preset] = (model, src, to_transformers(src, kind, root / f"{preset}-{kind}"))
    return out


@pytest.mark.parametrize("preset,kind", CASES)
def test_transformers_own_class_gives_our_logits(converted, preset, kind):
    model, _, hf_dir = converted[preset]
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == kind
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    assert config["num_key_value_heads"] == model.config.kv_heads
    hf = HF_CLASS[kind].from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = input_ids()
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids, output_router_logits=kind == "mixtral")
    assert (ours.logits - theirs.logits).abs().max().item() <= 1e-4
    if kind == "mixtral":
        assert config["num_local_experts"] == 8 and config["num_experts_per_tok"] == 2
        assert len(theirs.router_logits) == len(ours.router_logits) == model.config.n_layers
        for r_ours_BTE, r_theirs_NE in zip(ours.router_logits, theirs.router_logits):
            torch.testing.assert_close(r_theirs_NE, r_ours_BTE.flatten(0, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset,kind", CASES)
def test_greedy_generation_matches(converted, preset, kind):
    _, src, hf_dir = converted[preset]
    ours = load_hf_model(src)
    theirs = HF_CLASS[kind].from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompt = input_ids(batch=1, length=7, seed=3)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    a, b = ours.generate(prompt, **kwargs), theirs.generate(prompt, **kwargs)
    assert a.shape == (1, 19)
    assert torch.equal(a, b)


@pytest.mark.parametrize("preset,kind", CASES)
def test_round_trip_gives_identical_weights(converted, tmp_path, preset, kind):
    model, _, hf_dir = converted[preset]
    back = load_model(from_transformers(hf_dir, kind, tmp_path / "back"))
    sd, sd_back = model.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys()
    assert all(torch.equal(sd[k], sd_back[k]) for k in sd)
    same = lambda c: c.replace(name="x").to_dict() | {"n_kv_heads": c.kv_heads}  # noqa: E731
    assert same(back.config) == same(model.config)


def test_tokenizer_and_special_ids_are_carried(converted, tokenizer, tmp_path):
    _, _, hf_dir = converted["tiny-moe"]
    text = "a single man in possession of a good fortune"
    assert AutoTokenizer.from_pretrained(hf_dir)(text)["input_ids"] == tokenizer(text)["input_ids"]
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    back = from_transformers(hf_dir, "mixtral", tmp_path / "back")
    assert AutoTokenizer.from_pretrained(back)(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert not (converted["tiny-dense"][2] / "tokenizer.json").exists()


def test_router_temperature_and_tied_embeddings_convert_exactly(tmp_path):
    # softmax(tau * R x) == softmax((tau * R) x): the temperature folds into the Mixtral router weight
    model = random_model("tiny-moe", router_temperature=2.5, tie_embeddings=True)
    hf_dir = to_transformers(save_checkpoint(model, tmp_path / "src"), "mixtral", tmp_path / "hf")
    hf = MixtralForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids = input_ids()
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4
        back = load_model(from_transformers(hf_dir, "mixtral", tmp_path / "back"))
        assert back.config.tie_embeddings and back.config.router_temperature == 1.0
        assert (model(ids).logits - back(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("preset,changes,kind,message", [
    ("tiny-wd", {}, "mixtral", "low-rank"),
    ("tiny-moe", {"norm_topk_prob": False}, "mixtral", "renormalises"),
    ("tiny-moe", {}, "llama", "convert it to mixtral"),
    ("tiny-dense", {}, "mixtral", "convert it to llama"),
])
def test_unconvertible_models_fail_clearly(tmp_path, preset, changes, kind, message):
    src = save_checkpoint(random_model(preset, **changes), tmp_path / "src")
    with pytest.raises(CosmoesError, match=message):
        to_transformers(src, kind, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing half-written


def test_wd_to_mixtral_error_mentions_mixtral(tmp_path):
    src = save_checkpoint(random_model("tiny-wd"), tmp_path / "src")
    with pytest.raises(CosmoesError) as err:
        to_transformers(src, "mixtral", tmp_path / "out")
    assert "no Mixtral equivalent" in str(err.value) and "\n" not in str(err.value)


def test_missing_and_wrong_sources_fail_clearly(converted, tmp_path):
    _, src, hf_dir = converted["tiny-moe"]
    with pytest.raises(CosmoesError, match="not found"):
        to_transformers(tmp_path / "nope", "mixtral", tmp_path / "out")
    with pytest.raises(CosmoesError, match="not found"):
        from_transformers(tmp_path / "nope", "mixtral", tmp_path / "out")
    with pytest.raises(CosmoesError, match="--from"):
        to_transformers(hf_dir, "mixtral", tmp_path / "out")
    with pytest.raises(CosmoesError, match="'cosmoe' checkpoint, not 'mixtral'"):
        from_transformers(src, "mixtral", tmp_path / "out")
    with pytest.raises(CosmoesError, match="not 'llama'"):
        from_transformers(hf_dir, "llama", tmp_path / "out")
    with pytest.raises(CosmoesError, match="valid kinds: mixtral, llama"):
        to_transformers(src, "gpt2", tmp_path / "out")
    with pytest.raises(CosmoesError, match="must differ"):
        to_transformers(src, "mixtral", src)


@pytest.mark.parametrize("kind,edit,message", [
    ("mixtral", {"sliding_window": 16}, "sliding_window"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}}, "rope scaling"),
])
def test_unsupported_transformers_features_fail_clearly(converted, tmp_path, kind, edit, message):
    preset = {"mixtral": "tiny-moe", "llama": "tiny-dense"}[kind]
    hf_dir = converted[preset][2]
    edited = tmp_path / "edited"
    edited.mkdir()
    for f in hf_dir.iterdir():
        (edited / f.name).write_bytes(f.read_bytes())
    config = json.loads((edited / "config.json").read_text()) | edit
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(CosmoesError, match=message):
        from_transformers(edited, kind, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_converts_both_ways(converted, tmp_path):
    model, src, _ = converted["tiny-dense"]
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(src), "--to", "llama", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["convert", str(tmp_path / "hf"), "--from", "llama", str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    back = load_model(tmp_path / "back")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_cli_error_is_one_line_without_traceback(tmp_path):
    src = save_checkpoint(random_model("tiny-wd"), tmp_path / "src")
    proc = subprocess.run([sys.executable, "-m", "cosmoes.cli", "convert", str(src), "--to", "mixtral",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no Mixtral equivalent" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [[], ["--to", "mixtral", "--from", "llama"]])
def test_cli_needs_exactly_one_direction(converted, tmp_path, flags):
    _, src, _ = converted["tiny-moe"]
    result = CliRunner().invoke(app, ["convert", str(src), *flags, str(tmp_path / "out")])
    assert isinstance(result.exception, CosmoesError)
    assert "exactly one of --to or --from" in str(result.exception)
