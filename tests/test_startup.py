"""Start-up: `import cosmoes`, `cosmoes --help`, `info` and `align` load neither torch nor transformers; every CLI
default is the library dataclass's; third-party native log lines stay off stderr unless `--verbose` (issue #13)."""

import dataclasses
import os
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from cosmoes.bench.harness import BenchConfig
from cosmoes.cli import app
from cosmoes.config import TrainConfig
from cosmoes.eval.harness import EvalConfig
from cosmoes.export.bundle import ExportConfig
from cosmoes.quiet import CLI_LOGGERS, VERBOSE_ENV, quiet_logging
from cosmoes.repro.config import ReproduceConfig
from cosmoes.repro.demo import DemoConfig

HEAVY = ("torch", "transformers")


def heavy_modules_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; which of torch/transformers it left in sys.modules."""
    probe = f"{code}\nimport sys\nprint('HEAVY', *[m for m in {HEAVY!r} if m in sys.modules])\n"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("HEAVY"), proc.stdout
    return last.split()[1:]


@pytest.mark.parametrize("module", ["cosmoes", "cosmoes.config", "cosmoes.cli", "cosmoes.repro.config"])
def test_importing_the_config_layer_loads_no_torch(module):
    assert heavy_modules_after(f"import {module}") == []


@pytest.mark.parametrize("args", [["--help"], ["info", "tiny-moe"], ["info", "wearable-moe", "--json"],
                                  ["align", "tiny-moe"], ["train", "--help"], ["reproduce", "--help"]])
def test_cli_commands_that_only_read_configs_load_no_torch(args):
    code = f"from cosmoes.cli import app\ntry:\n    app({args!r})\nexcept SystemExit as exc:\n    assert not exc.code"
    assert heavy_modules_after(code) == []


def test_importing_cosmoes_hf_registers_the_model_type():
    code = ("import cosmoes.hf\nfrom transformers import AutoConfig\n"
            "assert type(AutoConfig.for_model('cosmoe')).__name__ == 'CosmoeConfig'")
    assert heavy_modules_after(code) == list(HEAVY)


def test_config_classes_are_the_same_objects_where_they_were():
    from cosmoes import config, data, train
    from cosmoes.repro import reproduce

    assert train.TrainConfig is config.TrainConfig and data.DataConfig is config.DataConfig
    assert reproduce.ReproduceConfig is ReproduceConfig


def _field_defaults(cls) -> dict:
    return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
            for f in dataclasses.fields(cls)}


# command -> (its dataclass, option name -> field name where they differ)
BACKED = {
    "train": (TrainConfig, {}),
    "demo": (DemoConfig, {}),
    "export": (ExportConfig, {}),
    "bench": (BenchConfig, {"policy": "policies", "budget_mb": "budgets_mb"}),
    "eval": (EvalConfig, {}),
    "reproduce": (ReproduceConfig, {"samples": "routing_samples", "max_tokens": "routing_tokens"}),
}


@pytest.mark.parametrize("command", sorted(BACKED))
def test_every_cli_default_is_the_dataclass_default(command):
    cls, renamed = BACKED[command]
    defaults = _field_defaults(cls)
    params = typer.main.get_command(app).commands[command].params
    compared = 0
    for param in params:
        name = renamed.get(param.name, param.name)
        if param.param_type_name != "option" or name not in defaults or param.default is None:
            continue  # None: the command leaves the field to the dataclass (or the field has no option)
        want = defaults[name]
        got = param.default
        if isinstance(want, (list, tuple)):
            got, want = list(got), list(want)
        elif want is not None and not isinstance(want, bool):
            got = type(want)(got)
        if name == "eval_limit":
            want = want or 0  # the option spells "no lm-eval" as 0
        assert got == want, f"{command} --{param.name}"
        compared += 1
    assert compared >= 1


def test_a_global_verbose_option_is_accepted():
    runner = CliRunner()
    for flag in ("--verbose", "-v"):
        # env: the runner restores COSMOES_VERBOSE, which --verbose sets for this process and its children
        result = runner.invoke(app, [flag, "info", "tiny-moe"], env={VERBOSE_ENV: ""})
        assert result.exit_code == 0, result.output
        assert "tiny-moe (moe)" in result.stdout
    quiet_logging(CLI_LOGGERS)


NATIVE = ("from cosmoes.runtime.python import set_threads\n"
          "set_threads(1)\nset_threads(2)\nset_threads(1)\n")


def _native_stderr(verbose: bool) -> str:
    env = dict(os.environ, **{VERBOSE_ENV: "1" if verbose else ""})
    proc = subprocess.run([sys.executable, "-c", NATIVE], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_executorch_native_log_lines_are_hidden_unless_verbose():
    quiet = _native_stderr(verbose=False)
    assert "cpp:" not in quiet and "Failed to load" not in quiet, quiet
    loud = _native_stderr(verbose=True)
    if "cpp:" not in loud:
        pytest.skip("this ExecuTorch build logs nothing when its thread pool starts")
    assert "threadpool" in loud or "cpuinfo" in loud
