"""Bundles of models with fewer kv heads than query heads: multi-query (n_kv_heads=1) and grouped-query attention
decode the eager model's greedy tokens in both runtimes.

Regression: with one kv head, `cache[:, :, positions] = k` traced to an index_put_ whose values had lost their
leading size-1 head dim (Python's setitem drops it), and ExecuTorch's index_put_ kernel failed an ET_CHECK on the
first token. One layer and two experts keep each export to six methods (30-60 s per bundle on 2 cores); the
graph check at the top needs no lowering and runs in seconds.
"""

import shutil

import pytest
import torch

from cosmoes.checkpoint import save_checkpoint
from cosmoes.config import ModelConfig
from cosmoes.eval.verify import eager_greedy
from cosmoes.export.bundle import ExportConfig, export_bundle
from cosmoes.export.lower import export_stage
from cosmoes.export.transforms import split_model
from cosmoes.model import Transformer, init_weights
from cosmoes.runtime.python import BundleRuntime

CHUNK = 4  # below the prompt length: prefill runs in several calls before the decode steps


def _model(kv_heads: int) -> Transformer:
    cfg = ModelConfig(vocab_size=256, dim=64, n_layers=1, n_heads=4, n_kv_heads=kv_heads, ffn_dim=64, num_experts=2,
                      top_k=1, max_seq_len=32, name=f"kv{kv_heads}-moe")
    return init_weights(Transformer(cfg), seed=kv_heads).eval()


@torch.no_grad()
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_kv_cache_writes_keep_the_head_dim(kv_heads):
    """The exported cache writes take values of the cache's own rank (no broadcasting left to the runtime kernel)."""
    stage = next(s for s in split_model(_model(kv_heads), max_chunk=CHUNK) if s.name == "layer_0")
    writes = [n for n in export_stage(stage).graph.nodes if n.target == torch.ops.aten.index_put_.default]
    assert len(writes) == 2  # keys and values
    for node in writes:
        cache, values = node.args[0].meta["val"], node.args[2].meta["val"]
        assert values.dim() == cache.dim() == 3 and values.shape[0] == kv_heads


@pytest.fixture(scope="module", params=[1, 2], ids=["mqa", "gqa-2-of-4"])
def kv_bundle(request, tmp_path_factory):
    model = _model(request.param)
    root = tmp_path_factory.mktemp(f"kv{request.param}")
    export_bundle(save_checkpoint(model, root / "ckpt"), root / "bundle",
                  ExportConfig(target="host", quant="none", max_chunk=CHUNK))
    return model, root / "bundle"


def _prompt(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (10,), generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
@torch.no_grad()
def test_python_runtime_greedy_matches_eager(kv_bundle):
    model, bundle = kv_bundle
    prompt_T = _prompt(model.config.vocab_size)
    assert BundleRuntime(bundle, policy="swap").generate(prompt_T, 12) == eager_greedy(model, prompt_T, 12)


@pytest.mark.slow
@torch.no_grad()
def test_native_runner_greedy_matches_eager(kv_bundle):
    from cosmoes.runtime.native import build_runner, generate_native

    if shutil.which("cmake") is None:  # the Python runtime test still covers the bundle
        pytest.skip("no cmake: the native runner cannot be built here")
    build_runner()  # once per runner source (shared with tests/runtime/test_native.py)
    model, bundle = kv_bundle
    prompt_T = _prompt(model.config.vocab_size)
    got = generate_native(bundle, prompt_T.tolist(), 12, policy="swap", threads=1).tokens
    assert got == eager_greedy(model, prompt_T, 12)
