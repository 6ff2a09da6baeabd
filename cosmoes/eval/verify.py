"""Check an exported bundle against the trained model it came from: logit gap, top-1 and greedy agreement (§3.4.2).

The reference is the checkpoint's own model, eager and fp32 (never quantised): the question is how much the
shipped bundle (lowering, kernels, quantisation) departs from the model that was trained. The reference can also
be another bundle of the same model, to measure what one export option alone changes (e.g. an int8 embedding
against the same bundle with an fp32 one). Default prompts are held-out passages of the embedded corpus (its
validation split, ``cosmoes.data``), i.e. real text.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cosmoes.errors import CosmoesError

DEFAULT_PROMPTS = 4  # held-out passages used when no prompts are given
GREEDY_PROMPT_TOKENS = 32  # greedy decoding starts from at most this many tokens of each prompt
_SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "kv_heads", "ffn_dim", "num_experts", "top_k",
                 "norm_topk_prob", "router_temperature", "wd_rank", "tie_embeddings")


def default_prompts(n: int = DEFAULT_PROMPTS) -> list[str]:
    """``n`` held-out documents of the embedded corpus (``cosmoes.data.held_out_documents``): real, untrained text."""
    from cosmoes.data import DataConfig, held_out_documents

    return held_out_documents(DataConfig(), n)


def verify(bundle_dir: str | Path, checkpoint: str | Path, prompts: list[str] | None = None, n_greedy: int = 32,
           policy: str = "swap") -> dict:
    """Compare a bundle with the eager fp32 model of ``checkpoint`` on text prompts.

    Returns ``max_logit_diff`` (max |Δ| over all positions), ``top1_agreement`` (share of positions whose argmax
    agrees), ``greedy_agreement`` (share of the ``n_greedy`` greedy tokens from each prompt's start that are
    identical), their pooled counts and ``per_prompt`` details.
    """
    from cosmoes.checkpoint import load_tokenizer_of
    from cosmoes.runtime.python import BundleRuntime

    runtime = BundleRuntime(bundle_dir, policy=policy)
    model = _reference(checkpoint, policy)
    _check_same_model(runtime.config, model.config, bundle_dir, checkpoint)
    max_len = runtime.config.max_seq_len
    if not 0 <= n_greedy < max_len:
        raise CosmoesError(f"n_greedy must be in [0, {max_len}) for this bundle (its max_seq_len), got {n_greedy}")
    tokenizer = runtime.tokenizer() if runtime.manifest.tokenizer else load_tokenizer_of(checkpoint)
    texts = default_prompts() if prompts is None else list(prompts)
    rows = [_encode(tokenizer, text, max_len) for text in texts]
    details = [_compare(runtime, model, ids_T, n_greedy) | {"prompt": _preview(text)}
               for text, ids_T in zip(texts, rows)]
    return _summarise(details, runtime, bundle_dir, checkpoint, n_greedy) | {"reference": model.label}


class _BundleReference:
    """A bundle as the reference: the eager model's interface (config, logits of a batch of one, greedy)."""

    def __init__(self, bundle_dir, policy: str):
        from cosmoes.runtime.python import BundleRuntime

        self.runtime = BundleRuntime(bundle_dir, policy=policy)
        self.config = self.runtime.config
        self.label = f"bundle ({self.runtime.manifest.quant}, embedding {self.runtime.manifest.quant_embedding})"

    def logits_TV(self, ids_T: torch.Tensor) -> torch.Tensor:
        return self.runtime.logits(ids_T)

    def greedy(self, prompt_T: torch.Tensor, n: int) -> list[int]:
        return self.runtime.generate(prompt_T, n)


class _EagerReference:
    def __init__(self, checkpoint):
        from cosmoes.checkpoint import load_model

        self.model = load_model(checkpoint, dtype=torch.float32).eval()
        self.config = self.model.config
        self.label = "eager fp32"

    def logits_TV(self, ids_T: torch.Tensor) -> torch.Tensor:
        return self.model(ids_T[None]).logits[0].float()

    def greedy(self, prompt_T: torch.Tensor, n: int) -> list[int]:
        return eager_greedy(self.model, prompt_T, n)


def _reference(against: str | Path, policy: str):
    """A checkpoint (its eager fp32 model) or, when ``against`` holds a manifest.json, another bundle."""
    from cosmoes.artifacts import MANIFEST_NAME

    return _BundleReference(against, policy) if (Path(against) / MANIFEST_NAME).is_file() else \
        _EagerReference(against)


def _check_same_model(bundle_cfg, model_cfg, bundle_dir, checkpoint) -> None:
    for name in _SHAPE_FIELDS:
        ours, theirs = getattr(bundle_cfg, name), getattr(model_cfg, name)
        if ours != theirs:
            raise CosmoesError(f"bundle {bundle_dir} was not exported from {checkpoint}: "
                               f"{name} is {ours} in the bundle, {theirs} in the checkpoint")


def _encode(tokenizer, text: str, max_len: int) -> torch.Tensor:
    ids = tokenizer(text)["input_ids"][:max_len]  # [bos] + text, as documents were seen in training
    if len(ids) < 2:
        raise CosmoesError(f"prompt {_preview(text)!r} is too short to verify (needs at least 2 tokens)")
    return torch.tensor(ids, dtype=torch.long)


def _preview(text: str, chars: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= chars else flat[:chars] + "..."


@torch.no_grad()
def _compare(runtime, model, ids_T: torch.Tensor, n_greedy: int) -> dict:
    """Every-position logits of one prompt, then greedy decoding from its first tokens, bundle vs eager."""
    got_TV = runtime.logits(ids_T)
    ref_TV = model.logits_TV(ids_T)
    same_top1 = (got_TV.argmax(-1) == ref_TV.argmax(-1)).sum().item()
    out = {"tokens": len(ids_T), "max_logit_diff": (got_TV - ref_TV).abs().max().item(),
           "top1_agree": int(same_top1), "top1_agreement": same_top1 / len(ids_T),
           "logit_scale": ref_TV.abs().max().item()}
    if n_greedy:
        start = ids_T[: min(len(ids_T), GREEDY_PROMPT_TOKENS, runtime.config.max_seq_len - n_greedy + 1)]
        ours, theirs = runtime.generate(start, n_greedy), model.greedy(start, n_greedy)
        same = [a == b for a, b in zip(ours, theirs)]
        out |= {"greedy_agree": sum(same), "greedy_agreement": sum(same) / n_greedy,
                "first_divergence": same.index(False) if not all(same) else None}
    return out


@torch.no_grad()
def eager_greedy(model, prompt_T: torch.Tensor, n: int) -> list[int]:
    """Greedy continuation by the eager model, with a KV cache (transformers' DynamicCache fits its interface)."""
    from transformers import DynamicCache

    cache, out = DynamicCache(), []
    logits_V = model(prompt_T[None], cache=cache).logits[0, -1]
    while True:
        out.append(int(logits_V.argmax()))
        if len(out) == n:
            return out
        logits_V = model(torch.tensor([[out[-1]]]), cache=cache).logits[0, -1]


def _summarise(details: list[dict], runtime, bundle_dir, checkpoint, n_greedy: int) -> dict:
    positions = sum(d["tokens"] for d in details)
    report = {"bundle": str(bundle_dir), "checkpoint": str(checkpoint), "quant": runtime.manifest.quant,
              "policy": str(runtime.policy), "prompts": len(details), "positions": positions,
              "max_logit_diff": max(d["max_logit_diff"] for d in details),
              "logit_scale": max(d["logit_scale"] for d in details),
              "top1_agreement": sum(d["top1_agree"] for d in details) / positions,
              "n_greedy": n_greedy, "greedy_agreement": None}
    if n_greedy:
        report["greedy_agreement"] = sum(d["greedy_agree"] for d in details) / (n_greedy * len(details))
    report["runtime"] = runtime.stats.to_dict()
    report["per_prompt"] = details
    return report


def format_report(report: dict) -> str:
    """A few human-readable lines for the CLI."""
    greedy = report["greedy_agreement"]
    lines = [f"bundle {report['bundle']} ({report['quant']}) vs {report.get('reference', 'eager fp32')} "
             f"{report['checkpoint']}",
             f"  max |logit diff|  {report['max_logit_diff']:.3e}  (logit scale {report['logit_scale']:.3g})",
             f"  top-1 agreement   {report['top1_agreement']:.2%} over {report['positions']} positions "
             f"of {report['prompts']} prompts",
             f"  greedy agreement  " + ("-" if greedy is None else f"{greedy:.2%} of {report['n_greedy']} tokens "
                                                                    "per prompt")]
    return "\n".join(lines)


__all__ = ["verify", "default_prompts", "eager_greedy", "format_report", "DEFAULT_PROMPTS"]
