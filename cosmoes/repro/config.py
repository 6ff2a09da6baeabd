"""`cosmoes reproduce`'s configuration and model line-up, torch-free so the CLI reads its defaults cheaply."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

# BlES weight and softmax temperature of the "+ BlES" model, chosen by a sweep on tiny-moe
# (docs/results/bles-coefficient.md): the best ExRep cut that lasts, at the smallest loss and balance cost
DEFAULT_BLES_COEF = 5.0
DEFAULT_BLES_TEMPERATURE = 10.0
ALL_MODELS = ("dense-fa", "moe", "moe-bles", "wd-moe", "dense-pa")
LABELS = {"dense-fa": "Dense (FA)", "moe": "MoE", "moe-bles": "+ BlES", "wd-moe": "+ WD", "dense-pa": "Dense (PA)"}


@dataclass
class ReproduceConfig:
    """What `cosmoes reproduce` trains and where it writes; every model shares these hyper-parameters."""

    out: str = "runs/reproduce"  # one training run per model: OUT/<model>/
    results: str = "docs/results"  # Markdown report, results.json, plots
    family: str = "tiny"  # presets <family>-dense (FA), <family>-moe, <family>-wd; PA dense from align()
    models: tuple[str, ...] = ALL_MODELS
    steps: int = 2000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int | None = None  # None = 5% of steps
    lb_coef: float = 0.01
    bles_coef: float = DEFAULT_BLES_COEF
    bles_temperature: float = DEFAULT_BLES_TEMPERATURE
    seed: int = 0
    data: list[str] = field(default_factory=list)  # empty = the embedded corpus
    eval_batch_size: int = 32
    eval_blocks: int | None = None  # validation blocks scored per model; None = all of them
    routing_samples: int = 100
    routing_tokens: int = 256
    eval_limit: int | None = 100  # lm-eval documents per (sub)task of each Table 2 task; 0 or None: no lm-eval
    eval_tasks: tuple[str, ...] = ()  # lm-eval tasks (names as `cosmoes eval --tasks`); empty: all of Table 2's
    threads: int | None = None  # torch intra-op threads; None = torch's default (1 is faster on a busy machine)
    offload: bool = True  # export the sparse models (8da4w) and time decoding under swap / lru:2k / all (native)
    progress: bool = True

    def command(self) -> str:
        """The `cosmoes reproduce` command line that reproduces this configuration."""
        args = ["cosmoes", "reproduce", "--steps", str(self.steps), "--out", self.out, "--results", self.results,
                "--family", self.family, "--batch-size", str(self.batch_size), "--seq-len", str(self.seq_len),
                "--bles-coef", repr(self.bles_coef), "--bles-temperature", repr(self.bles_temperature)]
        if tuple(self.models) != ALL_MODELS:
            args += ["--models", ",".join(self.models)]
        for source in self.data:
            args += ["--data", source]
        if self.routing_samples != 100:
            args += ["--samples", str(self.routing_samples)]
        defaults = ReproduceConfig()
        extras = {"lr": "--lr", "seed": "--seed", "lb_coef": "--lb-coef", "warmup_steps": "--warmup-steps",
                  "eval_blocks": "--eval-blocks", "routing_tokens": "--max-tokens", "threads": "--threads"}
        for name, flag in extras.items():
            if getattr(self, name) != getattr(defaults, name):
                args += [flag, str(getattr(self, name))]
        if (self.eval_limit or 0) != defaults.eval_limit:
            args += ["--eval-limit", str(self.eval_limit or 0)]
        if self.eval_tasks:
            args += ["--eval-tasks", ",".join(self.eval_tasks)]
        if not self.offload:
            args.append("--no-offload")
        return shlex.join(args)
