"""Suite-wide test settings, and the micro checkpoint and bundles shared by the export, bench and eval tests.

Exporting costs ~4 s per method on a 2-core machine, so every test that needs a bundle shares these (built once per
session). The micro model keeps the shipped tokenizer's 8192-token vocabulary so bundles can be driven with text.
"""

import pytest
import torch

from cosmoes.config import ModelConfig


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    # The tests run micro models: a second intra-op thread only adds wake-ups (index_add_ in the MoE dispatch takes
    # milliseconds per call on a busy 2-core machine), so the whole suite runs with one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MICRO = ModelConfig(vocab_size=8192, dim=64, n_layers=2, n_heads=2, ffn_dim=128, num_experts=4, top_k=2,
                    max_seq_len=64, name="micro-moe")
MICRO_CHUNK = 16  # tokens per call: small so prompts longer than a chunk exercise chunked prefill


@pytest.fixture(scope="session")
def micro_config() -> ModelConfig:
    return MICRO.replace()


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory):
    """A randomly initialised micro MoE checkpoint (seed 0) with the shipped tokenizer."""
    from cosmoes.checkpoint import save_checkpoint
    from cosmoes.model import Transformer, init_weights
    from cosmoes.tokenizer import default_tokenizer

    model = init_weights(Transformer(MICRO.replace()), seed=0)
    return save_checkpoint(model, tmp_path_factory.mktemp("micro") / "ckpt", tokenizer=default_tokenizer())


def _export(checkpoint, out, quant: str):
    from cosmoes.export.bundle import ExportConfig, export_bundle

    export_bundle(checkpoint, out, ExportConfig(target="host", quant=quant, max_chunk=MICRO_CHUNK))
    return out


@pytest.fixture(scope="session")
def micro_bundle_fp32(micro_checkpoint, tmp_path_factory):
    """The micro checkpoint exported without quantisation (matches eager to ~1e-6)."""
    return _export(micro_checkpoint, tmp_path_factory.mktemp("bundles") / "micro-fp32", "none")


@pytest.fixture(scope="session")
def micro_bundle_8da4w(micro_checkpoint, tmp_path_factory):
    """The micro checkpoint exported with 8-bit dynamic activations and 4-bit group-wise weights."""
    return _export(micro_checkpoint, tmp_path_factory.mktemp("bundles") / "micro-8da4w", "8da4w")


MICRO_WD = MICRO.replace(n_layers=1, wd_rank=16, name="micro-wd")  # one layer: the export cost is per method


@pytest.fixture(scope="session")
def micro_wd_checkpoint(tmp_path_factory):
    """A randomly initialised micro weight-decomposed MoE checkpoint (seed 0) with the shipped tokenizer."""
    from cosmoes.checkpoint import save_checkpoint
    from cosmoes.model import Transformer, init_weights
    from cosmoes.tokenizer import default_tokenizer

    model = init_weights(Transformer(MICRO_WD.replace()), seed=0)
    return save_checkpoint(model, tmp_path_factory.mktemp("micro-wd") / "ckpt", tokenizer=default_tokenizer())


@pytest.fixture(scope="session")
def micro_bundle_wd_fp32(micro_wd_checkpoint, tmp_path_factory):
    """The micro WD checkpoint exported without quantisation (low-rank expert linears, one method per expert)."""
    return _export(micro_wd_checkpoint, tmp_path_factory.mktemp("bundles") / "micro-wd-fp32", "none")
