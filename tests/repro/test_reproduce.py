"""cosmoes.repro.reproduce: a micro reproduction (3 steps, 2 models) writes the table and plots, and resumes by skipping."""

import dataclasses
import json
import math
import shlex
from pathlib import Path

import pytest

from cosmoes.config import align, get_preset, load_model_config
from cosmoes.errors import CosmoesError
from cosmoes.eval.harness import BOOLQ_NO_TITLE
from cosmoes.repro.reproduce import (LABELS, ReproduceConfig, _run_state, model_specs, run_reproduction, train_config,
                                     validation_title)

REPO = Path(__file__).resolve().parents[2]
PERSUASION = str(REPO / "cosmoes/corpus/austen-persuasion.txt.gz")


def micro_cfg(tmp: Path, **kw) -> ReproduceConfig:
    base = dict(out=str(tmp / "runs"), results=str(tmp / "results"), steps=3, batch_size=2, seq_len=32,
                models=("moe", "dense-pa"), data=[PERSUASION], eval_blocks=4, routing_samples=3, routing_tokens=32,
                eval_limit=2, eval_tasks=("arc_easy", "boolq"), progress=False, offload=False)
    base.update(kw)
    return ReproduceConfig(**base)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    cfg = micro_cfg(tmp_path_factory.mktemp("reproduce"))
    log: list[str] = []
    return cfg, run_reproduction(cfg, log=log.append), log


def test_micro_run_writes_the_table(micro):
    cfg, results, log = micro
    report = (Path(cfg.results) / "reproduction.md").read_text()
    results_rows, accuracy_rows = _tables(report)
    assert [row.split(" | ")[0] for row in results_rows] == ["| MoE", "| Dense (PA)"]
    assert [row.split(" | ")[0] for row in accuracy_rows] == ["| MoE", "| Dense (PA)"]
    assert f"`{results['command']}`" in report and f"`{results['commit']}`" in report
    assert results["commit"] != "unknown"
    moe, pa = results["models"]["moe"], results["models"]["dense-pa"]
    for summary in (moe, pa):
        assert summary["steps"] == 3 and summary["eval_ppl"] == pytest.approx(math.exp(summary["eval_loss"]))
        assert summary["s_per_step"] > 0
    # the PA dense model has the MoE's total parameters as a dense model
    assert pa["kind"] == "dense" and pa["params_total"] == pytest.approx(moe["params_total"], rel=0.01)
    assert set(results["routing"]) == {"moe"} and 0 < results["routing"]["moe"]["exrep_pct"] <= 100
    assert results["val_blocks"] == 4
    saved = json.loads((Path(cfg.results) / "results.json").read_text())
    assert saved["models"]["moe"]["eval_loss"] == moe["eval_loss"]
    for name in ("loss_curves.png", "fig5_moe.png", "fig6.png"):
        assert (Path(cfg.results) / name).read_bytes()[:4] == b"\x89PNG"
    assert any("[1/2] moe: training" in line for line in log)


def _tables(report: str) -> list[list[str]]:
    """The body rows of each Markdown table in the report."""
    tables, rows = [], []
    for line in report.splitlines() + [""]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            tables.append(rows[2:])
            rows = []
    return tables


def test_micro_run_scores_table_2_tasks_and_says_on_which_documents(micro):
    cfg, results, log = micro
    report = (Path(cfg.results) / "reproduction.md").read_text()
    assert "| Model | Arc-E | BoolQ | Avg |" in report and "first 2 documents of each (sub)task" in report
    for key in ("moe", "dense-pa"):
        lm_eval = results["lm_eval"][key]
        assert lm_eval["limit"] == 2 and [t["name"] for t in lm_eval["tasks"]] == ["arc_easy", "boolq"]
        assert all(t["status"] == "ok" and t["split"] == "validation" and t["n_samples"] == 2 for t in lm_eval["tasks"])
        row = next(line for line in _tables(report)[1] if line.startswith(f"| {LABELS[key]} |"))
        scores = [100 * t["score"] for t in lm_eval["tasks"]] + [100 * lm_eval["average"]]
        assert [float(c) for c in row.strip("| ").split(" | ")[1:]] == pytest.approx(scores, abs=0.006)
        saved = json.loads((Path(cfg.out) / key / "lm-eval.json").read_text())
        assert saved["average"] == lm_eval["average"]
    # per task: the split, documents scored of those in it, and where it differs from stock lm-eval
    assert ("- Arc-E: validation split, 2 of 570 documents; validation split: stock lm-eval (and the paper's Table 2) "
            "scores test" in report)
    assert f"- BoolQ: validation split, 2 of 3,270 documents; {BOOLQ_NO_TITLE}" in report
    assert any("lm-eval moe: Table 2 tasks, first 2 documents" in line for line in log)


def test_loss_curves_name_their_validation_set(micro):
    cfg, results, _ = micro
    # periodic validation during training: up to 8 batches of 2 blocks, from a split of more than 16 blocks
    assert results["curve_val_blocks"] == 16
    assert validation_title(cfg, results) == ("validation loss\n(held-out documents of austen-persuasion.txt.gz, "
                                              "16 blocks)")


def test_second_run_skips_trained_models(micro):
    cfg, results, _ = micro
    metrics = Path(cfg.out) / "moe" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    log: list[str] = []
    again = run_reproduction(cfg, log=log.append)
    assert sum("already trained" in line for line in log) == 2
    assert sum("lm-eval" in line and "reusing" in line for line in log) == 2  # unchanged checkpoints: no re-scoring
    assert again["lm_eval"] == results["lm_eval"]
    assert metrics.stat().st_mtime_ns == before
    assert again["models"]["moe"]["eval_loss"] == results["models"]["moe"]["eval_loss"]


def test_changed_settings_retrain(micro):
    cfg, _, _ = micro
    preset, bles = model_specs(cfg)["moe"]
    assert _run_state(train_config(cfg, "moe", preset, bles)) == "done"
    assert _run_state(train_config(dataclasses.replace(cfg, steps=4), "moe", preset, bles)) == "fresh"
    assert _run_state(train_config(cfg, "moe", preset, 0.5)) == "fresh"


def test_model_specs(tmp_path):
    specs = model_specs(ReproduceConfig(out=str(tmp_path), bles_coef=2.0))
    assert list(specs) == ["dense-fa", "moe", "moe-bles", "wd-moe", "dense-pa"]
    assert specs["moe-bles"] == ("tiny-moe", 2.0) and specs["moe"] == ("tiny-moe", 0.0)
    pa = load_model_config(specs["dense-pa"][0])
    assert pa == align(get_preset("tiny-moe")).param_aligned
    with pytest.raises(CosmoesError, match="unknown model"):
        model_specs(ReproduceConfig(out=str(tmp_path), models=("moe", "gpt")))
    with pytest.raises(CosmoesError, match="unknown preset"):
        model_specs(ReproduceConfig(out=str(tmp_path), family="huge"))


def test_command_names_every_non_default_setting(tmp_path):
    cfg = micro_cfg(tmp_path, lr=1e-3, threads=1)
    args = shlex.split(cfg.command())
    assert args[:2] == ["cosmoes", "reproduce"]
    for flag, value in (("--steps", "3"), ("--models", "moe,dense-pa"), ("--data", PERSUASION), ("--lr", "0.001"),
                        ("--eval-blocks", "4"), ("--samples", "3"), ("--max-tokens", "32"), ("--threads", "1"),
                        ("--eval-limit", "2"), ("--eval-tasks", "arc_easy,boolq"),
                        ("--bles-coef", repr(cfg.bles_coef)), ("--bles-temperature", repr(cfg.bles_temperature))):
        assert args[args.index(flag) + 1] == value
    defaults = shlex.split(ReproduceConfig().command())
    assert "--eval-limit" not in defaults and "--eval-tasks" not in defaults  # 100 documents of every Table 2 task
    for skip in (0, None):
        no_eval = shlex.split(ReproduceConfig(eval_limit=skip).command())
        assert no_eval[no_eval.index("--eval-limit") + 1] == "0"
    with pytest.raises(CosmoesError, match="threads must be positive"):
        run_reproduction(micro_cfg(tmp_path, threads=0))


def test_recorded_command_reruns_through_the_cli(micro):
    from typer.testing import CliRunner

    from cosmoes.cli import app

    cfg, results, _ = micro
    # the recorded command names the same configuration: every model is found trained and only re-evaluated
    result = CliRunner().invoke(app, shlex.split(results["command"])[1:])
    assert result.exit_code == 0, result.output
    assert result.output.count("already trained") == 2
    assert result.output.count("reusing") == 2  # the recorded --eval-limit/--eval-tasks name the same lm-eval runs
    assert "| MoE | tiny-moe |" in result.stdout and "| Dense (PA) |" in result.stdout


def test_offload_speeds_and_table_from_a_bundle(micro_bundle_8da4w, tmp_path):
    from cosmoes.repro.reproduce import offload_speeds, offload_table

    speeds = offload_speeds({"moe": micro_bundle_8da4w}, tmp_path, log=lambda _: None, prompt_len=16, gen=12,
                            prompts=2)
    rows = speeds["moe"]
    assert list(rows) == ["swap", "lru:4", "all"]  # lru:2k with k = 2
    assert rows["all"]["loads_per_token"] == 0  # every expert the prompt touched stays resident
    assert rows["swap"]["loads_per_token"] > 0 and all(r["decode_tok_s"] > 0 for r in rows.values())
    assert rows["swap"]["exrep"] == rows["all"]["exrep"]  # the policy never changes the routing
    per_prompt = rows["swap"]["loads_per_token_per_prompt"]
    assert len(per_prompt) == 2 and rows["swap"]["loads_per_token"] == pytest.approx(sum(per_prompt) / 2)
    table = offload_table(speeds)
    assert table.splitlines()[0].startswith("| Model | swap tok/s | lru:4 tok/s | all tok/s | loads/token (swap) | "
                                            "range over prompts |")
    assert (f"| {rows['swap']['loads_per_token']:.2f} | {min(per_prompt):.2f}–{max(per_prompt):.2f} |"
            in table.splitlines()[2])
    prompts = [json.loads((tmp_path / "moe" / f"prompt-{i}" / "bench.json").read_text())["config"]["prompt_doc"]
               for i in range(2)]
    assert prompts == [0, 1]


def test_a_bundle_is_reexported_after_its_checkpoint_is_retrained_or_its_format_changes(tmp_path):
    import os

    from cosmoes.export.manifest import FORMAT_VERSION
    from cosmoes.repro.reproduce import bundle_is_current

    ckpt, bundle = tmp_path / "run" / "checkpoint", tmp_path / "bundle"
    ckpt.mkdir(parents=True)
    bundle.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"old weights")
    assert not bundle_is_current(bundle, ckpt)  # never exported
    record = {"format_version": FORMAT_VERSION, "source": {"checkpoint": str(ckpt.resolve())}}
    (bundle / "manifest.json").write_text(json.dumps({**record, "format_version": FORMAT_VERSION - 1}))
    os.utime(ckpt / "model.safetensors", (1_000, 1_000))
    assert not bundle_is_current(bundle, ckpt)  # exported by an older cosmoes: its runtime would refuse it
    (bundle / "manifest.json").write_text(json.dumps(record))
    assert bundle_is_current(bundle, ckpt)
    os.utime(ckpt / "model.safetensors", None)  # retrained in place, after the export
    os.utime(bundle / "manifest.json", (2_000, 2_000))
    assert not bundle_is_current(bundle, ckpt)
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"weights")
    os.utime(other / "model.safetensors", (1_000, 1_000))
    assert not bundle_is_current(bundle, other)  # newer than those weights, but exported from another checkpoint
