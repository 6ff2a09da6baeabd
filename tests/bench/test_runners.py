"""benchmarks/runners.py: builds of the real runner interleaved on one bundle, medians per build and policy, and
each build's ratios to `all` taken round by round; a --runner that names no build is one line."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from runners import main  # noqa: E402

from cosmoes.runtime.native import build_runner  # noqa: E402


def test_two_builds_interleaved_give_a_row_each_and_ratios_per_round(micro_bundle_8da4w, tmp_path, capsys):
    exe = build_runner()
    main([str(micro_bundle_8da4w), "--runner", f"a={exe}", "--runner", f"b={exe}", "--policy", "all", "--policy",
          "swap", "--rounds", "2", "--repeats", "1", "--gen", "4", "--prompt-len", "8", "--out", str(tmp_path)])
    text = (tmp_path / "runners.md").read_text()
    runs = json.loads((tmp_path / "runners.json").read_text())["runs"]
    assert sorted(runs) == ["a all", "a swap", "b all", "b swap"] and all(len(r) == 2 for r in runs.values())
    # the same build and bundle: the same loads in every run; swap loads, all only once per expert
    assert len({s["expert_loads"] for s in runs["a swap"] + runs["b swap"]}) == 1
    assert runs["a swap"][0]["expert_loads"] > runs["a all"][0]["expert_loads"]
    for name in "ab":
        ratios = [s["decode_tok_s"] / a["decode_tok_s"] for s, a in zip(runs[f"{name} swap"], runs[f"{name} all"])]
        assert f"| {name} | swap | {sorted(ratios)[0] / 2 + sorted(ratios)[1] / 2:.3f} |" in text
    assert "round 2/2 b" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--runner", "a=NOTHING"], "error: --runner 'a=NOTHING': no runner at NOTHING"),
    (["--runner", "=x"], "error: --runner '=x': expected NAME=PATH"),
    (["--runner", "a=RUNNER", "--rounds", "0"], "error: --threads, --rounds, --repeats, --gen and --prompt-len must be"),
])
def test_bad_flags_are_one_line(micro_bundle_8da4w, tmp_path, args, message):
    nothing, runner = str(tmp_path / "nothing"), str(build_runner())
    args = [a.replace("NOTHING", nothing).replace("RUNNER", runner) for a in args]
    with pytest.raises(SystemExit) as exit_:
        main([str(micro_bundle_8da4w), *args, "--out", str(tmp_path / "out")])
    assert str(exit_.value).startswith(message.replace("NOTHING", nothing)) and "\n" not in str(exit_.value)
    assert not (tmp_path / "out").exists()


def test_a_bundle_that_is_not_there_is_one_line_naming_it(tmp_path):
    with pytest.raises(SystemExit, match=f"error: bundle not found: {tmp_path / 'gone'}"):
        main([str(tmp_path / "gone"), "--runner", f"a={build_runner()}", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
