"""cosmoes.model: MoE layer against a per-token reference, weight names and shapes (experts, WD, GQA), causality,
KV-cache decoding with transformers' DynamicCache, router logits, renormalisation and tied embeddings."""

import pytest
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from cosmoes.config import PRESETS, get_preset
from cosmoes.model import LowRankLinear, MoEFeedForward, Transformer, init_weights


def build(preset: str, seed: int = 0, **changes) -> Transformer:
    return init_weights(Transformer(get_preset(preset).replace(**changes)), seed=seed).eval()


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 8192, (batch, length), generator=torch.Generator().manual_seed(seed))


def naive_moe(layer: MoEFeedForward, x_TD: torch.Tensor, top_k: int, temperature: float, renormalize: bool):
    """One token at a time: softmax(τ·router(x)), the k largest probabilities, optional renormalisation, and the
    weighted sum of the chosen experts' SwiGLU outputs."""
    out = []
    for x_D in x_TD:
        probs_E = torch.softmax(layer.router(x_D).double() * temperature, dim=-1)
        chosen = sorted(range(len(probs_E)), key=lambda e: -probs_E[e].item())[:top_k]
        weights = [probs_E[e] for e in chosen]
        if renormalize:
            total = sum(weights)
            weights = [w / total for w in weights]
        y_D = torch.zeros_like(x_D)
        for e, w in zip(chosen, weights):
            expert = layer.experts[e]
            y_D = y_D + float(w) * expert.w2(F.silu(expert.w1(x_D)) * expert.w3(x_D))
        out.append(y_D)
    return torch.stack(out)


@pytest.mark.parametrize("preset,changes", [
    ("tiny-moe", {}), ("tiny-wd", {}), ("tiny-moe", {"norm_topk_prob": False}),
    ("tiny-moe", {"router_temperature": 0.5, "top_k": 3}), ("tiny-wd", {"top_k": 1, "norm_topk_prob": False}),
])
def test_moe_layer_equals_per_token_reference(preset, changes):
    cfg = get_preset(preset).replace(**changes)
    torch.manual_seed(0)
    layer = MoEFeedForward(cfg).eval()
    x_BTD = torch.randn(2, 12, cfg.dim)
    with torch.no_grad():
        out_BTD, scores_BTE = layer(x_BTD)
        want_TD = naive_moe(layer, x_BTD.reshape(-1, cfg.dim), cfg.top_k, cfg.router_temperature, cfg.norm_topk_prob)
    assert scores_BTE.shape == (2, 12, cfg.num_experts)
    torch.testing.assert_close(out_BTD.reshape(-1, cfg.dim), want_TD, atol=1e-5, rtol=1e-5)


def test_weight_names_say_layer_and_expert():
    cfg = get_preset("tiny-moe")
    weights = build("tiny-moe").state_dict()
    w1 = weights["layers.1.feed_forward.experts.5.w1.weight"]
    assert w1.shape == (cfg.ffn_dim, cfg.dim)
    assert weights["layers.1.feed_forward.experts.5.w2.weight"].shape == (cfg.dim, cfg.ffn_dim)
    assert weights["layers.3.feed_forward.router.weight"].shape == (cfg.num_experts, cfg.dim)
    expert_names = {k for k in weights if ".experts." in k}
    assert len(expert_names) == cfg.n_layers * cfg.num_experts * 3
    # every expert's tensor is its own (no shared storage between experts or layers)
    assert not torch.equal(w1, weights["layers.1.feed_forward.experts.4.w1.weight"])
    assert not torch.equal(w1, weights["layers.0.feed_forward.experts.5.w1.weight"])
    dense = build("tiny-dense").state_dict()
    assert dense["layers.2.feed_forward.w3.weight"].shape == (get_preset("tiny-dense").ffn_dim, 128)
    assert not any("experts" in k or "router" in k for k in dense)


def test_weight_decomposed_expert_names_and_shapes():
    cfg = get_preset("tiny-wd")
    r, dim, ffn = cfg.wd_rank, cfg.dim, cfg.ffn_dim
    weights = build("tiny-wd").state_dict()
    prefix = "layers.1.feed_forward.experts.5"
    assert weights[f"{prefix}.w1.down.weight"].shape == (r, dim)
    assert weights[f"{prefix}.w1.up.weight"].shape == (ffn, r)
    assert weights[f"{prefix}.w3.down.weight"].shape == (r, dim)
    assert weights[f"{prefix}.w3.up.weight"].shape == (ffn, r)
    assert weights[f"{prefix}.w2.down.weight"].shape == (r, ffn)
    assert weights[f"{prefix}.w2.up.weight"].shape == (dim, r)
    assert f"{prefix}.w1.weight" not in weights
    # attention and router stay full-rank
    assert weights["layers.1.attention.wq.weight"].shape == (dim, dim)
    assert weights["layers.1.feed_forward.router.weight"].shape == (cfg.num_experts, dim)


@pytest.mark.parametrize("name", [n for n, c in PRESETS.items() if c.is_wd])
def test_wd_presets_use_half_the_hidden_size_as_rank(name):
    # §2.2: "a decomposition of half the hidden dimension results in the best trade-off"
    cfg = get_preset(name)
    assert cfg.wd_rank == cfg.dim // 2
    with torch.device("meta"):
        expert = Transformer(cfg.replace(n_layers=1, vocab_size=16)).layers[0].feed_forward.experts[0]
    assert isinstance(expert.w1, LowRankLinear)
    assert expert.w1.down.weight.shape == (cfg.dim // 2, cfg.dim)
    assert expert.w1.up.weight.shape == (cfg.ffn_dim, cfg.dim // 2)


@pytest.mark.parametrize("name", ["tiny-moe", "phone-dense", "phone-dense-pa", "wearable-moe"])
def test_attention_projection_shapes_follow_kv_heads(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        attention = Transformer(cfg.replace(n_layers=1, vocab_size=16)).layers[0].attention
    assert attention.wq.weight.shape == (cfg.n_heads * cfg.head_dim, cfg.dim)
    assert attention.wk.weight.shape == attention.wv.weight.shape == (cfg.kv_heads * cfg.head_dim, cfg.dim)
    assert attention.wo.weight.shape == (cfg.dim, cfg.n_heads * cfg.head_dim)
    if name.startswith("phone-dense"):  # Llama-3.2 style GQA with 8 kv heads
        assert cfg.kv_heads == 8 < cfg.n_heads


def test_gqa_cache_holds_kv_heads_only():
    cfg = get_preset("tiny-moe")
    assert cfg.kv_heads < cfg.n_heads
    cache = DynamicCache()
    with torch.no_grad():
        build("tiny-moe")(ids(2, 7), cache=cache)
    assert cache.get_seq_length() == 7
    assert cache.layers[0].keys.shape == (2, cfg.kv_heads, 7, cfg.head_dim)
    assert cache.layers[cfg.n_layers - 1].values.shape == (2, cfg.kv_heads, 7, cfg.head_dim)


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-wd", "tiny-dense"])
def test_later_tokens_do_not_change_earlier_logits(preset):
    model = build(preset)
    x = ids(2, 16)
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 17) % 8192
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-wd", "tiny-dense"])
def test_incremental_decode_with_dynamic_cache_equals_full_forward(preset):
    model = build(preset)
    x = ids(2, 20)
    cache = DynamicCache()
    with torch.no_grad():
        full = model(x)
        steps = [model(x[:, :8], cache=cache)]  # prefill, then a 3-token chunk, then one token at a time
        steps.append(model(x[:, 8:11], cache=cache))
        steps += [model(x[:, t:t + 1], cache=cache) for t in range(11, 20)]
    assert cache.get_seq_length() == 20
    torch.testing.assert_close(torch.cat([s.logits for s in steps], dim=1), full.logits, atol=1e-5, rtol=1e-4)
    if full.router_logits:
        for layer, want in enumerate(full.router_logits):
            got = torch.cat([s.router_logits[layer] for s in steps], dim=1)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_router_logits_per_layer_are_the_routers_scores():
    model = build("tiny-moe")
    cfg = model.config
    seen = []
    hooks = [layer.feed_forward.router.register_forward_hook(lambda m, i, o: seen.append(o))
             for layer in model.layers]
    with torch.no_grad():
        out = model(ids(3, 11))
    for h in hooks:
        h.remove()
    assert out.logits.shape == (3, 11, cfg.vocab_size)
    assert len(out.router_logits) == cfg.n_layers
    for logits_BTE, scores_TE in zip(out.router_logits, seen):
        assert logits_BTE.shape == (3, 11, cfg.num_experts)
        assert torch.equal(logits_BTE.reshape(-1, cfg.num_experts), scores_TE)


def test_dense_model_returns_no_router_logits():
    out = build("tiny-dense")(ids(1, 5))
    assert out.router_logits == ()
    assert out.logits.shape == (1, 5, 8192)


def test_renormalize_off_changes_outputs():
    x = ids(2, 12)
    with torch.no_grad():
        on = build("tiny-moe", norm_topk_prob=True)(x).logits
        off = build("tiny-moe", norm_topk_prob=False)(x).logits
    assert not torch.allclose(on, off, atol=1e-4)
    # with top_k = num_experts the renormalised weights are the softmax itself: the switch is a no-op
    with torch.no_grad():
        on_all = build("tiny-moe", top_k=8, norm_topk_prob=True)(x).logits
        off_all = build("tiny-moe", top_k=8, norm_topk_prob=False)(x).logits
    torch.testing.assert_close(on_all, off_all, atol=1e-5, rtol=1e-5)


def test_tie_embeddings_shares_the_tensor():
    model = build("tiny-dense", tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    untied = build("tiny-dense")
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert untied.num_params() - model.num_params() == 8192 * 128
    # a gradient through the head lands on the embedding table, which is the same Parameter
    model.train()
    model(ids(1, 4)).logits.sum().backward()
    assert model.tok_embeddings.weight.grad is not None and model.tok_embeddings.weight.grad.abs().sum() > 0


def test_init_weights_is_seeded():
    a, b, c = build("tiny-wd", seed=3), build("tiny-wd", seed=3), build("tiny-wd", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["layers.0.feed_forward.experts.0.w1.down.weight"],
                           sc["layers.0.feed_forward.experts.0.w1.down.weight"])
    assert torch.equal(sa["layers.0.ffn_norm.weight"], torch.ones(128))
