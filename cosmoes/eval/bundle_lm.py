"""lm-eval scoring of exported ExecuTorch bundles (§3.3 tasks on the §3.4.2 on-device artifact): `BundleLM`."""

from __future__ import annotations

from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from cosmoes.errors import CosmoesError


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
        from cosmoes.runtime.python import BundleRuntime

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


__all__ = ["BundleLM"]
