"""The graph operators' native kernels (export/runtime/ops.cpp, run by ExecuTorch after cosmoes.runtime.native.load_ops
registers them) against their torch references: cosmoes::cached_attention over the cache in place (fp32 and fp16
caches, grouped heads, prefill chunks that start mid-cache), cosmoes::int4_linear and cosmoes::heads bit for bit,
cosmoes::rms_norm against the model's RMSNorm, cosmoes::fp32_linear against a double matmul; and that malformed arguments fail the call instead of reading memory."""

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
@pytest.mark.parametrize("H,kv,T,L", [(4, 2, 1, 9), (4, 4, 5, 12), (6, 2, 3, 3), (2, 1, 7, 43)])
def test_native_kernel_matches_the_reference(dtype, H, kv, T, L):
    # d not a multiple of the kernel's 8 lanes: the tail is summed too; rows are taken 4 at a time (L = 43: whole
    # blocks, then 1-3 left over, with the prefetch reaching past the last position read)
    S, d = 48, 20
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


class _Norm(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        from cosmoes.model import RMSNorm

        self.norm = RMSNorm(dim, 1e-5)
        self.norm.weight.data = torch.randn(dim, generator=torch.Generator().manual_seed(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.cosmoes.rms_norm(x, self.norm.weight, self.norm.eps)


@pytest.mark.parametrize("shape", [(1, 1, 432), (1, 7, 37), (5, 64)])
def test_native_rms_norm_matches_the_models_norm(shape):
    module = _Norm(shape[-1])
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(7)) * 3
    got = _execute(module, x)
    with torch.no_grad():
        want = module.norm(x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # the mean in double: within a rounding of torch's


class _Router(torch.nn.Module):
    def __init__(self, experts: int, dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(experts, dim, generator=torch.Generator().manual_seed(8)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.cosmoes.fp32_linear(x, self.weight)


@pytest.mark.parametrize("shape,experts", [((1, 1, 432), 8), ((1, 7, 37), 4), ((5, 64), 16)])
def test_native_fp32_linear_is_the_double_sum_rounded_once(shape, experts):
    module = _Router(experts, shape[-1])
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(9))
    got = _execute(module, x)
    want = (x.double() @ module.weight.detach().double().T).float()
    assert got.shape == (*shape[:-1], experts)
    # exact products summed in double: at most a rounding of the double result apart from it (the sum's order differs)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert (got - want).abs().max() <= want.abs().max() * 2 ** -23


class _Heads(torch.nn.Module):
    def __init__(self, start: int, heads: int, d: int, rope: bool):
        super().__init__()
        self.start, self.heads_, self.d, self.rope = start, heads, d, rope

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if not self.rope:
            return torch.ops.cosmoes.heads(x, self.start, self.heads_, self.d)
        return torch.ops.cosmoes.heads(x, self.start, self.heads_, self.d, cos, sin)


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("start,heads,d,T,F", [(0, 4, 6, 1, 40), (24, 2, 6, 5, 40), (10, 3, 10, 3, 40)])
def test_native_heads_give_the_references_bits(rope, start, heads, d, T, F):
    from cosmoes.model import rope_cos_sin
    from cosmoes.ops import heads_reference

    x = torch.randn(1, T, F, generator=torch.Generator().manual_seed(8))
    cos, sin = (t[0] for t in rope_cos_sin(torch.arange(3, 3 + T)[None], d, 10000.0))
    got = _execute(_Heads(start, heads, d, rope), x, cos, sin)
    want = heads_reference(x, start, heads, d, *((cos, sin) if rope else ()))
    assert got.shape == (1, heads, T, d)
    assert torch.equal(got, want)


def test_heads_that_reach_past_the_projection_are_refused_at_run_time():
    from executorch.exir import to_edge
    from executorch.runtime import Runtime

    from cosmoes.runtime.native import load_ops

    load_ops()
    x = torch.randn(1, 2, 40)
    cos, sin = torch.ones(2, 6), torch.zeros(2, 6)
    F = torch.export.Dim("F", min=36, max=64)
    program = to_edge(torch.export.export(_Heads(24, 2, 6, True), (x, cos, sin),
                                          dynamic_shapes=({2: F}, None, None))).to_executorch()
    method = Runtime.get().load_program(program.buffer).load_method("forward")
    assert torch.equal(method.execute([x, cos, sin])[0], heads_of(x))
    # ExecuTorch checks a dynamic dim's upper bound only: columns 24..35 do not exist in a projection of 30, and the
    # kernel's own check fails the call
    with pytest.raises(RuntimeError):
        method.execute([torch.randn(1, 2, 30), cos, sin])


def heads_of(x):
    from cosmoes.ops import heads_reference

    return heads_reference(x, 24, 2, 6, torch.ones(2, 6), torch.zeros(2, 6))
