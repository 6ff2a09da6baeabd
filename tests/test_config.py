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


@pytest.mark.parametrize("changes,match", [
    ({"top_k": 9}, "top_k"), ({"top_k": 0}, "top_k"), ({"n_heads": 3}, "divisible"),
    ({"n_kv_heads": 3}, "multiple"), ({"wd_rank": 0}, "wd_rank"), ({"ffn_dim": 0}, "ffn_dim"),
])
def test_invalid_configs_raise_one_line_errors(changes, match):
    with pytest.raises(CosmoesError, match=match) as err:
        get_preset("tiny-moe").replace(**changes)
    assert "\n" not in str(err.value)


def test_top_k_above_num_experts_is_rejected_on_construction():
    with pytest.raises(CosmoesError, match="top_k"):
        ModelConfig(num_experts=4, top_k=5)
    with pytest.raises(CosmoesError, match="wd_rank"):
        get_preset("tiny-dense").replace(wd_rank=8)  # WD needs experts


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
        with pytest.raises(CosmoesError, match="corrupt config"):
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
