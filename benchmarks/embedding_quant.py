"""Which embedding quantisation the phone recipes ship (issue #20): the effect of that one option, on real text.

Three kinds of rows, each against the same model with an fp32 embedding, over the held-out prompts `cosmoes
verify` uses (4 documents of the embedded corpus' validation split):
- eager: the model with only its token embedding quantised, by the torchao config the export applies
  (cosmoes.export.transforms), against the unquantised model: top-1 agreement at every position, greedy agreement
  over 32 tokens. Cheap enough for the wearable presets, which take 15+ minutes per export.
- bundle: `cosmoes verify B --against B_none` for bundles exported with each embedding mode (--bundles).
- lm-eval: the paper's tasks from `cosmoes eval B --limit 200 --json` reports (--evals), as differences from none.

    python benchmarks/embedding_quant.py --sources runs/tiny/checkpoint wearable-moe \\
        --bundles none=b-none int8=b-int8 int4=b-int4 --evals none=eval-none.json int8=eval-int8.json \\
        --out benchmarks/results/embedding_quant.md
Target: the mode shipped keeps greedy agreement 100 % over 32 tokens and top-1 >= 99 %.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("int8", "int4")


class EagerLM:
    """An eager model with verify's runtime interface (logits of one sequence, greedy continuation)."""

    def __init__(self, model):
        self.model, self.config = model.eval(), model.config

    @torch.no_grad()
    def logits(self, ids_T):
        return self.model(ids_T[None]).logits[0].float()

    def logits_TV(self, ids_T):
        return self.logits(ids_T)

    def generate(self, prompt_T, n):
        from cosmoes.eval.verify import eager_greedy

        return eager_greedy(self.model, prompt_T, n)

    greedy = generate


def eager_rows(source: str, modes: list[str]) -> list[dict]:
    import copy

    from torchao.quantization import quantize_

    from cosmoes.eval.verify import _compare, _encode, default_prompts
    from cosmoes.export.bundle import _load_source
    from cosmoes.export.transforms import _embedding_config
    from cosmoes.tokenizer import default_tokenizer

    model, tokenizer = _load_source(source, seed=0)
    tokenizer = tokenizer or default_tokenizer()
    reference = EagerLM(model)
    prompts = [_encode(tokenizer, t, model.config.max_seq_len) for t in default_prompts()]
    rows = []
    for mode in modes:
        quantised = copy.deepcopy(model)
        quantize_(quantised, _embedding_config(mode, model.config.dim, 32),
                  filter_fn=lambda m, fqn: isinstance(m, torch.nn.Embedding))
        details = [_compare(EagerLM(quantised), reference, ids_T, 32) for ids_T in prompts]
        label = f"{model.config.name} ({'checkpoint' if Path(source).exists() else 'random init'})"
        rows.append(summary("eager", label, mode, details))
        print(rows[-1], flush=True)
    return rows


def summary(kind: str, model: str, mode: str, details: list[dict]) -> dict:
    positions = sum(d["tokens"] for d in details)
    return {"kind": kind, "model": model, "mode": mode, "positions": positions,
            "top1": sum(d["top1_agree"] for d in details) / positions,
            "greedy": sum(d["greedy_agree"] for d in details) / (32 * len(details)),
            "max_logit_diff": max(d["max_logit_diff"] for d in details)}


def bundle_rows(bundles: dict[str, str]) -> list[dict]:
    from cosmoes.eval.verify import verify

    rows = []
    for mode, path in bundles.items():
        if mode == "none":
            continue
        r = verify(path, bundles["none"])
        from cosmoes.export.manifest import load_manifest

        name = load_manifest(path).config.get("name")
        rows.append(summary("bundle", f"{name} ({Path(path).name})", mode, r["per_prompt"]))
        print(rows[-1], flush=True)
    return rows


def eval_table(evals: dict[str, str]) -> list[str]:
    reports = {mode: json.loads(Path(p).read_text()) for mode, p in evals.items()}
    tasks = [t["label"] for t in reports["none"]["tasks"] if t["status"] == "ok"]

    def score(report, label):
        return next(t["score"] for t in report["tasks"] if t["label"] == label) * 100

    lines = ["| embedding | " + " | ".join(tasks) + " | avg |", "|---|" + "---:|" * (len(tasks) + 1)]
    for mode, report in reports.items():
        cells = [score(report, t) for t in tasks]
        base = [score(reports["none"], t) for t in tasks]
        if mode == "none":
            shown, fmt, label = cells, "{:.1f}", mode
        else:
            shown, fmt, label = [c - b for c, b in zip(cells, base)], "{:+.1f}", f"{mode} (Δ)"
        avg = fmt.format(sum(shown) / len(shown))
        lines.append(f"| {label} | " + " | ".join(fmt.format(x) for x in shown) + f" | {avg} |")
    limit = reports["none"].get("limit")
    lines.append(f"\n(lm-eval, zero-shot, --limit {limit} per (sub)task, bundles scored through ExecuTorch)")
    return lines


def render(rows: list[dict], evals: dict[str, str]) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    out = [f"# Embedding quantisation: effect alone (issue #20)", "",
           f"`python {' '.join(sys.argv)}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
           f"{cpu}, {platform.machine()}.", "",
           "| rows | model | embedding | positions | top-1 vs fp32 embedding | greedy (32 tokens) | max abs logit diff |",
           "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['kind']} | {r['model']} | {r['mode']} | {r['positions']} | {r['top1']:.2%} | "
                   f"{r['greedy']:.2%} | {r['max_logit_diff']:.3g} |")
    if evals:
        out += [""] + eval_table(evals)
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", nargs="*", default=[], help="checkpoints or presets for the eager rows")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--bundles", nargs="*", default=[], help="MODE=DIR, one of them none=DIR (the reference)")
    ap.add_argument("--evals", nargs="*", default=[], help="MODE=JSON from cosmoes eval --json, one of them none")
    ap.add_argument("--out", type=Path, help="write the markdown table here")
    args = ap.parse_args(argv)
    bundles = dict(item.split("=", 1) for item in args.bundles)
    evals = dict(item.split("=", 1) for item in args.evals)
    rows = [r for source in args.sources for r in eager_rows(source, args.modes)]
    if bundles:
        rows += bundle_rows(bundles)
    text = render(rows, evals)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
