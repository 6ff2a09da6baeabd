"""lm-eval scoring of exported ExecuTorch bundles (§3.3 tasks on the §3.4.2 on-device artifact): `BundleLM`."""

from __future__ import annotations

from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from cosmoes.errors import CosmoesError


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` is an exported bundle directory (it has a bundle manifest.json)."""
    from cosmoes.export.manifest import MANIFEST_NAME

    return (Path(path) / MANIFEST_NAME).is_file()


def model_format(path: str | Path) -> str:
    """"bundle" or "checkpoint" (a run directory counts); a directory that is neither is a one-line error.

    A path that does not exist is left to the checkpoint loader, whose "checkpoint not found" says so.
    """
    from cosmoes.checkpoint import resolve_checkpoint

    path = Path(path)
    if is_bundle(path):
        return "bundle"
    if not path.exists() or (resolve_checkpoint(path) / "config.json").is_file():
        return "checkpoint"
    raise CosmoesError(f"{path} is neither a cosmoes checkpoint (no config.json) nor an exported bundle "
                       "(no manifest.json)")


def bundle_tokenizer_check(bundle: str | Path):
    """The bundle's manifest, checked cheaply (sizes, not hashes) before any work; CosmoesError if it has no
    tokenizer, since text tasks need the bundle's own."""
    from cosmoes.export.manifest import load_manifest

    manifest = load_manifest(bundle, verify=False)
    if not manifest.tokenizer or not (Path(bundle) / manifest.tokenizer).is_dir():
        raise CosmoesError(f"bundle {bundle} has no tokenizer; re-export it from a checkpoint with one")
    return manifest


class BundleLM(TemplateLM):
    """lm-eval's model interface over ``BundleRuntime(bundle, policy)``: log-likelihoods from the bundle's logits.

    Text is split into context and continuation tokens by TemplateLM, as for lm-eval's HFLM, with the bundle's
    own tokenizer; each request is then scored like ``HFLM._loglikelihood_tokens``: context + continuation cut
    from the left to max_seq_len + 1 tokens, fp32 log_softmax, the continuation's summed log-prob and whether
    greedy decoding would produce it. The runtime takes one sequence at a time, so there is no batching.
    """

    backend = "causal"

    def __init__(self, bundle: str | Path, policy: str = "all", progress: bool = True):
        super().__init__()
        from cosmoes.export.runtime import BundleRuntime

        self.runtime = BundleRuntime(bundle, policy=policy)
        self.tokenizer = self.runtime.tokenizer()
        self.max_length = self.runtime.config.max_seq_len
        self.progress = progress
        # multiple-choice answers of one token share their input (the context): keep the last one's log-probs
        self._last: tuple[tuple[int, ...], torch.Tensor] | None = None

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # as HFLM: the tokenizer's special tokens (bos) are added unless the text already starts with the prefix token
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(self.tokenizer.decode(self.prefix_token_id))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for request, context_enc, continuation_enc in tqdm(requests, desc="bundle loglikelihood",
                                                           disable=disable_tqdm or not self.progress):
            answer = self._score(context_enc, continuation_enc)
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
            out.append(answer)
        return out

    def _score(self, context_enc: list[int], continuation_enc: list[int]) -> tuple[float, bool]:
        n = len(continuation_enc)
        if not 0 < n <= self.max_length:
            raise CosmoesError(f"a continuation of {n} tokens cannot be scored with the bundle's max_seq_len "
                               f"{self.max_length}")
        inp = tuple((context_enc + continuation_enc)[-(self.max_length + 1):][:-1])
        if self._last is None or self._last[0] != inp:
            self._last = (inp, torch.log_softmax(self.runtime.logits(inp).float(), dim=-1))
        logp_NV = self._last[1][-n:]
        target_N = torch.tensor(continuation_enc, dtype=torch.long)
        logprob = logp_NV.gather(1, target_N[:, None]).sum()
        return float(logprob), bool((logp_NV.argmax(-1) == target_N).all())

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihoods in max_seq_len windows, as HFLM cuts them (lm-eval's rolling windows)."""
        from lm_eval import utils

        out = []
        for (string,) in tqdm([r.args for r in requests], desc="bundle loglikelihood_rolling",
                              disable=disable_tqdm or not self.progress):
            windows = utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                      prefix_token=self.prefix_token_id,
                                                      max_seq_len=self.max_length, context_len=1)
            pairs = [(None, *utils.make_disjoint_window(w)) for w in windows]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(pairs, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise CosmoesError("bundles are scored by log-likelihood only: generation tasks are not supported "
                           "(the paper's Table 2 tasks need none)")


def evaluate_bundle(bundle: str | Path, cfg=None, log=None):
    """Zero-shot lm-eval of an exported bundle on the Table 2 tasks, run by ExecuTorch with every expert resident.

    Same task plans, data and report as ``evaluate_checkpoint``; the report records the bundle's quantisation.
    """
    from cosmoes.evaluate import EvalConfig, check_eval_config, evaluate_lm

    cfg = cfg or EvalConfig()
    log = log or (lambda msg: None)
    check_eval_config(cfg)
    manifest = bundle_tokenizer_check(bundle)
    log(f"{bundle}: ExecuTorch bundle, {manifest.quant} weights for {manifest.target}; one request at a time")
    return evaluate_lm(lambda: BundleLM(bundle, policy="all"), str(bundle), cfg, log, kind="bundle",
                       quant=manifest.quant)


__all__ = ["BundleLM", "evaluate_bundle", "is_bundle", "model_format", "bundle_tokenizer_check"]
