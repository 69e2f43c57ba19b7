"""Norms, SwiGLU, RoPE, ALiBi, EOD reset, dropout against direct formulas or torch modules."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardfn.layers import (
    alibi_bias,
    alibi_slopes,
    apply_rotary,
    dropout,
    eod_reset,
    layer_norm,
    rms_norm,
    rope_cache,
    swiglu,
)

dims = st.tuples(st.integers(1, 3), st.integers(1, 5), st.sampled_from([4, 8, 16]))


def _x(shape, dtype, seed=0, scale=3.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)


@settings(max_examples=8)
@given(dims, st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_rms_norm_formula_fp32_statistics(shape, dtype):
    x = _x(shape, dtype)
    w = _x(shape[-1:], torch.float32, seed=1, scale=1.0)
    y = rms_norm(x, w, eps=1e-6)
    x64 = x.double()
    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert y.dtype == dtype
    # bf16: one rounding of an fp32 result (2^-8 relative); fp32: a few ulps.
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(y.double(), want.to(dtype).double(), rtol=tol, atol=tol)


def test_rms_norm_gradients_float64():
    x = _x((2, 3, 8), torch.float64).requires_grad_()
    w = _x((8,), torch.float64, seed=2).requires_grad_()
    gy = _x((2, 3, 8), torch.float64, seed=3)
    got = torch.autograd.grad((rms_norm(x, w) * gy).sum(), (x, w))
    want = torch.autograd.grad((x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w * gy).sum(), (x, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_layer_norm_equals_torch_module():
    ln = torch.nn.LayerNorm(8, eps=1e-5, dtype=torch.float64)
    with torch.no_grad():
        ln.weight.normal_(generator=torch.Generator().manual_seed(0))
        ln.bias.normal_(generator=torch.Generator().manual_seed(1))
    x = _x((2, 5, 8), torch.float64).requires_grad_()
    w = ln.weight.detach().clone().requires_grad_()
    b = ln.bias.detach().clone().requires_grad_()
    y = layer_norm(x, w, b)
    torch.testing.assert_close(y, ln(x), atol=1e-12, rtol=1e-12)
    gy = torch.randn_like(y)
    got = torch.autograd.grad((y * gy).sum(), (x, w, b))
    want = torch.autograd.grad((ln(x) * gy).sum(), (x, ln.weight, ln.bias))
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, atol=1e-12, rtol=1e-12)


@settings(max_examples=8)
@given(dims, st.sampled_from([torch.float32, torch.bfloat16]))
def test_swiglu_formula(shape, dtype):
    x = _x(shape[:-1] + (2 * shape[-1],), dtype).requires_grad_()
    y = swiglu(x)
    a, b = x[..., : shape[-1]], x[..., shape[-1]:]
    want = a * torch.sigmoid(a) * b
    torch.testing.assert_close(y, want, atol=0, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    # Backward against the closed form of FEATURES.md 33: da = dy b s (1 + a (1 - s)), db = dy a s.
    x64 = x.detach().double().requires_grad_()
    dy = torch.randn(y.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad((swiglu(x64) * dy).sum(), (x64,))
    a, b = x64.detach()[..., : shape[-1]], x64.detach()[..., shape[-1]:]
    s = torch.sigmoid(a)
    torch.testing.assert_close(g, torch.cat([dy * b * s * (1 + a * (1 - s)), dy * a * s], -1), atol=1e-12, rtol=1e-12)


def _rope_reference(x, positions, dr, base, interleaved):
    """Complex-number RoPE: pairs (x_i, x_{i+dr/2}) (NeoX) or (x_2i, x_2i+1) (GPT-J) times e^{i pos f}."""
    x = x.double()
    xr, xp = x[..., :dr], x[..., dr:]
    k = dr // 2
    f = base ** (-torch.arange(k, dtype=torch.float64) * 2 / dr)
    ang = positions.double()[:, None] * f  # [s, k]
    rot = torch.polar(torch.ones_like(ang), ang)[None, :, None, :]  # [1, s, 1, k]
    if interleaved:
        z = torch.complex(xr[..., 0::2], xr[..., 1::2]) * rot
        out = torch.stack([z.real, z.imag], dim=-1).flatten(-2)
    else:
        z = torch.complex(xr[..., :k], xr[..., k:]) * rot
        out = torch.cat([z.real, z.imag], dim=-1)
    return torch.cat([out, xp], dim=-1)


@settings(max_examples=8)
@given(st.integers(1, 6), st.sampled_from([(8, 8), (8, 4), (16, 6)]), st.booleans(), st.booleans(),
       st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_rotary_matches_complex_rotation(s, dims_, interleaved, shifted, dtype):
    d, dr = dims_
    x = _x((2, s, 3, d), dtype)
    pos = torch.arange(s) + (5 if shifted else 0)
    cos, sin = rope_cache(s, dr, base=10000.0, position_ids=pos if shifted else None, dtype=torch.float64)
    y = apply_rotary(x, cos, sin, interleaved=interleaved)
    assert y.dtype == dtype
    # The rotation runs in x's dtype: fp32 a few ulps; bf16 rounds cos/sin and each product
    # (|x| <= ~12 here, so 3 roundings of 2^-8 relative give <= 0.15 absolute).
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 0.15}[dtype]
    want = _rope_reference(x, pos, dr, 10000.0, interleaved)
    torch.testing.assert_close(y.double(), want, atol=tol, rtol=tol)


def test_rotary_sliced_positions_equal_sliced_output():
    """CP: RoPE on the full sequence then slice == slice positions then RoPE (FEATURES.md 35)."""
    x = _x((1, 8, 2, 8), torch.float32)
    cos, sin = rope_cache(8, 8)
    full = apply_rotary(x, cos, sin)
    idx = torch.tensor([0, 1, 6, 7])  # a zigzag chunk pair
    c2, s2 = rope_cache(4, 8, position_ids=idx)
    torch.testing.assert_close(apply_rotary(x[:, idx], c2, s2), full[:, idx], atol=0, rtol=0)


def test_rotary_backward_is_rotation_by_minus_sin():
    x = _x((1, 5, 2, 8), torch.float64).requires_grad_()
    cos, sin = rope_cache(5, 8, dtype=torch.float64)
    g = torch.randn(1, 5, 2, 8, dtype=torch.float64)
    (dx,) = torch.autograd.grad((apply_rotary(x, cos, sin) * g).sum(), (x,))
    torch.testing.assert_close(dx, apply_rotary(g, cos, -sin), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("n", [8, 12, 32, 6])
def test_alibi_slopes_table(n):
    def pow2(m):
        return [2 ** (-8 * (i + 1) / m) for i in range(m)]

    p = 2 ** int(math.log2(n))
    want = pow2(p) + pow2(2 * p)[0::2][: n - p]
    torch.testing.assert_close(alibi_slopes(n, dtype=torch.float64), torch.tensor(want, dtype=torch.float64))
    if n == 8:
        assert alibi_slopes(8, dtype=torch.float64)[0].item() == 0.5 and alibi_slopes(8)[-1].item() == 2 ** -8


def test_alibi_bias_block_equals_slice_of_full():
    slopes = alibi_slopes(4, dtype=torch.float64)
    full = alibi_bias(slopes, 10, dtype=torch.float64)
    i, j = torch.arange(10)[:, None], torch.arange(10)[None]
    torch.testing.assert_close(full, slopes[:, None, None] * (j - i), atol=0, rtol=0)
    block = alibi_bias(slopes, 3, 4, q_start=6, kv_start=2, dtype=torch.float64)
    torch.testing.assert_close(block, full[:, 6:9, 2:6], atol=0, rtol=0)
    assert (alibi_bias(slopes, 5, symmetric=True) <= 0).all()


def test_eod_reset_table():
    pos, cu = eod_reset(torch.tensor([5, 0, 7, 8, 0, 9]), 0)
    assert pos.tolist() == [0, 1, 0, 1, 2, 0] and cu.tolist() == [0, 2, 5, 6] and cu.dtype == torch.int32
    pos, cu = eod_reset(torch.tensor([1, 2, 0]), 0)  # ends with EOD: no empty last document
    assert pos.tolist() == [0, 1, 2] and cu.tolist() == [0, 3]
    pos, cu = eod_reset(torch.tensor([0, 0, 4]), 0)
    assert pos.tolist() == [0, 0, 0] and cu.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="1-d"):
        eod_reset(torch.zeros(2, 3, dtype=torch.long), 0)


def test_dropout_generator_and_scale():
    x = torch.ones(1000, dtype=torch.float64)
    y = dropout(x, 0.25, generator=torch.Generator().manual_seed(0))
    keep = torch.empty(1000, dtype=torch.float64).bernoulli_(0.75, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(y, keep / 0.75, atol=0, rtol=0)
    assert dropout(x, 0.0) is x
