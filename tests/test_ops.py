"""cosmoes::cached_attention: the native kernel (export/runtime/attention.cpp, run by ExecuTorch after
cosmoes.runtime.native.load_ops registers it) computes the torch reference's attention over the cache in place, for
fp32 and fp16 caches, grouped heads, and prefill chunks that start mid-cache."""

import math

import pytest
import torch

from cosmoes.ops import cached_attention_reference


class _Attend(torch.nn.Module):
    def __init__(self, kv: int, S: int, d: int, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("k_cache", torch.randn(kv, S, d, generator=torch.Generator().manual_seed(1)).to(dtype))
        self.register_buffer("v_cache", torch.randn(kv, S, d, generator=torch.Generator().manual_seed(2)).to(dtype))

    def forward(self, q_1HTd: torch.Tensor, bias_TL: torch.Tensor) -> torch.Tensor:
        return torch.ops.cosmoes.cached_attention(q_1HTd, self.k_cache, self.v_cache, bias_TL.shape[1])


def _run_exported(module, q, bias):
    from executorch.exir import to_edge
    from executorch.runtime import Runtime

    from cosmoes.runtime.native import load_ops

    load_ops()
    ep = torch.export.export(module, (q, bias))
    program = to_edge(ep).to_executorch()
    loaded = Runtime.get().load_program(program.buffer)
    return loaded.load_method("forward").execute([q, bias])[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H,kv,T,L", [(4, 2, 1, 9), (4, 4, 5, 12), (6, 2, 3, 3)])
def test_native_kernel_matches_the_reference(dtype, H, kv, T, L):
    S, d = 16, 20  # d not a multiple of the kernel's 8 lanes: the tail is summed too
    module = _Attend(kv, S, d, dtype)
    q = torch.randn(1, H, T, d, generator=torch.Generator().manual_seed(3))
    bias = torch.zeros(T, L)
    got = _run_exported(module, q, bias)
    want = cached_attention_reference(q, module.k_cache, module.v_cache, L)
    assert got.shape == (1, T, H * d)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_the_reference_is_causal_scaled_attention_over_the_used_slots():
    H, kv, T, L, S, d = 2, 1, 2, 3, 5, 4
    q = torch.randn(1, H, T, d)
    k, v = torch.randn(kv, S, d), torch.randn(kv, S, d)
    out = cached_attention_reference(q, k, v, L)
    # token 0 sits at position L - T = 1 and sees slots 0..1; token 1 sees 0..2; slots 3.. are never read
    for h in range(H):
        for t, seen in ((0, 2), (1, 3)):
            w = torch.softmax(q[0, h, t] @ k[0, :seen].T / math.sqrt(d), dim=-1)
            torch.testing.assert_close(out[0, t, h * d:(h + 1) * d], w @ v[0, :seen])
