"""cosmoes.export.transforms: the export-time attention over the static KV cache against the eager model (with and
without grouped-query heads), and that a layer stage exports with a dynamic token count."""

import pytest
import torch

from cosmoes.config import ModelConfig
from cosmoes.export.lower import export_stage
from cosmoes.export.transforms import LayerStage, split_model
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
    got = [stage(h_1TD[:, :6], torch.tensor([0]))[0]]  # a 6-token prefill, then three decode steps
    got += [stage(h_1TD[:, t:t + 1], torch.tensor([t]))[0] for t in range(6, 9)]
    assert torch.allclose(torch.cat(got, dim=1), ref, atol=1e-5)


@torch.no_grad()
def test_gqa_layer_stage_exports_with_dynamic_tokens():
    model = _model(kv_heads=2)
    stage = next(s for s in split_model(model, max_chunk=16) if s.name == "layer_0")
    exported = export_stage(stage).module()
    fresh = LayerStage(model, 0)
    h_1TD = torch.randn(1, 7, model.config.dim, generator=torch.Generator().manual_seed(3))
    for start, stop in ((0, 5), (5, 6), (6, 7)):  # token counts other than the example's, same cache
        got = exported(h_1TD[:, start:stop], torch.tensor([start]))
        want = fresh(h_1TD[:, start:stop], torch.tensor([start]))
        assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want))
