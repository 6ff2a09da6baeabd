"""cosmoes.export.transforms: the export-time attention over the static KV cache against the eager model (with and
without grouped-query heads), and that a layer stage exports with dynamic token and context counts."""

import pytest
import torch

from cosmoes.config import ModelConfig
from cosmoes.export.lower import export_stage
from cosmoes.export.transforms import ContextStage, LayerStage, causal_bias, split_model
from cosmoes.model import Transformer, causal_mask, init_weights, rope_cos_sin


def _model(kv_heads: int) -> Transformer:
    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=kv_heads, ffn_dim=64, num_experts=4,
                      top_k=2, max_seq_len=32, name="attn-test")
    return init_weights(Transformer(cfg), seed=0).eval()


@torch.no_grad()
@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA with 2 query heads per kv head, MQA
def test_layer_stage_matches_eager_attention_over_prefill_and_decode(kv_heads):
    model = _model(kv_heads)
    stage, block, cfg = LayerStage(model, 0), model.layers[0], model.config
    h_1TD = torch.randn(1, 9, cfg.dim, generator=torch.Generator().manual_seed(kv_heads))
    pos = torch.arange(9)[None]
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta)
    ref = h_1TD + block.attention(block.attention_norm(h_1TD), cos, sin, causal_mask(pos, 9, None))
    context = ContextStage(model)
    # a 6-token prefill, then three decode steps; each call attends over the L = stop slots in use
    got = [stage(h_1TD[:, start:stop], *context(torch.arange(start, stop), torch.arange(stop)))[0]
           for start, stop in ((0, 6), (6, 7), (7, 8), (8, 9))]
    assert torch.allclose(torch.cat(got, dim=1), ref, atol=1e-5)


def test_causal_bias_lets_each_query_see_its_own_and_earlier_positions():
    bias = causal_bias(torch.tensor([2, 3]), torch.arange(4))
    inf = float("-inf")
    assert torch.equal(bias, torch.tensor([[0.0, 0.0, 0.0, inf], [0.0, 0.0, 0.0, 0.0]]))


@torch.no_grad()
def test_gqa_layer_stage_exports_with_dynamic_tokens():
    model = _model(kv_heads=2)
    stages = {s.name: s for s in split_model(model, max_chunk=16)}
    layer, context = export_stage(stages["layer_0"]).module(), export_stage(stages["context"]).module()
    fresh = LayerStage(model, 0)
    h_1TD = torch.randn(1, 32, model.config.dim, generator=torch.Generator().manual_seed(3))
    # token and context counts other than the example's (up to the full max_seq_len = 32), same cache
    for start, stop in ((0, 5), (5, 6), (6, 7), (7, 23), (23, 31), (31, 32)):
        ctx = context(torch.arange(start, stop), torch.arange(stop))
        got = layer(h_1TD[:, start:stop], *ctx)
        want = fresh(h_1TD[:, start:stop], *ContextStage(model)(torch.arange(start, stop), torch.arange(stop)))
        assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want))


@torch.no_grad()
def test_fused_qkv_layer_gives_the_three_projections_results():
    from cosmoes.export.transforms import fuse_qkv

    model = _model(kv_heads=2)
    h_1TD = torch.randn(1, 5, model.config.dim, generator=torch.Generator().manual_seed(4))
    ctx = ContextStage(model)(torch.arange(0, 5), torch.arange(5))
    want = LayerStage(model, 0)(h_1TD, *ctx)
    fuse_qkv(model)
    attention = model.layers[0].attention
    assert not hasattr(attention, "wq") and attention.wqkv.weight.shape == (4 * 16 + 2 * 2 * 16, 64)
    got = LayerStage(model, 0)(h_1TD, *ctx)
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want))


@torch.no_grad()
def test_a_moe_layer_stage_also_returns_the_next_layers_router_on_its_residual_stream():
    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, num_experts=4, top_k=2,
                      max_seq_len=32, name="ahead-test")
    model = init_weights(Transformer(cfg), seed=1).eval()
    h_1TD = torch.randn(1, 5, cfg.dim, generator=torch.Generator().manual_seed(5))
    ctx = ContextStage(model)(torch.arange(0, 5), torch.arange(5))
    for i in (0, 1):
        h, x, scores, ahead = LayerStage(model, i)(h_1TD, *ctx)
        nxt = model.layers[i + 1]
        assert torch.allclose(ahead, nxt.feed_forward.router(nxt.ffn_norm(h)), atol=1e-6)
        assert torch.allclose(scores, model.layers[i].feed_forward.router(x), atol=1e-6)
    assert len(LayerStage(model, 2)(h_1TD, *ctx)) == 3  # the last layer has no next one
