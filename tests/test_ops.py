"""The graph operators' native kernels (export/runtime/ops.cpp, run by ExecuTorch after cosmoes.runtime.native.load_ops
registers them) against their torch references: cosmoes::cached_attention over the cache in place (fp32 and fp16
caches, grouped heads, prefill chunks that start mid-cache), cosmoes::int4_linear bit for bit."""

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
    return _execute(module, q, bias)


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


class _Project(torch.nn.Module):
    def __init__(self, out: int, inp: int, group: int):
        super().__init__()
        from cosmoes.ops import Int4Linear

        self.linear = Int4Linear(torch.randn(out, inp, generator=torch.Generator().manual_seed(4)), group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _execute(module, *inputs):
    from executorch.exir import to_edge
    from executorch.runtime import Runtime

    from cosmoes.runtime.native import load_ops

    load_ops()
    program = to_edge(torch.export.export(module, inputs)).to_executorch()
    return Runtime.get().load_program(program.buffer).load_method("forward").execute(list(inputs))[0]


@pytest.mark.parametrize("out,inp,group,lead", [(37, 70, 32, (1, 1)), (300, 128, 64, (1, 5)), (16, 32, 32, (3,))])
def test_native_int4_linear_gives_the_references_bits(out, inp, group, lead):
    from cosmoes import int4

    module = _Project(out, inp, group)
    x = torch.randn(*lead, inp, generator=torch.Generator().manual_seed(5))
    got = _execute(module, x)
    lin = module.linear
    want = int4.linear(x.reshape(-1, inp), int4.PackedLinear(lin.nibbles, lin.scales, inp, out, group))
    assert got.shape == (*lead, out)
    assert torch.equal(got.reshape(-1, out), want)  # the same bits: both runtimes pick the same tokens
