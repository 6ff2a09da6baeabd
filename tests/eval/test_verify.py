"""cosmoes.eval.verify: bundles against the eager fp32 model of their checkpoint on held-out text — exact for fp32,
a measured gap for 8da4w, and (slow) top-1 agreement >= 90% for an 8da4w bundle of a briefly trained model."""

import json
import time

import pytest
from typer.testing import CliRunner

from cosmoes.cli import app
from cosmoes.errors import CosmoesError
from cosmoes.export.manifest import load_manifest
from cosmoes.eval.verify import DEFAULT_PROMPTS, default_prompts, verify


@pytest.fixture(scope="module")
def fp32_report(micro_bundle_fp32, micro_checkpoint):
    return verify(micro_bundle_fp32, micro_checkpoint)


def test_default_prompts_are_held_out_corpus_passages():
    from cosmoes.data import DataConfig, iter_documents, split_documents

    prompts = default_prompts()
    train_docs, _ = split_documents(list(iter_documents(DataConfig())), 0.05, 0)
    assert len(prompts) == DEFAULT_PROMPTS and len(set(prompts)) == DEFAULT_PROMPTS
    assert not set(prompts) & set(train_docs)


def test_fp32_bundle_agrees_with_eager_on_real_text(fp32_report, micro_bundle_fp32):
    r = fp32_report
    manifest = load_manifest(micro_bundle_fp32, verify=False)
    assert r["quant"] == "none" and r["prompts"] == DEFAULT_PROMPTS
    # held-out passages are long: each fills the context, so every prompt runs through chunked prefill
    assert all(d["tokens"] == manifest.max_seq_len > manifest.max_chunk for d in r["per_prompt"])
    assert r["positions"] == sum(d["tokens"] for d in r["per_prompt"])
    assert r["max_logit_diff"] < 1e-4
    assert r["top1_agreement"] == 1.0 and r["greedy_agreement"] == 1.0
    assert all(d["first_divergence"] is None for d in r["per_prompt"])


def test_8da4w_gap_is_measured_against_fp32(micro_bundle_8da4w, micro_checkpoint, fp32_report):
    prompts = ["It is a truth universally acknowledged, that a single man in possession of a good fortune",
               "In the beginning God created the heaven and the earth."]
    r = verify(micro_bundle_8da4w, micro_checkpoint, prompts=prompts, n_greedy=8)
    assert r["quant"] == "8da4w" and r["prompts"] == 2 and r["n_greedy"] == 8
    # the reference is the trained fp32 model, not an eager quantised copy: int4 weights show up as a real gap
    assert r["max_logit_diff"] > 100 * fp32_report["max_logit_diff"]
    assert r["max_logit_diff"] < r["logit_scale"]
    assert 0.0 <= r["top1_agreement"] <= 1.0 and 0.0 <= r["greedy_agreement"] <= 1.0


def test_wrong_checkpoint_or_bad_arguments(micro_bundle_fp32, micro_checkpoint, micro_wd_checkpoint, micro_config):
    with pytest.raises(CosmoesError, match="not exported from"):
        verify(micro_bundle_fp32, micro_wd_checkpoint, prompts=["Some text here."])
    with pytest.raises(CosmoesError, match="n_greedy"):
        verify(micro_bundle_fp32, micro_checkpoint, prompts=["Some text here."], n_greedy=micro_config.max_seq_len)
    with pytest.raises(CosmoesError, match="too short"):
        verify(micro_bundle_fp32, micro_checkpoint, prompts=[""])


def test_cli_verify_json(micro_bundle_fp32, micro_checkpoint):
    result = CliRunner().invoke(app, ["verify", str(micro_bundle_fp32), "--against", str(micro_checkpoint), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["top1_agreement"] == 1.0 and report["max_logit_diff"] < 1e-4
    plain = CliRunner().invoke(app, ["verify", str(micro_bundle_fp32), "--against", str(micro_checkpoint)])
    assert plain.exit_code == 0 and "top-1 agreement   100.00%" in plain.stdout


def test_a_bundle_can_be_the_reference(micro_bundle_8da4w, micro_bundle_fp32):
    # the same bundle as its own reference agrees exactly: what differs between two bundles is their export options
    same = verify(micro_bundle_8da4w, micro_bundle_8da4w)
    assert same["reference"] == "bundle (8da4w, embedding int8)"
    assert same["top1_agreement"] == 1.0 and same["greedy_agreement"] == 1.0 and same["max_logit_diff"] == 0.0
    against_fp32 = verify(micro_bundle_8da4w, micro_bundle_fp32)
    assert against_fp32["reference"] == "bundle (none, embedding none)" and against_fp32["max_logit_diff"] > 0
    plain = CliRunner().invoke(app, ["verify", str(micro_bundle_8da4w), "--against", str(micro_bundle_fp32)])
    assert plain.exit_code == 0 and "vs bundle (none, embedding none)" in plain.stdout


@pytest.fixture(scope="module")
def trained_micro(tmp_path_factory, micro_config):
    """The micro MoE trained briefly on the embedded corpus: enough for confident next-token predictions."""
    from cosmoes.train import TrainConfig, train

    out = tmp_path_factory.mktemp("trained")
    (out / "micro.json").write_text(json.dumps(micro_config.to_dict()))
    t0 = time.perf_counter()
    summary = train(TrainConfig(preset=str(out / "micro.json"), out=str(out / "run"), steps=150, batch_size=8,
                                seq_len=64, lr=3e-3, warmup_steps=15, eval_every=150, log_every=50, save_every=150,
                                progress=False))
    print(f"trained micro MoE in {time.perf_counter() - t0:.1f} s, val loss {summary['val_loss']:.3f}")
    return out / "run" / "checkpoint"


@pytest.mark.slow
def test_8da4w_bundle_of_trained_model_keeps_top1_agreement(trained_micro, tmp_path):
    from cosmoes.export.bundle import ExportConfig, export_bundle

    t0 = time.perf_counter()
    bundle = export_bundle(trained_micro, tmp_path / "b", ExportConfig(target="host", quant="8da4w"))
    t1 = time.perf_counter()
    r = verify(tmp_path / "b", trained_micro)
    print(f"8da4w export {t1 - t0:.1f} s, verify {time.perf_counter() - t1:.1f} s: top-1 {r['top1_agreement']:.3f}, "
          f"greedy {r['greedy_agreement']:.3f}, max |dlogit| {r['max_logit_diff']:.3g} (scale {r['logit_scale']:.3g})")
    assert bundle is not None and r["quant"] == "8da4w"
    assert r["top1_agreement"] >= 0.9
