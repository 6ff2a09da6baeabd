"""benchmarks/gguf_peer.py: the GGUF of a checkpoint holds llama.cpp's tensors at Q4_0 / q8_0, rows padded to 32."""

import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from gguf_peer import write_gguf, write_model_gguf  # noqa: E402

from cosmoes.checkpoint import load_model  # noqa: E402


def test_gguf_holds_every_weight_at_its_llama_cpp_type(micro_checkpoint, micro_config, tmp_path):
    cfg = micro_config
    info = write_gguf(str(micro_checkpoint), tmp_path / "m.gguf")
    reader = gguf.GGUFReader(info["path"])
    tensors = {t.name: t for t in reader.tensors}
    per_layer = ["attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp",
                 "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(cfg.n_layers) for n in per_layer}
    Q = gguf.GGMLQuantizationType
    assert tensors["token_embd.weight"].tensor_type == Q.Q8_0 and tensors["output.weight"].tensor_type == Q.Q4_0
    assert tensors["blk.0.ffn_gate_exps.weight"].tensor_type == Q.Q4_0
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == Q.F32  # the router stays fp32, as in the bundle
    assert list(tensors["blk.1.ffn_down_exps.weight"].shape) == [cfg.ffn_dim, cfg.dim, cfg.num_experts]
    field = reader.get_field("llama.expert_used_count")
    assert int(field.parts[field.data[0]][0]) == cfg.top_k
    # q8_0 keeps the embedding to within one step of its per-block scale
    emb = load_model(micro_checkpoint).tok_embeddings.weight.detach().numpy()
    back = gguf.quants.dequantize(tensors["token_embd.weight"].data, Q.Q8_0).reshape(emb.shape)
    step = np.abs(emb).reshape(-1, 32).max(axis=1) / 127
    assert np.all(np.abs(back - emb).reshape(-1, 32) <= step[:, None] * 0.51 + 1e-3)
    assert info["bytes"] == Path(info["path"]).stat().st_size


def test_widths_that_32_does_not_divide_are_padded_with_zeros(tmp_path):
    from cosmoes.config import ModelConfig

    cfg = ModelConfig(vocab_size=512, dim=48, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=80, num_experts=2,
                      top_k=1, max_seq_len=32, name="odd")
    from cosmoes.model import Transformer

    info = write_model_gguf(Transformer(cfg), tmp_path / "odd.gguf")
    assert info["dim"] == 64 and info["head_dim"] == 16  # 4 heads x 12 -> x 16, so q/k/v rows stay whole blocks
    reader = gguf.GGUFReader(info["path"])
    shapes = {t.name: list(t.shape) for t in reader.tensors}
    assert shapes["blk.0.attn_k.weight"] == [64, 2 * 16] and shapes["blk.0.ffn_up_exps.weight"] == [64, 96, 2]
