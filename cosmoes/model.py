"""The CoSMoEs decoder: Llama-3 blocks whose FFN is dense SwiGLU or a token-choice sparse MoE (§2.1–2.2).

Single-device and plain PyTorch. Weight names follow Llama (``layers.3.attention.wq``) and every expert is
its own module (``layers.3.feed_forward.experts.5.w1``) so a weight's name says its layer and expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cosmoes.config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / RMS(x) over the last dim (also the reference of the export's cosmoes::rms_norm)."""
    # Normalise in fp32 (as Llama/transformers do) so bf16 training and fp32 interop agree.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_cos_sin(positions_BT: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, T, head_dim) in the rotate-half layout used by transformers' Llama."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions_BT.device).float() / head_dim))
    freqs_BTF = positions_BT.float()[..., None] * inv_freq
    emb = torch.cat([freqs_BTF, freqs_BTF], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x_BHTd: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor) -> torch.Tensor:
    half = x_BHTd.shape[-1] // 2
    rotated = torch.cat([-x_BHTd[..., half:], x_BHTd[..., :half]], dim=-1)
    cos, sin = cos_BTd[:, None].to(x_BHTd.dtype), sin_BTd[:, None].to(x_BHTd.dtype)
    return x_BHTd * cos + rotated * sin


class Attention(nn.Module):
    """Grouped-query attention with RoPE; an optional cache object supplies past keys and values."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def project(self, x_BTD, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, d) and keys/values (B, H_kv, T, d), RoPE applied to queries and keys."""
        B, T, _ = x_BTD.shape
        q = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x_BTD).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x_BTD).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x_BTD, cos, sin, mask_B1TS, cache=None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q, k, v = self.project(x_BTD, cos, sin)
        if cache is not None:
            # Duck-typed: transformers' Cache objects and our own share `update(k, v, layer_idx)`.
            k, v = cache.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1TS,
                                             enable_gqa=self.kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class LowRankLinear(nn.Module):
    """A weight-decomposed matrix (Eq. 1): W (out x in) ~ up (out x r) . down (r x in)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def _linear(in_features: int, out_features: int, rank: int | None) -> nn.Module:
    if rank is None:
        return nn.Linear(in_features, out_features, bias=False)
    return LowRankLinear(in_features, out_features, rank)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). Used as the dense FFN and as each expert."""

    def __init__(self, dim: int, hidden: int, rank: int | None = None):
        super().__init__()
        self.w1 = _linear(dim, hidden, rank)
        self.w2 = _linear(hidden, dim, rank)
        self.w3 = _linear(dim, hidden, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def route(scores_TE: torch.Tensor, top_k: int, temperature: float, renormalize: bool):
    """Token-choice routing: W = softmax(tau * R) in fp32, then the top-k experts and their weights."""
    probs_TE = torch.softmax(scores_TE.float() * temperature, dim=-1)
    weights_TK, experts_TK = torch.topk(probs_TE, top_k, dim=-1)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, experts_TK


class MoEFeedForward(nn.Module):
    """Sparse MoE FFN: a bias-free router and ``num_experts`` SwiGLU experts, top-k per token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.temperature, self.renormalize = cfg.top_k, cfg.router_temperature, cfg.norm_topk_prob
        self.router = nn.Linear(cfg.dim, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(cfg.dim, cfg.ffn_dim, cfg.wd_rank) for _ in range(cfg.num_experts))

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(-1, D)
        scores_TE = self.router(x_TD)
        weights_TK, experts_TK = route(scores_TE, self.top_k, self.temperature, self.renormalize)
        out_TD = torch.zeros_like(x_TD)
        # One batched call per expert over the tokens routed to it (never a loop over tokens). When training, an
        # expert with no tokens still runs on zero rows so that its weights get a (zero) gradient on every
        # data-parallel rank and FSDP's collectives stay in step; at inference it is skipped (quantised kernels
        # reject empty inputs).
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(experts_TK == e)
            if token_idx.numel() == 0 and not torch.is_grad_enabled():
                continue
            w_N1 = weights_TK[token_idx, slot, None].to(x_TD.dtype)
            out_TD.index_add_(0, token_idx, expert(x_TD[token_idx]) * w_N1)
        return out_TD.view(B, T, D), scores_TE.view(B, T, -1)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attention = Attention(cfg, layer_idx)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = MoEFeedForward(cfg) if cfg.is_moe else FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cos, sin, mask, cache=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        ff = self.feed_forward(self.ffn_norm(h))
        if isinstance(ff, tuple):
            ff, router_logits = ff
            return h + ff, router_logits
        return h + ff, None


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, vocab)
    router_logits: tuple[torch.Tensor, ...]  # one (B, T, E) tensor per MoE layer; empty when dense
    hidden_states: torch.Tensor | None = None


def causal_mask(slots_BT: torch.Tensor, key_len: int, attention_mask_BS: torch.Tensor | None) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask: the query in cache slot s sees slots 0..s that are not padding."""
    key_slot_S = torch.arange(key_len, device=slots_BT.device)
    allowed = key_slot_S[None, None, :] <= slots_BT[:, :, None]
    if attention_mask_BS is not None:
        allowed = allowed & attention_mask_BS[:, None, -key_len:].bool()
        # A padding query would otherwise see no key at all and turn into NaN.
        allowed = allowed | (key_slot_S[None, None, :] == slots_BT[:, :, None])
    return allowed[:, None]


class Transformer(nn.Module):
    """Token ids -> logits (+ router logits of every MoE layer)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, input_ids_BT: torch.Tensor, positions_BT: torch.Tensor | None = None, cache=None,
                attention_mask_BS: torch.Tensor | None = None) -> ModelOutput:
        B, T = input_ids_BT.shape
        past = cache.get_seq_length() if cache is not None else 0
        slots_BT = torch.arange(past, past + T, device=input_ids_BT.device).expand(B, T)
        if positions_BT is None:
            positions_BT = slots_BT
        # Causality is over cache slots; RoPE uses positions (they differ under left padding).
        mask = causal_mask(slots_BT, past + T, attention_mask_BS)
        cos, sin = rope_cos_sin(positions_BT, self.config.head_dim, self.config.rope_theta)
        h = self.tok_embeddings(input_ids_BT)
        router_logits = []
        for layer in self.layers:
            h, logits = layer(h, cos, sin, mask, cache)
            if logits is not None:
                router_logits.append(logits)
        h = self.norm(h)
        return ModelOutput(self.output(h), tuple(router_logits), h)

    def num_params(self, active: bool = False) -> int:
        """Counted from the built modules: active keeps top-k of each MoE layer's experts."""
        total = sum(p.numel() for p in self.parameters())
        if not active or not self.config.is_moe:
            return total
        per_expert = sum(p.numel() for p in self.layers[0].feed_forward.experts[0].parameters())
        idle = self.config.num_experts - self.config.top_k
        return total - idle * per_expert * len(self.layers)


def init_weights(model: Transformer, seed: int | None = None, std: float = 0.02) -> Transformer:
    """Normal(0, std) linears/embeddings, ones for norms; output projections scaled by depth (GPT-2)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    depth_std = std / (2 * model.config.n_layers) ** 0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                s = depth_std if name.endswith(("wo.weight", "w2.weight", "w2.up.weight")) else std
                p.copy_(torch.randn(p.shape, generator=gen) * s)
    return model
