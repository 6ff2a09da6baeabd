"""Router auxiliary losses: the block-wise expert selection (BlES) loss (§2.3, Eq. 2–7) and the sequence-level
Switch load-balancing loss the paper pairs it with (§2.3, Fig. 4).

Both take router logits shaped (B, T, E), one tensor per MoE layer as ``ModelOutput.router_logits`` returns
them; the ``*_layers`` helpers average over those layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cosmoes.errors import CosmoesError
from cosmoes.routing import expert_shares, replacement_fraction, router_probs, top_k_ids


def bles_loss(
    router_logits_BTE: torch.Tensor, top_k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block-wise expert selection loss of one MoE layer (Eq. 2–7); returns ``(loss, h_norm, l_norm)``.

    W = softmax(τ·R) in fp32 (Eq. 2), S = top-k of W (Eq. 3).
    h_norm = floor(H/2) / (B·K·(T−1)) with H the top-k membership changes between consecutive tokens (Eq. 4–5);
    it is a detached constant. l_norm = Σ_b Σ_{t<T} Σ_e |W[b,t+1,e] − W[b,t,e]| / (B·T) (Eq. 6) carries the
    gradient, and loss = h_norm · l_norm (Eq. 7): the hard replacement rate scales a soft, differentiable one.
    With T == 1 there are no consecutive tokens and all three are 0.
    """
    W_BTE = router_probs(router_logits_BTE, temperature)
    B, T, E = W_BTE.shape
    S_BTK = top_k_ids(W_BTE, top_k)
    # ids straight from topk are in range, so skip the validating device sync on every training step
    h_norm = replacement_fraction(S_BTK, E, validate=False)
    l_norm = (W_BTE[:, 1:] - W_BTE[:, :-1]).abs().sum() / (B * T)
    return h_norm * l_norm, h_norm, l_norm


def bles_loss_layers(
    router_logits_per_layer: Sequence[torch.Tensor], top_k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """BlES loss averaged over MoE layers: ``(mean loss, mean h_norm)`` for the model's per-layer router logits."""
    _check_layers(router_logits_per_layer, "bles_loss_layers")
    per_layer = [bles_loss(logits_BTE, top_k, temperature) for logits_BTE in router_logits_per_layer]
    loss = torch.stack([loss for loss, _, _ in per_layer]).mean()
    h_norm = torch.stack([h for _, h, _ in per_layer]).mean()
    return loss, h_norm


def load_balancing_loss(router_logits_BTE: torch.Tensor, top_k: int) -> torch.Tensor:
    """Sequence-level Switch load-balancing loss of one MoE layer (Fedus et al. 2022, per sequence as in §2.3).

    For each sequence b: E · Σ_e f[b,e] · P[b,e], where f[b,e] is the share of the sequence's K·T expert slots
    that went to e (Σ_e f = 1, no gradient) and P[b,e] the mean of softmax(R) (fp32, temperature 1) over its
    tokens. Averaged over sequences. Perfectly uniform routing gives 1.0, full collapse onto one expert (K=1) E.
    Balancing each sequence rather than the pooled batch stops sequences from specialising on whole experts,
    which the BlES loss would otherwise reward.
    """
    P_BTE = router_probs(router_logits_BTE, 1.0)
    E = P_BTE.shape[-1]
    f_BE = expert_shares(top_k_ids(P_BTE, top_k), E, validate=False)
    P_BE = P_BTE.mean(dim=1)
    return (E * (f_BE * P_BE).sum(dim=-1)).mean()


def load_balancing_loss_layers(router_logits_per_layer: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """Load-balancing loss applied per MoE layer and averaged: a model-level balance can be gamed (Fig. 4)."""
    _check_layers(router_logits_per_layer, "load_balancing_loss_layers")
    return torch.stack([load_balancing_loss(logits_BTE, top_k) for logits_BTE in router_logits_per_layer]).mean()


def _check_layers(router_logits_per_layer: Sequence[torch.Tensor], name: str) -> None:
    # A bare (B, T, E) tensor would silently be iterated over its batch axis.
    if isinstance(router_logits_per_layer, torch.Tensor) or not isinstance(router_logits_per_layer, (list, tuple)):
        raise CosmoesError(f"{name} needs a list or tuple of (B, T, E) router logits, one per MoE layer")
    if len(router_logits_per_layer) == 0:
        raise CosmoesError(f"{name} got no router logits: the model has no MoE layers")
