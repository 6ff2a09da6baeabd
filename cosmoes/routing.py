"""Routing metrics for offloading: expert replacements (ExRep, Eq. 4–5) and ΔUniform balance (§3.3, §3.4.2).

Everything here works on realised top-k selections, integer expert ids shaped (B, T, K). The replacement count
``count_replacements`` is the one implementation of Eq. 4, shared with the block-wise expert selection (BlES)
loss ``cosmoes.losses.bles_loss``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cosmoes.errors import CosmoesError


def router_probs(router_logits_BTE: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Routing weights W = softmax(τ·R) over the expert axis, in fp32 (Eq. 2; same maths as ``model.route``)."""
    _check_logits(router_logits_BTE)
    if not temperature > 0:
        raise CosmoesError(f"router temperature must be positive, got {temperature}")
    return torch.softmax(router_logits_BTE.float() * temperature, dim=-1)


def selected_experts(router_logits_BTE: torch.Tensor, top_k: int, temperature: float = 1.0) -> torch.Tensor:
    """The (B, T, K) expert ids a token-choice router picks: top-k of softmax(τ·R) (Eq. 3), for metrics."""
    return top_k_ids(router_probs(router_logits_BTE, temperature), top_k)


def top_k_ids(probs_BTE: torch.Tensor, top_k: int) -> torch.Tensor:
    """The (B, T, K) ids of the k largest routing weights per token (Eq. 3); no gradient flows through them."""
    _check_top_k(top_k, probs_BTE.shape[-1])
    return probs_BTE.detach().topk(top_k, dim=-1).indices


def count_replacements(selected_BTK: torch.Tensor, num_experts: int, *, validate: bool = True) -> torch.Tensor:
    """H of Eq. 4: Σ_e Σ_b Σ_{t<T} |[e ∈ S[b,t+1]] − [e ∈ S[b,t]]|, as a 0-d int64 tensor.

    Every replacement is counted twice (the leaving and the entering expert), so callers halve it (Eq. 5).
    ``validate=False`` skips the id range check, which forces a device sync; only use it for ids that come
    straight from ``topk`` (as the training loss does).
    """
    _check_selected(selected_BTK, num_experts, check_range=validate)
    B, T, _ = selected_BTK.shape
    member_BTE = torch.zeros(B, T, num_experts, dtype=torch.int8, device=selected_BTK.device)
    # scatter (not one_hot) keeps membership a set: a repeated id in one token counts once.
    member_BTE.scatter_(-1, selected_BTK.long(), 1)
    return (member_BTE[:, 1:] - member_BTE[:, :-1]).abs().sum(dtype=torch.int64)


def replacement_fraction(selected_BTK: torch.Tensor, num_experts: int, *, validate: bool = True) -> torch.Tensor:
    """Eq. 5 as a 0-d fp32 tensor without gradient: floor(H/2) / (B·K·(T−1)); 0 when T == 1 (nothing to replace)."""
    H = count_replacements(selected_BTK, num_experts, validate=validate)
    B, T, K = selected_BTK.shape
    if T < 2:
        return torch.zeros((), dtype=torch.float32, device=selected_BTK.device)
    return torch.div(H, 2, rounding_mode="floor").float() / (B * K * (T - 1))


def expert_replacement_rate(selected_BTK: torch.Tensor, num_experts: int) -> float:
    """ExRep (§3.3, Eq. 4–5): the share of expert slots replaced between consecutive tokens, in [0, 1].

    floor(H/2) / (B·K·(T−1)) with H from ``count_replacements``. A constant selection gives 0; consecutive tokens
    with disjoint expert sets give 1. Multiply by 100 for the percentages of Table 3. 0.0 when T == 1.
    """
    return float(replacement_fraction(selected_BTK, num_experts))


def expert_shares(selected_BTK: torch.Tensor, num_experts: int, *, validate: bool = True) -> torch.Tensor:
    """Per sequence, the share of its K·T expert slots that went to each expert: (B, E) fp32, rows sum to 1.

    ``validate`` as in ``count_replacements``.
    """
    _check_selected(selected_BTK, num_experts, check_range=validate)
    B, T, K = selected_BTK.shape
    ids_BN = selected_BTK.reshape(B, T * K).long()
    counts_BE = torch.zeros(B, num_experts, dtype=torch.float32, device=selected_BTK.device)
    counts_BE.scatter_add_(1, ids_BN, torch.ones_like(ids_BN, dtype=torch.float32))
    return counts_BE / (T * K)


def delta_uniform(selected_BTK: torch.Tensor, num_experts: int) -> float:
    """ΔUni (§3.3, Table 3): mean absolute gap between the realised expert distribution and the uniform one.

    p_e = share of all B·T·K selected slots that went to expert e (Σ_e p_e = 1), and
    ΔUni = (1/E) · Σ_e |p_e − 1/E|, a fraction (×100 for the percent of Table 3).
    0 means perfectly balanced; full collapse onto K experts gives 2·(E−K)/E² (e.g. 0.1875 for E=8, K=2).
    The paper only says "the per-layer delta between the uniform distribution and the realized expert balance";
    this reading is chosen because it reproduces its scale: the Fig. 5 top routing (35 tokens, k=2 of 8, one
    expert active on every token) gives about 10.7 %, next to the 9.60 / 9.67 % of Table 3.
    """
    p_E = expert_shares(selected_BTK, num_experts).mean(dim=0)  # equal-length sequences: mean of shares = pooled share
    return float((p_E - 1.0 / num_experts).abs().mean())


def routing_stats(selected_per_layer: Sequence[torch.Tensor], num_experts: int) -> dict:
    """ExRep and ΔUni of every MoE layer and their means over layers (the "average per-layer" numbers of §3.3).

    Returns ``{"exrep_per_layer": [...], "exrep_mean": x, "delta_uniform_per_layer": [...],
    "delta_uniform_mean": x}``, all fractions in [0, 1].
    """
    if isinstance(selected_per_layer, torch.Tensor) or len(selected_per_layer) == 0:
        raise CosmoesError("routing_stats needs a non-empty list of (B, T, K) expert-id tensors, one per MoE layer")
    exrep = [expert_replacement_rate(sel_BTK, num_experts) for sel_BTK in selected_per_layer]
    delta = [delta_uniform(sel_BTK, num_experts) for sel_BTK in selected_per_layer]
    return {
        "exrep_per_layer": exrep,
        "exrep_mean": sum(exrep) / len(exrep),
        "delta_uniform_per_layer": delta,
        "delta_uniform_mean": sum(delta) / len(delta),
    }


def _check_logits(router_logits_BTE: torch.Tensor) -> None:
    if not isinstance(router_logits_BTE, torch.Tensor) or router_logits_BTE.dim() != 3:
        is_tensor = isinstance(router_logits_BTE, torch.Tensor)
        shape = tuple(router_logits_BTE.shape) if is_tensor else type(router_logits_BTE).__name__
        raise CosmoesError(f"router logits must be a (batch, tokens, experts) tensor, got {shape}")
    if not router_logits_BTE.is_floating_point():
        raise CosmoesError(f"router logits must be floating point, got {router_logits_BTE.dtype}")
    if min(router_logits_BTE.shape) == 0:
        raise CosmoesError(f"router logits are empty: shape {tuple(router_logits_BTE.shape)}")


def _check_top_k(top_k: int, num_experts: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise CosmoesError(f"top_k must be between 1 and num_experts ({num_experts}), got {top_k}")


def _check_selected(selected_BTK: torch.Tensor, num_experts: int, *, check_range: bool) -> None:
    if not isinstance(selected_BTK, torch.Tensor) or selected_BTK.dim() != 3:
        shape = tuple(selected_BTK.shape) if isinstance(selected_BTK, torch.Tensor) else type(selected_BTK).__name__
        raise CosmoesError(f"selected experts must be a (batch, tokens, top_k) tensor of ids, got {shape}")
    if selected_BTK.is_floating_point() or selected_BTK.is_complex() or selected_BTK.dtype == torch.bool:
        raise CosmoesError(f"selected experts must be integer ids, got {selected_BTK.dtype}")
    if num_experts < 1:
        raise CosmoesError(f"num_experts must be positive, got {num_experts}")
    if min(selected_BTK.shape) == 0:
        raise CosmoesError(f"selected experts are empty: shape {tuple(selected_BTK.shape)}")
    if check_range:
        lo, hi = int(selected_BTK.min()), int(selected_BTK.max())
        if lo < 0 or hi >= num_experts:
            raise CosmoesError(f"expert ids must lie in [0, {num_experts}), got ids from {lo} to {hi}")
