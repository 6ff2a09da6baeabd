"""cosmoes.int4 (the experts' int8 x int4 arithmetic) on hand-computed values, and the native kernels of every
instruction set this CPU has giving its bits exactly (export/runtime/int4.cpp through cosmoes_int4_check)."""

import os
import subprocess

import pytest
import torch

from cosmoes import int4


def test_weights_pack_to_nibbles_in_panels_of_16_rows_with_group_scales():
    # one row, one group of 32 whose amax is 7.5: scale 1.0, so the integers are their own int4 codes
    first, second = [float(v) for v in range(-7, 8)] + [7.5], [float(v) for v in range(-7, 8)] + [0.0]
    p = int4.pack_linear(torch.tensor([first + second]), 32)
    # the row is stored in a panel of 16 rows (15 of padding, with scale 0), 4 slices of 8 columns of 4 bytes each
    assert p.out_features == 1 and p.stored == 16 and p.padded == 32 and p.nibbles.shape == (1, 4, 16, 4)
    assert p.scales.tolist() == [[1.0] + [0.0] * 15]
    codes = list(range(-7, 8)) + [7] + list(range(-7, 8)) + [0]  # 7.5 rounds half to even (8), clamped to 7
    assert int4.weights_int(p)[0].tolist() == codes
    # in slice c, byte j of a row holds column 8c + j (low nibble) and 8c + j + 4 (high nibble), each as q + 8
    assert p.nibbles[0, 0, 0, 0].item() == (-7 + 8) | ((-3 + 8) << 4)
    assert p.nibbles[0, 3, 0, 3].item() == (4 + 8) | ((0 + 8) << 4)
    # the padding rows are code -8 under scale 0: they add nothing
    assert p.nibbles[0, :, 1:].eq(8 * 16 + 8).all()


def test_padding_and_a_zero_group_cost_nothing():
    w = torch.zeros(2, 40)
    w[0, :32] = 0.5
    p = int4.pack_linear(w, 32)
    assert p.padded == 64 and p.scales[1, :2].tolist() == [0.0, 0.0] and p.scales[0, 1].item() == 0.0
    back = int4.unpack(p)
    assert back.shape == w.shape and torch.equal(back[:, 32:], w[:, 32:]) and torch.equal(back[1], w[1])
    # +amax maps to 7.5, which rounds to 8 and saturates at 7: half a step off, the most any value is
    assert torch.allclose(back[0, :32], torch.full((32,), 7 * (0.5 / 7.5)))


def test_activations_quantise_per_token_to_int8():
    x = torch.tensor([[1.27, -0.635, 0.0], [0.0, 0.0, 0.0]])
    q, sa = int4.quantize_activations(x, 32)
    assert sa.tolist() == [pytest.approx(0.01), 0.0]
    assert q[0, :3].tolist() == [127, -64, 0] and q[0, 3:].abs().sum() == 0 and q[1].abs().sum() == 0


def test_linear_is_the_integer_sums_in_the_fixed_fp32_order():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(9, 96, generator=g), torch.randn(4, 70, generator=g)
    p = int4.pack_linear(w[:, :70], 32)
    qa, sa = int4.quantize_activations(x, p.padded)
    qw = int4.weights_int(p)
    want = torch.zeros(4, 9)
    for n in range(4):
        for r in range(9):
            acc = torch.tensor(0.0)
            for j in range(p.padded // 32):
                isum = int((qa[n, 32 * j:32 * j + 32] * qw[r, 32 * j:32 * j + 32]).sum())
                acc = acc + torch.tensor(float(isum)) * p.scales[j, r]
            want[n, r] = acc * sa[n]
    assert torch.equal(int4.linear(x, p), want)
    # and close to the fp32 product it stands for
    ref = x @ w[:, :70].t()
    err = int4.linear(x, p) - ref  # int4 of Gaussian weights: about a tenth of the signal, as 4 bits give
    assert err.pow(2).mean().sqrt() < 0.15 * ref.pow(2).mean().sqrt()


def test_the_torch_operator_and_its_fake_agree_on_shapes():
    import cosmoes.ops  # noqa: F401 - defines torch.ops.cosmoes.int4_linear

    p = int4.pack_linear(torch.randn(5, 64), 32)
    x = torch.randn(3, 64)
    y = torch.ops.cosmoes.int4_linear(x, p.nibbles, p.scales, 64, 5, 32)
    assert torch.equal(y, int4.linear(x, p))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = torch.ops.cosmoes.int4_linear(mode.from_tensor(x), mode.from_tensor(p.nibbles),
                                             mode.from_tensor(p.scales), 64, 5, 32)
    assert fake.shape == (3, 5)


# -- the native kernels ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def check_exe():
    from cosmoes.runtime.native import build_runner

    return build_runner().parent / "cmake" / "cosmoes_int4_check"


def _available(exe) -> list[str]:
    out = subprocess.run([exe, "bench", "1", "32", "32", "1", "1"], capture_output=True, text=True,
                         env={**os.environ, "COSMOES_ISA": "neondot" if os.uname().machine == "x86_64" else "avx2"})
    return out.stderr.split("it has: ")[1].split()


def _run(exe, tmp_path, p, x, isa):
    (tmp_path / "shape.txt").write_text(f"{p.out_features} {p.padded} {p.in_features} {p.group} {x.shape[0]}")
    (tmp_path / "nibbles.bin").write_bytes(p.nibbles.numpy().tobytes())
    (tmp_path / "scales.bin").write_bytes(p.scales.numpy().tobytes())
    (tmp_path / "x.bin").write_bytes(x.numpy().tobytes())
    proc = subprocess.run([exe, "run", tmp_path], capture_output=True, text=True, env={**os.environ, "COSMOES_ISA": isa})
    assert proc.returncode == 0 and proc.stdout.split()[:2] == ["isa", isa], proc.stderr
    y = torch.frombuffer(bytearray((tmp_path / "y.bin").read_bytes()), dtype=torch.float32)
    return y.view(x.shape[0], p.out_features)


@pytest.mark.parametrize("rows, inp, group, N", [(13, 100, 32, 1), (64, 448, 64, 3), (40, 256, 128, 17),
                                                 (1280, 432, 32, 1), (17, 1280, 32, 64)])
def test_every_kernel_family_gives_the_reference_bits(check_exe, tmp_path, rows, inp, group, N):
    g = torch.Generator().manual_seed(rows)
    p = int4.pack_linear(torch.randn(rows, inp, generator=g), group)
    x = torch.randn(N, inp, generator=g) * 3
    want = int4.linear(x, p)
    families = _available(check_exe)
    assert "scalar" in families and len(families) >= 2  # x86-64 hosts have AVX2 at least, arm64 NEON dotprod
    for isa in families:
        assert torch.equal(_run(check_exe, tmp_path, p, x, isa), want), isa


def test_a_kernel_family_the_cpu_lacks_or_does_not_know_is_one_line(check_exe):
    lacks = "neondot" if os.uname().machine == "x86_64" else "avx2"
    for value, message in [(lacks, f"COSMOES_ISA={lacks} asks for kernels this CPU cannot run; it has: "),
                           ("sse9", "COSMOES_ISA=sse9 is not a kernel family; use one of: ")]:
        proc = subprocess.run([check_exe, "bench", "8", "32", "32", "1", "1"], capture_output=True, text=True,
                              env={**os.environ, "COSMOES_ISA": value})
        assert proc.returncode == 2 and proc.stderr.startswith("error: " + message)
        assert proc.stderr.count("\n") == 1


def test_every_kernel_family_gives_the_reference_silu_bits(check_exe, tmp_path):
    # SIMD e^x in double must round to the same floats as the reference's exp, across the range activations take
    # and at the clamps (|v| about 708-709), overflow, subnormals, signed zeros and infinities
    g = torch.Generator().manual_seed(0)
    edges = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 88.7, -88.7, 707.9, -707.9, 708.5, -708.5, 709.0, -709.0,
                          709.5, -709.5, 745.2, -745.2, 1e30, -1e30, 3.4e38, -3.4e38, float("inf"), float("-inf")])
    a = torch.cat([torch.randn(200_001, generator=g) * 4, (torch.rand(50_000, generator=g) - 0.5) * 1500, edges])
    b = torch.randn(a.numel(), generator=g)
    (tmp_path / "a.bin").write_bytes(a.numpy().tobytes())
    (tmp_path / "b.bin").write_bytes(b.numpy().tobytes())
    want = int4.silu(a) * b
    for isa in _available(check_exe):
        proc = subprocess.run([check_exe, "silu", tmp_path], capture_output=True, text=True,
                              env={**os.environ, "COSMOES_ISA": isa})
        assert proc.returncode == 0 and proc.stdout.split()[:2] == ["isa", isa], proc.stderr
        got = torch.frombuffer(bytearray((tmp_path / "h.bin").read_bytes()), dtype=torch.float32)
        same = (got == want) | (got.isnan() & want.isnan())
        assert same.all() and torch.equal(got.signbit(), want.signbit()), (isa, a[~same][:5], got[~same][:5])
