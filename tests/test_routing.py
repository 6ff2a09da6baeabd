"""Routing metrics (cosmoes.routing) against hand-computed values on tiny selections."""

import pytest
import torch

from cosmoes.errors import CosmoesError
from cosmoes.model import route
from cosmoes.routing import (
    count_replacements,
    delta_uniform,
    expert_replacement_rate,
    expert_shares,
    routing_stats,
    selected_experts,
)


def ids(rows):
    """Expert ids as a (B, T, K) long tensor from nested lists."""
    return torch.tensor(rows, dtype=torch.long)


# B=1, T=4, K=1, E=3: experts 0, 0, 1, 2.
RAMP_BTK = ids([[[0], [0], [1], [2]]])


def test_count_replacements_by_hand():
    # Membership changes per transition: t0->t1 none; t1->t2 expert 0 leaves, 1 enters (2);
    # t2->t3 expert 1 leaves, 2 enters (2). H = 4.
    H = count_replacements(RAMP_BTK, num_experts=3)
    assert H.dtype == torch.int64 and int(H) == 4


def test_exrep_by_hand():
    # floor(H/2) / (B*K*(T-1)) = floor(4/2) / (1*1*3) = 2/3
    assert expert_replacement_rate(RAMP_BTK, 3) == pytest.approx(2 / 3)


def test_exrep_constant_selection_is_zero():
    assert expert_replacement_rate(ids([[[1, 3]] * 6]), 4) == 0.0


@pytest.mark.parametrize(
    "rows, num_experts",
    [
        ([[[0], [1], [0], [1], [0]]], 2),  # K=1: every transition swaps the single expert
        ([[[0, 1], [2, 3], [0, 1], [2, 3]]], 4),  # K=2: both slots swap every transition
    ],
)
def test_exrep_alternating_disjoint_is_one(rows, num_experts):
    assert expert_replacement_rate(ids(rows), num_experts) == pytest.approx(1.0)


def test_exrep_batch_pools_sequences_and_never_crosses_them():
    # Sequence 0 is RAMP (H=4); sequence 1 keeps expert 1 (H=0). The jump from the end of sequence 0
    # (expert 2) to the start of sequence 1 (expert 1) must not count. floor(4/2) / (2*1*3) = 1/3.
    batch_BTK = torch.cat([RAMP_BTK, ids([[[1], [1], [1], [1]]])])
    assert int(count_replacements(batch_BTK, 3)) == 4
    assert expert_replacement_rate(batch_BTK, 3) == pytest.approx(1 / 3)


def test_exrep_order_within_token_does_not_matter():
    # {0,1} -> {1,0} -> {0,1}: same set every token, so no replacement.
    assert expert_replacement_rate(ids([[[0, 1], [1, 0], [0, 1]]]), 2) == 0.0


def test_exrep_floors_half_of_h():
    # A repeated id makes a 1-expert set: {0} -> {0,1} is H=1, floor(1/2)=0 replacements.
    sel = ids([[[0, 0], [0, 1]]])
    assert int(count_replacements(sel, 2)) == 1
    assert expert_replacement_rate(sel, 2) == 0.0


def test_exrep_single_token_is_zero():
    assert expert_replacement_rate(ids([[[0, 1]], [[2, 3]]]), 4) == 0.0


def test_expert_shares_by_hand():
    # RAMP over E=4: slots go to experts 0,0,1,2 -> shares [2/4, 1/4, 1/4, 0].
    assert torch.allclose(expert_shares(RAMP_BTK, 4), torch.tensor([[0.5, 0.25, 0.25, 0.0]]))


def test_delta_uniform_by_hand():
    # p = [0.5, 0.25, 0.25, 0], uniform 0.25: mean(|0.25|, 0, 0, |-0.25|) = 0.5/4 = 0.125
    assert delta_uniform(RAMP_BTK, 4) == pytest.approx(0.125)


def test_delta_uniform_balanced_is_zero():
    # 4 tokens x 2 slots over 4 experts: each expert gets exactly 2 of the 8 slots.
    assert delta_uniform(ids([[[0, 1], [2, 3], [1, 2], [3, 0]]]), 4) == 0.0


def test_delta_uniform_full_collapse():
    # E=8, K=2, always experts {0,1}: p = [.5, .5, 0 x6]; (2*|.5-.125| + 6*.125)/8 = 1.5/8 = 2*(E-K)/E^2 = 0.1875
    assert delta_uniform(ids([[[0, 1]] * 5] * 3), 8) == pytest.approx(0.1875)


def test_delta_uniform_pools_the_batch():
    # Sequence 0 always expert 0, sequence 1 always expert 1 (E=2): pooled p = [.5, .5] -> 0.
    assert delta_uniform(ids([[[0], [0], [0]], [[1], [1], [1]]]), 2) == 0.0


def test_routing_stats_per_layer_and_mean():
    # Layer 0 = RAMP over E=4: ExRep 2/3, ΔUni 0.125. Layer 1 alternates 0/1 over E=4 (K=1, T=4):
    # ExRep 1; p = [.5, .5, 0, 0] -> (0.25+0.25+0.25+0.25)/4 = 0.25.
    layer1_BTK = ids([[[0], [1], [0], [1]]])
    stats = routing_stats([RAMP_BTK, layer1_BTK], num_experts=4)
    assert stats["exrep_per_layer"] == pytest.approx([2 / 3, 1.0])
    assert stats["exrep_mean"] == pytest.approx(5 / 6)
    assert stats["delta_uniform_per_layer"] == pytest.approx([0.125, 0.25])
    assert stats["delta_uniform_mean"] == pytest.approx(0.1875)


def test_selected_experts_match_the_model_router():
    logits_BTE = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(0))
    for temperature in (1.0, 0.5):
        sel_BTK = selected_experts(logits_BTE, top_k=2, temperature=temperature)
        _, experts_TK = route(logits_BTE.reshape(-1, 8), 2, temperature, renormalize=False)
        assert sel_BTK.shape == (2, 7, 2)
        assert torch.equal(sel_BTK.reshape(-1, 2), experts_TK)


def test_selected_experts_by_hand():
    # Token 0 prefers expert 2 then 0; token 1 prefers expert 1 then 2.
    logits_BTE = torch.tensor([[[1.0, -1.0, 3.0], [0.0, 2.0, 1.0]]])
    assert selected_experts(logits_BTE, 2).tolist() == [[[2, 0], [1, 2]]]


@pytest.mark.parametrize(
    "call",
    [
        lambda: expert_replacement_rate(torch.zeros(1, 4, 1), 3),  # float ids
        lambda: expert_replacement_rate(ids([[[0], [3]]]), 3),  # id out of range
        lambda: delta_uniform(ids([[[0], [-1]]]), 3),  # negative id
        lambda: expert_replacement_rate(ids([[0, 1]]), 3),  # 2-D
        lambda: selected_experts(torch.zeros(1, 2, 3), top_k=4),  # k > E
        lambda: selected_experts(torch.zeros(2, 3), top_k=1),  # 2-D logits
        lambda: routing_stats([], 3),
    ],
)
def test_bad_input_raises_cosmoes_error(call):
    with pytest.raises(CosmoesError):
        call()
