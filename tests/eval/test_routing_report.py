"""cosmoes.eval.routing_report: routing reports on held-out documents, Figures 5–6 as PNGs, and `cosmoes routing`."""

import json

import pytest
import torch
from typer.testing import CliRunner

from cosmoes.eval.routing_report import (
    held_out_documents,
    plot_activation_map,
    plot_delta_uniform,
    pooled_stats,
    routing_report,
    split_config,
)
from cosmoes.checkpoint import save_checkpoint
from cosmoes.cli import app
from cosmoes.config import get_preset
from cosmoes.data import DataConfig, iter_documents, split_documents, tokenize_documents
from cosmoes.errors import CosmoesError
from cosmoes.model import Transformer, init_weights
from cosmoes.routing import routing_stats, selected_experts
from cosmoes.tokenizer import default_tokenizer
from cosmoes.train import TrainConfig

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_checkpoint(out, preset: str, seed: int = 0):
    model = init_weights(Transformer(get_preset(preset)), seed=seed)
    return save_checkpoint(model, out, tokenizer=default_tokenizer())


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """A run directory (OUT/checkpoint) holding a randomly initialised tiny MoE."""
    run = tmp_path_factory.mktemp("ckpts") / "moe-run"
    write_checkpoint(run / "checkpoint", "tiny-moe")
    return run


@pytest.fixture(scope="module")
def report(moe_run):
    return routing_report(moe_run, samples=6, max_tokens=40)


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000


def test_report_fields_and_ranges(report):
    E, K = report["num_experts"], report["top_k"]
    assert (report["model"], report["kind"], report["moe_layers"]) == ("tiny-moe", "moe", 4)
    assert report["samples"] == 6 and report["tokens"] == 6 * 40 and report["max_tokens"] == 40
    assert report["split"] == {"val_fraction": 0.05, "seed": 0}
    full_collapse_pct = 100 * 2 * (E - K) / E**2
    for key, bound in (("exrep_pct", 100.0), ("delta_uniform_pct", full_collapse_pct),
                       ("delta_uniform_seq_pct", full_collapse_pct)):
        per_layer = report[f"{key}_per_layer"]
        assert len(per_layer) == 4 and all(0.0 <= v <= bound + 1e-9 for v in per_layer)
        assert report[key] == pytest.approx(sum(per_layer) / 4)
    # a random router still switches experts between tokens
    assert report["exrep_pct"] > 0
    selected = report["selected"]
    assert len(selected) == 4 and all(len(layer) == 6 for layer in selected)
    assert all(s.shape == (40, K) and 0 <= int(s.min()) and int(s.max()) < E for layer in selected for s in layer)


def test_equal_length_samples_match_routing_stats(report):
    stacked = [torch.stack(layer) for layer in report["selected"]]
    stats = routing_stats(stacked, report["num_experts"])
    assert report["exrep_pct_per_layer"] == pytest.approx([100 * x for x in stats["exrep_per_layer"]])
    assert report["delta_uniform_pct_per_layer"] == pytest.approx(
        [100 * x for x in stats["delta_uniform_per_layer"]])


def test_selections_are_the_models_routing_on_held_out_text(moe_run, report):
    from cosmoes.checkpoint import load_model

    model = load_model(moe_run)
    doc = held_out_documents(DataConfig(), 6)[0]
    ids_T = torch.from_numpy(tokenize_documents([doc], default_tokenizer())[:40])
    logits = model(ids_T[None]).router_logits
    for layer, logits_BTE in enumerate(logits):
        assert torch.equal(selected_experts(logits_BTE, 2)[0], report["selected"][layer][0])


def test_samples_come_from_the_validation_split_only():
    cfg = DataConfig()
    train_docs, val_docs = split_documents(list(iter_documents(cfg)), cfg.val_fraction, cfg.seed)
    picked = held_out_documents(cfg, 20)
    assert len(picked) == 20 and set(picked) <= set(val_docs) and not set(picked) & set(train_docs)
    assert len(held_out_documents(cfg, 10_000)) == len(val_docs)


def test_split_follows_the_training_run(tmp_path, moe_run):
    ckpt = tmp_path / "ckpt"
    write_checkpoint(ckpt, "tiny-moe")
    cfg = TrainConfig(seed=3, data=DataConfig(val_fraction=0.1, doc_chars=500))
    (ckpt / "train_config.json").write_text(json.dumps(cfg.to_dict()))
    split = split_config(ckpt, ["some.txt"])
    assert (split.seed, split.val_fraction, split.doc_chars, split.sources) == (3, 0.1, 500, ["some.txt"])
    assert split_config(moe_run, None) == DataConfig()


def test_pooled_stats_weight_samples_by_length():
    # sample A (K=1): 0,0,1 -> one replacement over 2 transitions; sample B: 1,1 -> none over 1
    a, b = torch.tensor([[0], [0], [1]]), torch.tensor([[1], [1]])
    stats = pooled_stats([[a, b]], num_experts=2)
    assert stats["exrep"] == pytest.approx([1 / 3])
    # pooled slots 0,0,1,1,1: shares (0.4, 0.6) -> mean |p - 0.5| = 0.1
    assert stats["delta_uniform"] == pytest.approx([0.1])
    # per sample: A (2/3, 1/3) -> 1/6, B (0, 1) -> 1/2
    assert stats["delta_uniform_seq"] == pytest.approx([(1 / 6 + 1 / 2) / 2])


def test_dense_checkpoint_is_a_one_line_error(tmp_path):
    write_checkpoint(tmp_path / "dense", "tiny-dense")
    with pytest.raises(CosmoesError, match="dense model .*no routing to analyse"):
        routing_report(tmp_path / "dense")


def test_bad_arguments(moe_run):
    with pytest.raises(CosmoesError, match="samples must be positive"):
        routing_report(moe_run, samples=0)
    with pytest.raises(CosmoesError, match="max_tokens must be at least 2"):
        routing_report(moe_run, max_tokens=1)
    with pytest.raises(CosmoesError, match="checkpoint not found"):
        routing_report("tiny-moe")  # a preset name is not a trained model


def test_plots_are_written(tmp_path, report):
    fig5 = plot_activation_map(report["selected"][1][0][:35], 8, tmp_path / "a" / "fig5.png", title="tiny-moe")
    fig6 = plot_delta_uniform({"a": report["delta_uniform_pct_per_layer"], "b": [1.0, 2.0, 3.0]},
                              tmp_path / "fig6.png")
    assert_png(fig5)
    assert_png(fig6)
    with pytest.raises(CosmoesError):
        plot_activation_map(torch.zeros(2, 3, 2, dtype=torch.long), 8, tmp_path / "bad.png")


def test_cli_routing_writes_table_json_and_figures(tmp_path, moe_run):
    out = tmp_path / "routing"
    result = runner.invoke(app, ["routing", str(moe_run), str(moe_run / "checkpoint"), "--samples", "3",
                                 "--max-tokens", "32", "--layer", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "ExRep" in result.stdout and "moe-run " in result.stdout and "moe-run-2" in result.stdout
    saved = json.loads((out / "routing.json").read_text())
    assert set(saved) == {"moe-run", "moe-run-2"}
    assert saved["moe-run"]["exrep_pct"] == saved["moe-run-2"]["exrep_pct"]  # same checkpoint, same sample
    assert "selected" not in saved["moe-run"] and saved["moe-run"]["samples"] == 3
    for name in ("fig5_moe-run.png", "fig5_moe-run-2.png", "fig6.png"):
        assert_png(out / name)


def test_cli_routing_errors(tmp_path, moe_run):
    write_checkpoint(tmp_path / "dense", "tiny-dense")
    result = runner.invoke(app, ["routing", str(tmp_path / "dense"), "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, CosmoesError) and "no routing" in str(result.exception)
    result = runner.invoke(app, ["routing", str(moe_run), "--samples", "2", "--max-tokens", "8", "--layer", "4",
                                 "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, CosmoesError) and "out of range" in str(result.exception)
