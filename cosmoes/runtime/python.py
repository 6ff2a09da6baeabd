"""Python runtime for exported bundles: resident backbone, experts loaded on demand, freed per policy (§3.4.2, Eq. 8).

The backbone's methods (embed, context = RoPE + causal bias of a call, layer_i = attention + KV cache + router,
head) are loaded once. Routing (softmax(τR) + top-k, ``cosmoes.model.route``) runs here between calls, so an expert
method is loaded only when the router first selects it, and released according to the cache policy:

  all    every expert stays resident once loaded (nothing is ever evicted)
  swap   Eq. 8: per layer exactly the currently selected experts S are resident; when S != S_prev the experts
         N = S_prev minus S are evicted first, then the missing members of S are loaded. A prefill chunk runs
         each of its experts in turn and keeps only the last token's set, so at most top_k + 1 are ever resident
  lru:N  at most N experts per layer (N >= top_k); a load evicts the least recently used expert that the step
         does not still need
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from cosmoes.config import check_generation, check_int, check_number, check_threads
from cosmoes.formats import MAX_THREADS
from cosmoes.errors import CosmoesError, InvalidValue
from cosmoes.export.policy import CachePolicy, parse_policy
from cosmoes.model import route
from cosmoes.quiet import native_stderr_hidden
from cosmoes.system import resolve_threads, usable_cores


def load_method_uncached(program, name: str):
    """Load one method of a program and hand it to the caller: dropping the returned object frees it.

    ``executorch.runtime.Program.load_method`` caches every method for the program's lifetime, so an expert
    loaded through it could never be freed. The pybind program underneath (``Program._program``, private in
    executorch 1.5) returns a method that is destroyed with its last reference, XNNPACK runtime and packed
    weights included. This is the one place that relies on that private attribute.
    """
    try:
        return program._program.load_method(name)
    except RuntimeError as exc:  # ExecuTorch refuses a damaged method (its hash may have been rewritten to match)
        raise CosmoesError(f"ExecuTorch cannot load method {name}: {_first_line(exc)}; re-export the bundle") from None


def _load_program(runtime, path: Path):
    try:
        return runtime.load_program(path)
    except (RuntimeError, ValueError) as exc:
        raise CosmoesError(f"ExecuTorch cannot open {path}: {_first_line(exc)}; re-export the bundle") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _find_malloc_trim() -> Callable | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)  # glibc only; musl and macOS have none


_MALLOC_TRIM = _find_malloc_trim()


def release_heap() -> None:
    """Give freed heap pages back to the OS: glibc otherwise keeps the blocks of evicted experts' packed weights."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def set_threads(threads: int) -> None:
    """Size ExecuTorch's process-wide thread pool (the XNNPACK kernels'); 0 means one thread per usable core."""
    from executorch.extension.pybindings import portable_lib

    check_threads(threads, MAX_THREADS)
    threads = resolve_threads(threads)
    with native_stderr_hidden():  # the pool's first use logs cpuinfo probes, and a reset says so, on fd 2
        if portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(threads)


def _one_torch_thread(fn):
    """Run ``fn`` with torch's intra-op pool at one thread, restoring the caller's setting afterwards.

    The Python glue between ExecuTorch calls (routing, gather, index_add_) works on tensors of a few KB, and the
    heavy kernels run in ExecuTorch's own pool. torch still wakes its intra-op threads for index_add_, which cost
    6 ms per call on a busy 2-core machine: 32 greedy tokens took 6 s instead of 0.09 s.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


@dataclass
class RuntimeStats:
    """Expert traffic since the runtime opened, and the routing of the current sequence (for ExRep, Eq. 4–5)."""

    num_experts: int = 0
    loads: int = 0
    evictions: int = 0
    load_ms: float = 0.0
    evict_ms: float = 0.0  # giving experts back (their methods freed; on_evict)
    resident_peak: int = 0  # most experts resident at once, all layers together
    resident_peak_per_layer: list[int] = field(default_factory=list)
    # prefetch=True: experts asked for a layer ahead (not resident then), and loads that found theirs asked for
    prefetched: int = 0
    prefetch_hits: int = 0
    # per MoE layer, the (T, K) expert ids of each call in the current sequence, in token order
    selections: list[list[torch.Tensor]] = field(default_factory=list)

    def selected(self, layer: int) -> torch.Tensor:
        """(T, K) expert ids chosen in ``layer`` for every token fed since the last reset."""
        chunks = self.selections[layer]
        return torch.cat(chunks) if chunks else torch.zeros(0, 0, dtype=torch.long)

    def exrep(self) -> list[float]:
        """ExRep (Eq. 5) of each MoE layer over the current sequence, by ``cosmoes.routing``."""
        from cosmoes.routing import expert_replacement_rate

        rates = []
        for layer in range(len(self.selections)):
            sel_TK = self.selected(layer)
            rates.append(expert_replacement_rate(sel_TK[None], self.num_experts) if len(sel_TK) > 1 else 0.0)
        return rates

    def to_dict(self) -> dict:
        """JSON-ready counters; the raw selections are summarised as ExRep."""
        exrep = self.exrep()
        return {"loads": self.loads, "evictions": self.evictions, "load_ms": round(self.load_ms, 3),
                "evict_ms": round(self.evict_ms, 3),
                "prefetched": self.prefetched, "prefetch_hits": self.prefetch_hits,
                "resident_peak": self.resident_peak, "resident_peak_per_layer": list(self.resident_peak_per_layer),
                "tokens": len(self.selected(0)) if self.selections else 0,
                "exrep_per_layer": exrep, "exrep_mean": sum(exrep) / len(exrep) if exrep else 0.0}


class ExpertCache:
    """The loaded expert methods, per layer in least-recently-used order, evicted according to a CachePolicy."""

    def __init__(self, policy: CachePolicy, loader: Callable[[int, int], object], n_layers: int, num_experts: int,
                 on_evict: Callable[[int, int], None] | None = None):
        self.policy, self.loader, self.on_evict = policy, loader, on_evict
        self.layers: list[OrderedDict[int, object]] = [OrderedDict() for _ in range(n_layers)]
        self.asked: list[list[int]] = [[] for _ in range(n_layers)]
        self.pending: list[list[int]] = [[] for _ in range(n_layers)]  # the step's experts not run yet
        self.stats = RuntimeStats(num_experts=num_experts, resident_peak_per_layer=[0] * n_layers,
                                  selections=[[] for _ in range(n_layers)])

    def resident(self, layer: int) -> list[int]:
        return sorted(self.layers[layer])

    def foretell(self, layer: int, experts: Sequence[int]) -> None:
        """The experts a layer's router picks a layer early: those not resident are what the native runtime asks
        the kernel to start reading (this runtime only counts them, to check that one)."""
        self.asked[layer] = [e for e in experts if e not in self.layers[layer]]
        self.stats.prefetched += len(self.asked[layer])

    def begin_step(self, layer: int, selected: Sequence[int]) -> None:
        """A layer's FFN is about to run experts S: under swap, evict S_prev minus S before anything loads."""
        self.pending[layer] = list(selected)
        if self.policy.kind == "swap":
            self._evict(layer, [e for e in self.layers[layer] if e not in selected])

    def get(self, layer: int, expert: int):
        """The method of one expert, loaded if needed (lru evicts first, so N is never exceeded)."""
        lay, pending = self.layers[layer], self.pending[layer]
        if expert in pending:
            pending.remove(expert)
        if expert in lay:
            lay.move_to_end(expert)
            return lay[expert]
        if self.policy.kind == "lru" and len(lay) >= self.policy.capacity:
            self._evict(layer, [self._victim(layer)])
        t0 = time.perf_counter()
        lay[expert] = self.loader(layer, expert)
        self.stats.load_ms += (time.perf_counter() - t0) * 1e3
        self.stats.loads += 1
        self.stats.prefetch_hits += expert in self.asked[layer]
        self.stats.resident_peak_per_layer[layer] = max(self.stats.resident_peak_per_layer[layer], len(lay))
        self.stats.resident_peak = max(self.stats.resident_peak, sum(len(x) for x in self.layers))
        return lay[expert]

    def _victim(self, layer: int) -> int:
        """The least recently used expert the step will not run again: evicting one it still needs (resident, but
        later in ascending order than the miss) would only load it back a moment later."""
        lay, pending = self.layers[layer], self.pending[layer]
        return next((e for e in lay if e not in pending), next(iter(lay)))

    def release(self, layer: int, expert: int, keep: Sequence[int]) -> None:
        """The expert has run. Under swap, a multi-token step (prefill) keeps only its last token's experts, so
        one outside ``keep`` goes now: at most top_k + 1 experts per layer are resident at any time."""
        if self.policy.kind == "swap" and expert not in keep:
            self._evict(layer, [expert])

    def _evict(self, layer: int, experts: list[int]) -> None:
        if not experts:
            return
        t0 = time.perf_counter()
        for e in experts:
            del self.layers[layer][e]  # the last reference: ExecuTorch frees the method and its packed weights
            if self.on_evict is not None:
                self.on_evict(layer, e)
        release_heap()
        self.stats.evict_ms += (time.perf_counter() - t0) * 1e3
        self.stats.evictions += len(experts)


class BundleRuntime:
    """Runs a bundle with ExecuTorch: ``prefill``/``decode``/``logits``/``generate`` over token ids.

    ``policy``: all | swap | lru:N (see the module docstring). ``threads``: ExecuTorch thread pool size
    (default: the bundle's recipe; 0 = every core). ``prefetch``: count what the native runtime's --prefetch would
    ask for (``stats.prefetched``, ``stats.prefetch_hits``). Expert counters accumulate over the runtime's life; the
    recorded expert selections (``stats.selections``, for ExRep) cover the current sequence only: ``reset``,
    ``prefill``, ``logits`` and ``generate`` start a new one.
    """

    def __init__(self, bundle_dir: str | Path, policy: str = "swap", threads: int | None = None,
                 prefetch: bool = False):
        from cosmoes.export.manifest import load_manifest

        self.bundle_dir = Path(bundle_dir)
        self.manifest = load_manifest(self.bundle_dir)  # validates every file before any runtime work
        self.config = self.manifest.model_config()
        self.policy = parse_policy(policy, self.config.top_k)
        self.prefetch = prefetch
        if threads is not None:  # a caller's count is bounded by this machine; the recipe's (a phone's) is not
            check_threads(threads, usable_cores())
        set_threads(threads if threads is not None else self.manifest.threads)
        self.max_chunk = min(self.manifest.max_chunk, self.config.max_seq_len)
        self._open_programs()
        self.pos = 0

    def _open_programs(self) -> None:
        from executorch.runtime import Runtime

        from cosmoes.runtime.native import load_ops

        load_ops()  # the layer and head methods call cosmoes::cached_attention and cosmoes::int4_linear
        runtime = Runtime.get()
        expert_methods = {e.get("method") for lay in self.manifest.experts.values() for e in lay.values()}
        with native_stderr_hidden():  # XNNPACK's first method load probes the CPU and logs it on fd 2
            self._programs = {name: _load_program(runtime, self.manifest.program_path(self.bundle_dir, name))
                              for name in self.manifest.programs}
            self._methods = {m: load_method_uncached(prog, m) for name, prog in self._programs.items()
                             for m in self.manifest.programs[name]["methods"] if m not in expert_methods}
        n_moe = len(self.manifest.experts) if self.config.is_moe else 0
        self._segments = None
        if self.manifest.packed_experts:
            from cosmoes.export.segments import SegmentFile

            self._segments = SegmentFile(self.bundle_dir / self.manifest.expert_file["file"], self.manifest.config,
                                         self.manifest.group_size)
        self._experts = ExpertCache(self.policy, self._load_expert, n_moe, self.config.num_experts,
                                    on_evict=self._release_expert)

    def _load_expert(self, layer: int, expert: int):
        entry = self.manifest.expert(layer, expert)
        if self._segments is None:
            return load_method_uncached(self._programs[entry["program"]], entry["method"])
        from cosmoes.export.segments import expert_ffn_from

        # the int4 kernels' reference over the mapped segment: a load is its page-ins, nothing is copied
        return expert_ffn_from(self._segments.expert(entry["offset"]), bool(self.config.wd_rank))

    def _release_expert(self, layer: int, expert: int) -> None:
        if self._segments is not None:
            self._segments.release(self.manifest.expert(layer, expert)["offset"])

    def tokenizer(self):
        """The tokenizer shipped inside the bundle; CosmoesError if it has none."""
        from cosmoes.tokenizer import load_tokenizer

        return load_tokenizer(self.manifest.tokenizer_dir(self.bundle_dir))

    @property
    def stats(self) -> RuntimeStats:
        return self._experts.stats

    def resident(self, layer: int) -> list[int]:
        """Experts of one MoE layer whose methods are loaded now."""
        return self._experts.resident(layer)

    def reset(self) -> None:
        """Start a new sequence. Stale cache entries past the new prefix are hidden by the causal mask."""
        self.pos = 0
        for chunks in self.stats.selections:
            chunks.clear()

    @_one_torch_thread
    def prefill(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Start a sequence with ``ids``; logits (vocab,) of its last position."""
        self.reset()
        return self._feed(self._as_ids(ids), all_logits=False)[0]

    @_one_torch_thread
    def decode(self, token: int) -> torch.Tensor:
        """Feed one token after the current sequence; its logits (vocab,)."""
        return self._feed(self._as_ids([int(token)]), all_logits=False)[0]

    @_one_torch_thread
    def logits(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits (T, vocab) of every position of a new sequence ``ids`` (fed in chunks of max_chunk)."""
        self.reset()
        return self._feed(self._as_ids(ids), all_logits=True)

    @_one_torch_thread
    def generate(self, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, eos_id: int | None = None) -> list[int]:
        """New token ids after the prompt: greedy when temperature == 0, else temperature/top-p sampling
        seeded by ``seed``. Stops early after ``eos_id`` if given."""
        check_generation(max_new_tokens, temperature, top_p)
        ids_T = self._as_ids(prompt_ids)
        if len(ids_T) + max_new_tokens - 1 > self.config.max_seq_len:
            raise CosmoesError(f"prompt ({len(ids_T)} tokens) + {max_new_tokens} new tokens exceed the bundle's "
                               f"max_seq_len {self.config.max_seq_len}")
        pick = make_sampler(temperature, top_p, seed)
        logits_V, out = self.prefill(ids_T), []
        while True:
            out.append(pick(logits_V))
            if len(out) == max_new_tokens or out[-1] == eos_id:
                return out
            logits_V = self.decode(out[-1])

    # -- internals -----------------------------------------------------------------------------------------------
    def _as_ids(self, ids) -> torch.Tensor:
        ids_T = torch.as_tensor(ids, dtype=torch.long).flatten()
        if ids_T.numel() == 0:
            raise CosmoesError("no token ids to run")
        if int(ids_T.min()) < 0 or int(ids_T.max()) >= self.config.vocab_size:
            raise CosmoesError(f"token ids must lie in [0, {self.config.vocab_size}), got "
                               f"{int(ids_T.min())}..{int(ids_T.max())}")
        return ids_T

    def _feed(self, ids_T: torch.Tensor, all_logits: bool) -> torch.Tensor:
        """Logits (T, vocab) of all fed positions, or (1, vocab) of the last one."""
        if self.pos + len(ids_T) > self.config.max_seq_len:
            raise CosmoesError(f"sequence of {self.pos + len(ids_T)} tokens exceeds the bundle's max_seq_len "
                               f"{self.config.max_seq_len}")
        chunks = ids_T.split(self.max_chunk)
        last = len(chunks) - 1
        try:
            out = [self._run_chunk(c, "all" if all_logits else ("last" if i == last else "none"))
                   for i, c in enumerate(chunks)]
        except RuntimeError as exc:  # a method of a damaged program failed inside ExecuTorch
            raise CosmoesError(f"ExecuTorch failed running {self.bundle_dir}: {_first_line(exc)}; "
                               "re-export the bundle") from None
        return torch.cat([o for o in out if o is not None])

    def _run_chunk(self, ids_T: torch.Tensor, logits: str) -> torch.Tensor | None:
        """One call per stage for up to max_chunk tokens; logits of "all" positions, the "last" one or "none"."""
        T = len(ids_T)
        positions_L = torch.arange(self.pos + T, dtype=torch.long)
        h_1TD = self._methods["embed"]([ids_T.view(1, T)])[0]
        # outputs alias the program's activation arena, which the next method call reuses
        context = [t.clone() for t in self._methods["context"]([positions_L[self.pos:], positions_L])]
        for i in range(self.config.n_layers):
            outs = self._methods[f"layer_{i}"]([h_1TD, *context])
            if self.config.is_moe:
                if self.prefetch and len(outs) > 3:  # format 8: the next layer's router, a layer early
                    ahead_TK = route(outs[3][0], self.config.top_k, self.config.router_temperature,
                                     self.config.norm_topk_prob)[1]
                    self._experts.foretell(i + 1, sorted(set(ahead_TK.flatten().tolist())))
                ff_TD = self._moe(i, outs[1][0], outs[2][0])
            else:
                ff_TD = self._methods[f"layer_{i}_ffn"]([outs[1][0]])[0]
            h_1TD = outs[0] + ff_TD[None]
        self.pos += T
        if logits == "none":
            return None  # a prompt's earlier chunks only fill the KV caches
        if logits == "last":
            h_1TD = h_1TD[:, -1:].contiguous()
        return self._methods["head"]([h_1TD])[0][0]

    def _moe(self, layer: int, x_TD: torch.Tensor, scores_TE: torch.Tensor) -> torch.Tensor:
        """The MoE FFN as cosmoes.model computes it, one call per selected expert over its tokens."""
        cfg = self.config
        weights_TK, experts_TK = route(scores_TE, cfg.top_k, cfg.router_temperature, cfg.norm_topk_prob)
        self.stats.selections[layer].append(experts_TK)
        selected = sorted(set(experts_TK.flatten().tolist()))
        self._experts.begin_step(layer, selected)
        out_TD = torch.zeros_like(x_TD)
        last = experts_TK[-1].tolist()
        for e in selected:  # ascending, as the eager model, so the fp32 sums are added in the same order
            token_idx, slot = torch.where(experts_TK == e)
            y_ND = self._experts.get(layer, e)([x_TD[token_idx].contiguous()])[0]
            out_TD.index_add_(0, token_idx, y_ND * weights_TK[token_idx, slot, None].to(x_TD.dtype))
            self._experts.release(layer, e, last)
        return out_TD


def make_sampler(temperature: float, top_p: float, seed: int) -> Callable[[torch.Tensor], int]:
    """Next-token choice from logits (V,): argmax at temperature 0, else transformers' temperature and top-p
    warpers and a draw from a generator seeded once, so a seed reproduces the whole sequence."""
    check_generation(1, temperature, top_p)
    if temperature == 0:
        return lambda logits_V: int(logits_V.argmax())
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopPLogitsWarper)

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)])
    gen = torch.Generator().manual_seed(seed)
    no_ids = torch.zeros(1, 0, dtype=torch.long)  # the warpers' input_ids argument; temperature/top-p ignore it

    def pick(logits_V: torch.Tensor) -> int:
        scores_1V = warpers(no_ids, logits_V[None].float())
        return int(torch.multinomial(torch.softmax(scores_1V, dim=-1), 1, generator=gen))

    return pick


__all__ = ["BundleRuntime", "CachePolicy", "ExpertCache", "RuntimeStats", "parse_policy", "make_sampler",
           "check_generation",
           "load_method_uncached", "release_heap", "set_threads"]
