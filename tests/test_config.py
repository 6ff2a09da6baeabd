"""cosmoes.config: Table 1 presets and their parameter counts (formula and built model), FA/PA alignment,
validation errors and loading a config from a preset name, a checkpoint directory or a config.json."""

import json

import pytest
import torch

from cosmoes.config import PAPER_TABLE1, PRESETS, ModelConfig, align, get_preset, load_model_config
from cosmoes.errors import CosmoesError
from cosmoes.model import Transformer

# Table 1 of the paper: layers, attention heads, hidden size (independent of the presets' own numbers).
PAPER_SHAPES = {
    "phone-dense": (16, 32, 2048), "phone-moe": (24, 18, 1440), "phone-wd": (26, 20, 1600),
    "phone-dense-pa": (28, 24, 3072), "wearable-dense": (19, 8, 512), "wearable-moe": (19, 8, 432),
    "wearable-wd": (32, 10, 400), "wearable-dense-pa": (29, 12, 768),
}
TINY = [name for name in PRESETS if name.startswith("tiny-")]
MOE_PRESETS = [name for name, cfg in PRESETS.items() if cfg.is_moe]


def meta_model(cfg: ModelConfig) -> Transformer:
    # phone-sized models would need GBs of RAM and seconds to initialise; shapes alone are enough to count
    with torch.device("meta"):
        return Transformer(cfg)


def built_counts(model: Transformer) -> tuple[int, int]:
    """(active, total) counted independently of Transformer.num_params: total numel of unique tensors minus the
    experts each token skips."""
    total = sum(p.numel() for p in model.parameters())
    cfg = model.config
    if not cfg.is_moe:
        return total, total
    idle = 0
    for layer in model.layers:
        sizes = sorted(sum(p.numel() for p in e.parameters()) for e in layer.feed_forward.experts)
        idle += sum(sizes[: cfg.num_experts - cfg.top_k])
    return total - idle, total


def test_table1_presets_exist_with_the_papers_shapes():
    assert set(PAPER_TABLE1) == set(PAPER_SHAPES)
    for name, (layers, heads, hidden) in PAPER_SHAPES.items():
        cfg = get_preset(name)
        assert (cfg.n_layers, cfg.n_heads, cfg.dim) == (layers, heads, hidden), name
        if cfg.is_moe:  # §3.1: eight experts, two active per token
            assert (cfg.num_experts, cfg.top_k) == (8, 2)


@pytest.mark.parametrize("name", sorted(PAPER_TABLE1))
def test_table1_counts_within_3_percent_by_formula_and_by_built_model(name):
    cfg = get_preset(name)
    want_active, want_total = PAPER_TABLE1[name]
    model_active, model_total = built_counts(meta_model(cfg))
    for active, total in [(cfg.num_params(active=True), cfg.num_params(active=False)), (model_active, model_total)]:
        assert active == pytest.approx(want_active, rel=0.03)
        assert total == pytest.approx(want_total, rel=0.03)


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_are_between_1m_and_10m_params(name):
    cfg = get_preset(name)
    model = meta_model(cfg)
    for count in (cfg.num_params(active=True), cfg.num_params(active=False), *built_counts(model)):
        assert 1_000_000 <= count <= 10_000_000


@pytest.mark.parametrize("name", list(PRESETS))
def test_model_count_equals_config_formula(name):
    cfg = get_preset(name)
    model = meta_model(cfg)
    for active in (True, False):
        assert model.num_params(active=active) == cfg.num_params(active=active)
    assert built_counts(model) == (cfg.num_params(active=True), cfg.num_params(active=False))


@pytest.mark.parametrize("name,changes", [("tiny-dense", {"tie_embeddings": True}),
                                          ("tiny-moe", {"tie_embeddings": True, "n_kv_heads": None}),
                                          ("tiny-wd", {"top_k": 1, "wd_rank": 16})])
def test_model_count_equals_formula_for_variants(name, changes):
    cfg = get_preset(name).replace(**changes)
    model = meta_model(cfg)
    assert built_counts(model) == (cfg.num_params(active=True), cfg.num_params(active=False))
    assert model.num_params(active=True) == cfg.num_params(active=True)


def test_unknown_preset_lists_the_valid_names():
    with pytest.raises(CosmoesError) as err:
        get_preset("phone-moee")
    message = str(err.value)
    assert "phone-moee" in message and "\n" not in message
    assert all(name in message for name in PRESETS)
    with pytest.raises(CosmoesError, match="valid presets"):
        load_model_config("no-such-preset")


def test_get_preset_returns_a_fresh_copy():
    cfg = get_preset("tiny-moe")
    cfg.top_k = 1
    assert get_preset("tiny-moe").top_k == PRESETS["tiny-moe"].top_k == 2


# every rule of the config schema (cosmoes.schema.ModelConfigSchema) with its exact one-line message; tiny-moe is
# dim 128, 4 heads, 2 kv heads, 8 experts with top_k 2
RULES = [
    ({"top_k": 9}, "top_k = 9 must be between 1 and num_experts (8)"),
    ({"top_k": 0}, "top_k = 0 must be between 1 and num_experts (8)"),
    ({"n_heads": 3}, "n_heads = 3 must divide dim (128)"),
    ({"dim": 132, "n_heads": 4}, "n_heads = 4 must leave an even head_dim (dim 132 / n_heads = 33)"),
    ({"n_kv_heads": 3}, "n_kv_heads = 3 must divide n_heads (4)"),
    ({"wd_rank": 0}, "wd_rank = 0 must be at least 1"),
    ({"ffn_dim": 0}, "ffn_dim = 0 must be at least 1"),
    ({"vocab_size": 0}, "vocab_size = 0 must be at least 1"),
    ({"vocab_size": (1 << 24) + 1}, "vocab_size = 16777217 must be at most 16777216"),
    ({"dim": 65538}, "dim = 65538 must be at most 65536"),
    ({"n_layers": 0}, "n_layers = 0 must be at least 1"),
    ({"n_layers": 1025}, "n_layers = 1025 must be at most 1024"),
    ({"n_heads": 0}, "n_heads = 0 must be at least 1"),
    ({"n_kv_heads": 0}, "n_kv_heads = 0 must be at least 1"),
    ({"max_seq_len": 0}, "max_seq_len = 0 must be at least 1"),
    ({"max_seq_len": (1 << 20) + 1}, "max_seq_len = 1048577 must be at most 1048576"),
    ({"num_experts": 1025}, "num_experts = 1025 must be at most 1024"),
    ({"num_experts": -1}, "num_experts = -1 must be at least 0"),
    ({"norm_eps": 0.0}, "norm_eps = 0.0 must be greater than 0"),
    ({"norm_eps": float("nan")}, "norm_eps = NaN must be a finite number"),
    ({"rope_theta": -1.0}, "rope_theta = -1.0 must be greater than 0"),
    ({"rope_theta": float("inf")}, "rope_theta = Infinity must be a finite number"),
    ({"router_temperature": 0}, "router_temperature = 0 must be greater than 0"),
    ({"dim": True}, "dim = true must be an integer"),
    ({"dim": 128.0}, "dim = 128.0 must be an integer"),
    ({"dim": "128"}, 'dim = "128" must be an integer'),
    ({"dim": 10 ** 400}, "dim = a 401-digit integer must be at most 65536"),
    ({"tie_embeddings": 1}, "tie_embeddings = 1 must be true or false"),
    ({"name": 5}, "name = 5 must be a string"),
]


@pytest.mark.parametrize("changes,message", RULES)
def test_invalid_configs_raise_one_line_errors(changes, message):
    with pytest.raises(CosmoesError) as err:
        get_preset("tiny-moe").replace(**changes)
    assert str(err.value) == message


def test_top_k_above_num_experts_is_rejected_on_construction():
    with pytest.raises(CosmoesError, match="top_k"):
        ModelConfig(num_experts=4, top_k=5)
    with pytest.raises(CosmoesError) as err:
        get_preset("tiny-dense").replace(wd_rank=8)  # WD needs experts
    assert str(err.value) == "wd_rank = 8 needs an MoE model (num_experts >= 1)"


def test_a_dense_model_ignores_top_k():
    assert not get_preset("tiny-dense").replace(top_k=0).is_moe


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_obeys_the_schema(name):
    # presets are built unchecked at import (pydantic stays out of `cosmoes --help`): check them here
    PRESETS[name].validate()


@pytest.mark.parametrize("name", MOE_PRESETS)
def test_align_matches_active_and_total_counts(name):
    moe = get_preset(name)
    a = align(moe)
    fa, pa = a.flop_aligned, a.param_aligned
    assert a.moe == moe
    for dense in (fa, pa):
        assert not dense.is_moe and dense.wd_rank is None
        # same depth, heads and width: only the FFN width absorbs the difference (§3)
        assert (dense.n_layers, dense.n_heads, dense.kv_heads, dense.dim, dense.vocab_size) == \
               (moe.n_layers, moe.n_heads, moe.kv_heads, moe.dim, moe.vocab_size)
    assert fa.num_params(active=True) == pytest.approx(moe.num_params(active=True), rel=0.02)
    assert pa.num_params(active=False) == pytest.approx(moe.num_params(active=False), rel=0.02)
    assert fa.ffn_dim < pa.ffn_dim


def test_align_rejects_a_dense_model():
    with pytest.raises(CosmoesError, match="dense"):
        align(get_preset("tiny-dense"))


def test_load_model_config_from_preset_json_file_and_checkpoint_dirs(tmp_path):
    from cosmoes.checkpoint import save_checkpoint
    from cosmoes.model import init_weights

    assert load_model_config("tiny-wd") == get_preset("tiny-wd")

    cfg = get_preset("tiny-moe").replace(router_temperature=0.5, name="mine")
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(cfg.to_dict()))
    assert load_model_config(plain) == cfg
    assert load_model_config(str(plain)) == cfg

    # a saved checkpoint (transformers-style config.json), and a training run's OUT dir standing for OUT/checkpoint
    ckpt = save_checkpoint(init_weights(Transformer(cfg), seed=0), tmp_path / "run" / "checkpoint")
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "cosmoe"
    assert load_model_config(ckpt) == cfg
    assert load_model_config(ckpt / "config.json") == cfg
    assert load_model_config(tmp_path / "run") == cfg


def test_load_model_config_errors(tmp_path):
    corrupt = tmp_path / "corrupt" / "config.json"
    corrupt.parent.mkdir()
    corrupt.write_text('{"dim": 128, "n_layers":')
    for source in (corrupt, corrupt.parent):
        with pytest.raises(CosmoesError, match="config.json: not valid JSON"):
            load_model_config(source)
    with pytest.raises(CosmoesError, match="no config.json"):
        load_model_config(tmp_path / "missing.json")
    with pytest.raises(CosmoesError, match="no config.json"):
        load_model_config(tmp_path)  # a directory that is not a checkpoint
    with pytest.raises(CosmoesError, match="no such checkpoint directory"):
        load_model_config(tmp_path / "runs" / "typo")  # a missing path is not reported as an unknown preset
    llama = tmp_path / "llama.json"
    llama.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(CosmoesError, match="convert"):
        load_model_config(llama)
    bad_values = tmp_path / "bad.json"
    bad_values.write_text(json.dumps({**get_preset("tiny-moe").to_dict(), "top_k": 12}))
    with pytest.raises(CosmoesError, match="top_k"):
        load_model_config(bad_values)


# -- config.json against the schema: one line naming the file, the field (as the file spells it) and the value ---------

def hf_config(**changes) -> dict:
    """tiny-moe's checkpoint config.json (transformers' names, as CosmoeConfig.save_pretrained writes them)."""
    return {"model_type": "cosmoe", "architectures": ["CosmoeForCausalLM"], "transformers_version": "5.0.0",
            **get_preset("tiny-moe").to_hf_dict(), **changes}


def config_error(tmp_path, data, name="config.json") -> str:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    with pytest.raises(CosmoesError) as err:
        load_model_config(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: ") or message.startswith(f"{path} is a ")
    return message[len(str(path)) + 2:]


@pytest.mark.parametrize("changes,message", [
    ({"num_attention_heads": 0}, "num_attention_heads = 0 must be at least 1"),
    ({"num_experts_per_tok": 100}, "num_experts_per_tok = 100 must be between 1 and num_experts (8)"),
    ({"num_attention_heads": 3}, "num_attention_heads = 3 must divide hidden_size (128)"),
    ({"num_key_value_heads": 3}, "num_key_value_heads = 3 must divide num_attention_heads (4)"),
    ({"hidden_size": 1.5}, "hidden_size = 1.5 must be an integer"),
    ({"rms_norm_eps": -1}, "rms_norm_eps = -1 must be greater than 0"),
    ({"max_position_embeddings": 0}, "max_position_embeddings = 0 must be at least 1"),
    ({"num_experts": 0, "wd_rank": 8}, "wd_rank = 8 needs an MoE model (num_experts >= 1)"),
    ({"model_type": 5}, 'model_type = 5 must be "cosmoe"'),
])
def test_checkpoint_config_json_errors_use_the_files_names(tmp_path, changes, message):
    assert config_error(tmp_path, hf_config(**changes)) == message


def test_checkpoint_config_json_missing_field_and_foreign_keys(tmp_path):
    data = hf_config()
    del data["hidden_size"]
    assert config_error(tmp_path, data) == "hidden_size is missing"
    # keys transformers adds (and cosmoes' own names) are not a checkpoint's fields: ignored, as transformers does
    assert load_model_config_from(tmp_path, hf_config(dim=5, use_cache=True)) == get_preset("tiny-moe")


def load_model_config_from(tmp_path, data) -> ModelConfig:
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(data))
    return load_model_config(path)


def test_own_names_config_json_refuses_unknown_and_missing_fields(tmp_path):
    own = get_preset("tiny-moe").to_dict()
    assert config_error(tmp_path, {**own, "num_expert": 8}) == "num_expert = 8 is not a known field"
    assert config_error(tmp_path, {**own, "top_k": 100}) == "top_k = 100 must be between 1 and num_experts (8)"
    del own["dim"]
    assert config_error(tmp_path, own) == "dim is missing"
    optional = {k: v for k, v in get_preset("tiny-dense").to_dict().items()
                if k in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim")}
    assert load_model_config_from(tmp_path, optional) == ModelConfig(**optional)  # the rest: ModelConfig's defaults


@pytest.mark.parametrize("data,message", [
    (b"", "not valid JSON (Expecting value: line 1 column 1 (char 0))"),
    (b"\xff\xfe{}", "not valid UTF-8 (byte 0)"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON (nested too deeply)"),
    (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "not valid JSON (nested too deeply)"),
    (b"[1, 2]", "must hold a JSON object, not [1, 2]"),
    (b"null", "must hold a JSON object, not null"),
    (b'{"dim": 1, "dim": 2}', 'not valid JSON (duplicate key "dim")'),
    (json.dumps(hf_config(hidden_size="HUGE")).replace('"HUGE"', "1e400").encode(),
     "hidden_size = Infinity must be an integer"),
    (json.dumps(hf_config(rms_norm_eps="NAN")).replace('"NAN"', "NaN").encode(),
     "rms_norm_eps = NaN must be a finite number"),
    (b'{"model_type": "cosmoe"}', "vocab_size is missing"),
    (b'{"model_type": "cosmoe", "preset_name": "\\ud800"}', "not valid JSON text (a \\u escape of a lone surrogate)"),
    (b'{"vocab_size": 1' + b"0" * 400 + b"}", "vocab_size = a 401-digit integer must be at most 16777216"),
    (b'{"vocab_size": 1' + b"0" * 5000 + b"}", None),  # beyond Python's 4300-digit int parsing limit
    (json.dumps({**get_preset("tiny-moe").to_dict(), "name": "a\nb", "dim": [[[[1]]]]}).encode(),
     "dim = [[[[1]]]] must be an integer"),
])
def test_damaged_config_json_is_one_line(tmp_path, data, message):
    got = config_error(tmp_path, data)
    assert got == message if message else got.startswith("not valid JSON (Exceeds the limit (4300 digits)")


def test_a_file_name_that_is_not_utf8_still_prints_as_one_line(tmp_path):
    path = tmp_path / "bad\udcff\nname.json"
    path.write_text("[]")
    with pytest.raises(CosmoesError) as err:
        load_model_config(path)
    assert str(err.value).endswith("bad\\xff\\nname.json: must hold a JSON object, not []")
    str(err.value).encode("utf-8")  # printable: no lone surrogates left


def test_train_config_refuses_numbers_no_run_can_use(tmp_path):
    from cosmoes.config import TrainConfig
    from cosmoes.errors import InvalidValue

    plain = tmp_path / "file.txt"
    plain.write_text("x")
    cases = [
        (dict(lr=float("nan")), "lr must be finite and > 0, got nan"), (dict(lr=0.0), "lr must be finite and > 0, got 0.0"),
        (dict(lr=float("inf")), "lr must be finite and > 0, got inf"),
        *[(dict([(f, 0)]), f"{f} must be at least 1, got 0")
          for f in ("batch_size", "grad_accum", "save_every", "steps", "eval_every", "log_every")],
        (dict(warmup_steps=-1), "warmup_steps must be at least 0, got -1"),
        (dict(seq_len=1), "seq_len must be at least 2, got 1"), (dict(steps=2.5), "steps must be an integer, got 2.5"),
        (dict(lb_coef=-0.1), "lb_coef must be finite and >= 0, got -0.1"),
        (dict(bles_coef=float("nan")), "bles_coef must be finite and >= 0, got nan"),
        (dict(bles_temperature=0.0), "bles_temperature must be finite and > 0, got 0.0"),
        (dict(out=str(plain)), f"out must be a directory, but {plain} is an existing file"),
        (dict(out=str(plain / "run")), f"out must be a directory, but {plain} is an existing file"),
    ]
    for changes, message in cases:
        with pytest.raises(InvalidValue) as err:
            TrainConfig(**changes)
        assert str(err.value) == message, changes
    assert TrainConfig(out=str(tmp_path / "new" / "run"), warmup_steps=0, seq_len=2).steps == 200


def test_a_config_that_is_not_a_regular_file_is_refused_without_reading_it(tmp_path):
    import os

    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)  # opening it would block until a writer came
    with pytest.raises(CosmoesError) as err:
        load_model_config(fifo)
    assert str(err.value) == f"{fifo}: not a regular file"
