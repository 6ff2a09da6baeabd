"""cosmoes.runtime.python: fp32 bundles against the eager model (logits, greedy decoding, MoE and WD-MoE), the
expert cache policies all / swap (Eq. 8) / lru:N, the recorded routing, seeded sampling and the error paths."""

import json

import pytest
import torch
from typer.testing import CliRunner

from cosmoes.checkpoint import load_model
from cosmoes.cli import app
from cosmoes.errors import CosmoesError
from cosmoes.runtime.python import BundleRuntime, ExpertCache, parse_policy
from cosmoes.eval.verify import eager_greedy
from cosmoes.routing import expert_replacement_rate, selected_experts


@pytest.fixture(scope="module")
def eager(micro_checkpoint):
    return load_model(micro_checkpoint).eval()


@pytest.fixture(scope="module")
def runtime(micro_bundle_fp32):
    return BundleRuntime(micro_bundle_fp32, policy="swap")


def _ids(n: int, seed: int, vocab: int = 8192) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_fp32_logits_match_eager_over_chunked_prefill_and_decode(runtime, eager):
    ids_T = _ids(40, seed=1)  # 40 tokens > max_chunk 16: the prompt goes in three calls
    assert runtime.max_chunk < len(ids_T)
    ref_TV = eager(ids_T[None]).logits[0]
    assert (runtime.logits(ids_T) - ref_TV).abs().max() < 1e-4
    assert (runtime.prefill(ids_T[:30]) - ref_TV[29]).abs().max() < 1e-4
    for t in range(30, 40):  # decode continues the KV caches written by the chunked prefill
        assert (runtime.decode(int(ids_T[t])) - ref_TV[t]).abs().max() < 1e-4
    assert runtime.pos == 40


@pytest.mark.parametrize("policy", ["swap", "lru:2", "all"])
def test_greedy_32_tokens_identical_to_eager_moe(micro_bundle_fp32, eager, policy):
    prompt_T = _ids(12, seed=2)
    got = BundleRuntime(micro_bundle_fp32, policy=policy).generate(prompt_T, 32)
    assert got == eager_greedy(eager, prompt_T, 32)


@torch.no_grad()
def test_wd_moe_bundle_matches_eager(micro_bundle_wd_fp32, micro_wd_checkpoint):
    model = load_model(micro_wd_checkpoint).eval()
    runtime = BundleRuntime(micro_bundle_wd_fp32, policy="swap")
    assert runtime.config.is_wd
    ids_T = _ids(20, seed=3)
    assert (runtime.logits(ids_T) - model(ids_T[None]).logits[0]).abs().max() < 1e-4
    assert runtime.generate(ids_T[:12], 32) == eager_greedy(model, ids_T[:12], 32)


def test_swap_keeps_exactly_the_selected_top_k_experts_resident(runtime):
    top_k = runtime.config.top_k
    runtime.prefill(_ids(20, seed=4))
    for layer in range(runtime.config.n_layers):  # after a prefill: the last token's experts (Eq. 8)
        assert runtime.resident(layer) == sorted(runtime.stats.selections[layer][-1][-1].tolist())
    assert runtime.stats.resident_peak <= (top_k + 1) * runtime.config.n_layers  # one extra while a chunk runs
    for token in _ids(10, seed=5).tolist():
        runtime.decode(token)
        for layer in range(runtime.config.n_layers):
            chosen = sorted(runtime.stats.selections[layer][-1][0].tolist())
            assert runtime.resident(layer) == chosen and len(chosen) == top_k


def _run_policy(bundle, policy: str, prompt_T, n: int = 24) -> BundleRuntime:
    rt = BundleRuntime(bundle, policy=policy)
    rt.generate(prompt_T, n)
    return rt


def test_policies_load_counts_and_resident_limits(micro_bundle_fp32):
    prompt_T = _ids(30, seed=6)
    every, swap, lru = (_run_policy(micro_bundle_fp32, p, prompt_T) for p in ("all", "swap", "lru:3"))
    n_layers, num_experts = every.config.n_layers, every.config.num_experts
    # the same tokens route alike under every policy: the cache never changes the computation
    for layer in range(n_layers):
        assert torch.equal(every.stats.selected(layer), swap.stats.selected(layer))
        assert torch.equal(every.stats.selected(layer), lru.stats.selected(layer))
    used = sum(len(set(every.stats.selected(layer).flatten().tolist())) for layer in range(n_layers))
    assert every.stats.evictions == 0 and every.stats.loads == used  # each used expert loaded exactly once
    assert swap.stats.loads >= every.stats.loads and swap.stats.evictions > 0
    assert max(lru.stats.resident_peak_per_layer) <= 3 and lru.stats.resident_peak <= 3 * n_layers
    assert every.stats.resident_peak <= n_layers * num_experts
    for rt in (every, swap, lru):  # what was loaded and not evicted is what is resident now
        resident = sum(len(rt.resident(layer)) for layer in range(n_layers))
        assert rt.stats.loads - rt.stats.evictions == resident
        assert rt.stats.load_ms > 0
        assert (rt.stats.evict_ms > 0) == (rt.stats.evictions > 0)  # evictions timed apart from loads


@torch.no_grad()
def test_recorded_routing_is_the_eager_routing_and_gives_exrep(runtime, eager):
    ids_T = _ids(40, seed=7)
    runtime.logits(ids_T)
    cfg = runtime.config
    for layer, scores_BTE in enumerate(eager(ids_T[None]).router_logits):
        want_TK = selected_experts(scores_BTE, cfg.top_k, cfg.router_temperature)[0]
        got_TK = runtime.stats.selected(layer)
        assert got_TK.shape == (40, cfg.top_k)
        assert torch.equal(got_TK.sort(-1).values, want_TK.sort(-1).values)
        assert runtime.stats.exrep()[layer] == pytest.approx(expert_replacement_rate(want_TK[None], cfg.num_experts))
    stats = runtime.stats.to_dict()
    assert stats["tokens"] == 40 and len(stats["exrep_per_layer"]) == cfg.n_layers
    runtime.reset()  # a new sequence starts a new routing record; counters keep running
    assert runtime.stats.to_dict()["tokens"] == 0 and runtime.stats.loads == stats["loads"]


def test_sampling_is_seeded_and_differs_from_greedy(runtime):
    prompt_T = _ids(8, seed=8)
    greedy = runtime.generate(prompt_T, 40)
    a = runtime.generate(prompt_T, 40, temperature=1.0, seed=11)
    assert a == runtime.generate(prompt_T, 40, temperature=1.0, seed=11)
    assert a != greedy
    assert a != runtime.generate(prompt_T, 40, temperature=1.0, seed=12)
    # top-p so small that only the most likely token survives is greedy decoding again
    assert runtime.generate(prompt_T, 40, temperature=1.0, top_p=1e-9, seed=11) == greedy


def test_generate_stops_at_eos(runtime):
    prompt_T = _ids(8, seed=9)
    greedy = runtime.generate(prompt_T, 10)
    assert runtime.generate(prompt_T, 10, eos_id=greedy[3]) == greedy[: greedy.index(greedy[3]) + 1]


def test_experts_are_loaded_outside_the_program_cache(runtime):
    runtime.prefill(_ids(10, seed=10))
    experts_program = runtime._programs["experts"]
    # executorch.runtime.Program caches what *it* loads forever; the runtime must never go through it
    assert all(m is None for m in experts_program._methods.values())


@pytest.mark.parametrize("policy", ["fifo", "lru", "lru:x", "lru:1", "lru:-2", ""])
def test_bad_policy_is_a_one_line_error(micro_bundle_fp32, policy):
    with pytest.raises(CosmoesError, match="policy"):
        BundleRuntime(micro_bundle_fp32, policy=policy)


def _step(cache: ExpertCache, selected: list[int]) -> None:
    cache.begin_step(0, selected)
    for e in selected:  # ascending, as the runtime runs them
        cache.get(0, e)
        cache.release(0, e, selected)


def test_lru_evicts_the_least_recent_expert_the_step_does_not_still_need():
    cache = ExpertCache(parse_policy("lru:3", top_k=2), lambda layer, e: f"expert {e}", n_layers=1, num_experts=8)
    for selected in ([0, 1], [2, 3]):  # 2 is loaded, 3 evicts 0: resident 1, 2, 3, least recent first
        _step(cache, selected)
    assert list(cache.layers[0]) == [1, 2, 3] and (cache.stats.loads, cache.stats.evictions) == (4, 1)
    # 0 misses: 1 is the least recent but the step still needs it, so 2 goes, and 1 is a hit
    _step(cache, [0, 1])
    assert list(cache.layers[0]) == [3, 0, 1] and (cache.stats.loads, cache.stats.evictions) == (5, 2)
    # a step of more experts than N (a prefill): an expert the step has run is not needed by it again
    _step(cache, [4, 5, 6, 7])
    assert list(cache.layers[0]) == [5, 6, 7] and (cache.stats.loads, cache.stats.evictions) == (9, 6)
    # every resident expert still needed: the least recent goes (5, loaded back next, evicting 0 that has run)
    _step(cache, [0, 5, 6, 7])
    assert list(cache.layers[0]) == [5, 6, 7] and (cache.stats.loads, cache.stats.evictions) == (11, 8)


def test_parse_policy():
    assert str(parse_policy("LRU:4", top_k=2)) == "lru:4" and parse_policy("swap", 2).kind == "swap"


def test_too_long_or_bad_inputs_are_errors(runtime):
    max_len = runtime.config.max_seq_len
    with pytest.raises(CosmoesError, match="max_seq_len"):
        runtime.prefill(_ids(max_len + 1, seed=11))
    with pytest.raises(CosmoesError, match="max_seq_len"):
        runtime.generate(_ids(max_len - 4, seed=12), 8)
    runtime.prefill(_ids(max_len, seed=13))
    with pytest.raises(CosmoesError, match="max_seq_len"):
        runtime.decode(5)
    with pytest.raises(CosmoesError, match="token ids"):
        runtime.prefill([0, runtime.config.vocab_size])
    with pytest.raises(CosmoesError, match="no token ids"):
        runtime.prefill([])
    with pytest.raises(CosmoesError, match="temperature"):
        runtime.generate([1, 2], 4, temperature=-1)
    with pytest.raises(CosmoesError, match="top_p"):
        runtime.generate([1, 2], 4, temperature=1, top_p=0)
    with pytest.raises(CosmoesError, match="threads"):
        BundleRuntime(runtime.bundle_dir, threads=-1)


def test_cli_generate_prints_text_and_stats(micro_bundle_fp32):
    result = CliRunner().invoke(app, ["generate", str(micro_bundle_fp32), "--prompt", "It is a truth",
                                      "--max-new-tokens", "6", "--policy", "lru:2", "--stats"])
    assert result.exit_code == 0, result.output
    *text, last = result.stdout.strip().splitlines()
    assert "\n".join(text).startswith("It is a truth")
    stats = json.loads(last)
    assert stats["policy"] == "lru:2" and stats["loads"] > 0 and max(stats["resident_peak_per_layer"]) <= 2


def test_cli_generate_bad_policy(micro_bundle_fp32):
    result = CliRunner().invoke(app, ["generate", str(micro_bundle_fp32), "--prompt", "x", "--policy", "lru:1"])
    assert isinstance(result.exception, CosmoesError)
