"""RMSNorm, SwiGLU, rotary, matmul-add and fused EMA-AdamW references against torch formulas."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from shardfn.npu import (
    npu_apply_fused_ema_adamw,
    npu_matmul_add_fp32,
    npu_rms_norm,
    npu_rms_norm_backward,
    npu_rotary_mul,
    npu_rotary_position_embedding,
    npu_swiglu,
)

# (rtol, atol); bf16 outputs are rounded to 8 mantissa bits.
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.6e-2, 1e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rms_norm_matches_torch(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=gen, dtype=torch.float64).to(dtype)
    gamma = torch.randn(16, generator=gen, dtype=torch.float64).to(dtype)
    y, rstd = npu_rms_norm(x, gamma, epsilon=1e-5)
    ref = F.rms_norm(x.double(), (16,), gamma.double(), eps=1e-5)
    assert y.dtype == dtype and rstd.shape == (3, 5, 1)
    assert rstd.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(y.double(), ref, rtol=TOL[dtype][0], atol=TOL[dtype][1])
    want_rstd = 1 / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(rstd.double(), want_rstd, rtol=1e-6, atol=0)


def test_rms_norm_multi_dim_gamma_and_backward():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    y, rstd = npu_rms_norm(x, gamma)
    torch.testing.assert_close(y, F.rms_norm(x, (3, 6), gamma, eps=1e-6))
    dy = torch.randn_like(y)
    auto = torch.autograd.grad(y, (x, gamma), dy)
    dx, dgamma = npu_rms_norm_backward(dy, x.detach(), gamma.detach(), rstd.detach())
    torch.testing.assert_close(dx, auto[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dgamma, auto[1], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="gamma shape"):
        npu_rms_norm(x, gamma[:, :5])


@settings(max_examples=8)
@given(rows=st.integers(1, 4), half=st.integers(1, 5), dim=st.sampled_from([0, -1]))
def test_swiglu_forward_and_gradient(rows, half, dim):
    gen = torch.Generator().manual_seed(rows * 10 + half)
    shape = (2 * half, rows) if dim == 0 else (rows, 2 * half)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    y = npu_swiglu(x, dim=dim)
    a, b = x.detach().chunk(2, dim=dim)
    assert torch.equal(y.detach(), F.silu(a) * b)  # E0: the same ops in the same dtype
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    sig = torch.sigmoid(a)
    da = dy * b * sig * (1 + a * (1 - sig))
    db = dy * a * sig
    torch.testing.assert_close(dx, torch.cat((da, db), dim=dim), rtol=1e-12, atol=1e-12)


def test_swiglu_bf16_and_odd_size():
    x = torch.randn(3, 8, dtype=torch.float64)
    y = npu_swiglu(x.bfloat16())
    assert y.dtype == torch.bfloat16
    a, b = x.bfloat16().double().chunk(2, -1)
    torch.testing.assert_close(y.double(), F.silu(a) * b, rtol=1.6e-2, atol=1e-2)
    with pytest.raises(ValueError, match="even"):
        npu_swiglu(torch.randn(3, 7))


def _freqs(s, d, base=10000.0):
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv[None]
    return ang


def _pair_loop_rope(x, cos, sin):
    """Interleaved (GPT-J) RoPE written pair by pair."""
    out = torch.empty_like(x)
    for i in range(0, x.shape[-1], 2):
        x0, x1 = x[..., i], x[..., i + 1]
        out[..., i] = x0 * cos[..., i] - x1 * sin[..., i]
        out[..., i + 1] = x1 * cos[..., i + 1] + x0 * sin[..., i + 1]
    return out


@pytest.mark.parametrize("mode", [0, 1])
def test_rotary_position_embedding_both_modes_bsnd(mode):
    b, s, n, d = 2, 5, 3, 8
    x = torch.randn(b, s, n, d, dtype=torch.float64, requires_grad=True)
    ang = _freqs(s, d)
    emb = torch.cat((ang, ang), -1) if mode == 0 else ang.repeat_interleave(2, -1)  # [s, d]
    cos, sin = emb.cos()[None, :, None], emb.sin()[None, :, None]  # 1S1D
    y = npu_rotary_position_embedding(x, cos, sin, mode=mode)
    if mode == 0:
        x1, x2 = x.detach()[..., : d // 2], x.detach()[..., d // 2:]
        ref = torch.cat((x1 * cos[..., : d // 2] - x2 * sin[..., : d // 2],
                         x2 * cos[..., d // 2:] + x1 * sin[..., d // 2:]), -1)
    else:
        ref = _pair_loop_rope(x.detach(), cos.expand_as(x), sin.expand_as(x))
    torch.testing.assert_close(y.detach(), ref, rtol=1e-12, atol=1e-12)
    # Backward of a rotation is the rotation by -angle.
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(dx, npu_rotary_position_embedding(dy, cos, -sin, mode=mode), rtol=1e-12, atol=1e-12)


def test_rotary_mul_equals_mode0_and_bf16():
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    ang = _freqs(4, 6)
    emb = torch.cat((ang, ang), -1)[None, None]
    cos, sin = emb.cos(), emb.sin()
    a = npu_rotary_mul(x, cos, sin)
    assert torch.equal(a, npu_rotary_position_embedding(x, cos, sin, mode=0))
    torch.testing.assert_close(npu_rotary_mul(x, cos, sin, rotary_mode="interleave"),
                               npu_rotary_position_embedding(x, cos, sin, mode=1))
    yb = npu_rotary_position_embedding(x.bfloat16(), cos.bfloat16(), sin.bfloat16())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.double(), a, rtol=3e-2, atol=3e-2)
    with pytest.raises(ValueError, match="4-d"):
        npu_rotary_position_embedding(x[0], cos[0], sin[0])
    with pytest.raises(ValueError, match="last dim"):
        npu_rotary_position_embedding(x, cos[..., :4], sin[..., :4])


def test_matmul_add_fp32_in_place_and_closer_to_truth_than_bf16():
    gen = torch.Generator().manual_seed(4)
    m, n, k = 64, 8, 16
    main_grad = torch.zeros(n, k, dtype=torch.float32)
    unfused = torch.zeros(n, k, dtype=torch.float32)
    truth = torch.zeros(n, k, dtype=torch.float64)
    for _ in range(4):
        x = torch.randn(m, k, generator=gen).bfloat16()
        go = torch.randn(m, n, generator=gen).bfloat16()
        assert npu_matmul_add_fp32(x, go, main_grad) is None
        unfused += (go.t() @ x).float()  # bf16 GEMM output rounded to bf16, then added
        truth += go.t().double() @ x.double()
    torch.testing.assert_close(main_grad.double(), truth, rtol=1e-5, atol=1e-4)
    assert (main_grad.double() - truth).abs().max() < (unfused.double() - truth).abs().max()
    before = main_grad.clone()
    npu_matmul_add_fp32(torch.zeros(0, k), torch.zeros(0, n), main_grad)
    assert torch.equal(main_grad, before)
    with pytest.raises(TypeError, match="fp32"):
        npu_matmul_add_fp32(x, go, main_grad.bfloat16())


def _ema(ema, param, decay):
    return decay * ema + (1 - decay) * param


@pytest.mark.parametrize("mode,wd", [(1, 0.1), (0, 0.05), (1, 0.0)])
def test_fused_ema_adamw_matches_torch_optim(mode, wd):
    gen = torch.Generator().manual_seed(mode)
    p0 = torch.randn(5, 3, generator=gen)
    grads = [torch.randn(5, 3, generator=gen) for _ in range(3)]
    ref_p = p0.clone().requires_grad_(True)
    cls = torch.optim.AdamW if mode == 1 else torch.optim.Adam
    opt = cls([ref_p], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
    var, m, v, s = p0.clone(), torch.zeros(5, 3), torch.zeros(5, 3), p0.clone()
    ema_ref = p0.clone()
    for n_step, g in enumerate(grads, start=1):
        ref_p.grad = g.clone()
        opt.step()
        decay = min(0.999, (1 + n_step) / (10 + n_step))  # the optimizer's warm-up, applied by the caller
        ema_ref = _ema(ema_ref, ref_p.detach(), decay)
        out = npu_apply_fused_ema_adamw(g, var, m, v, s, torch.tensor([n_step]), lr=0.01, ema_decay=decay,
                                        beta1=0.9, beta2=0.99, eps=1e-8, mode=mode, bias_correction=True,
                                        weight_decay=wd)
        assert all(a is b for a, b in zip(out, (var, m, v, s)))  # in place, like the kernel
    torch.testing.assert_close(var, ref_p.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s, ema_ref, rtol=1e-6, atol=1e-7)
    state = opt.state[ref_p]
    torch.testing.assert_close(m, state["exp_avg"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v, state["exp_avg_sq"], rtol=1e-6, atol=1e-7)


def test_fused_ema_adamw_without_bias_correction_step_one():
    g, var = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64)
    m, v, s = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), var.clone()
    npu_apply_fused_ema_adamw(g, var, m, v, s, 1, lr=0.1, ema_decay=0.5, beta1=0.9, beta2=0.999, eps=1e-8, mode=1,
                              bias_correction=False, weight_decay=0.0)
    m_want = 0.1 * g
    v_want = 0.001 * g * g
    var_want = torch.tensor([1.0, 2.0], dtype=torch.float64) - 0.1 * m_want / (v_want.sqrt() + 1e-8)
    torch.testing.assert_close(var, var_want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, 0.5 * torch.tensor([1.0, 2.0], dtype=torch.float64) + 0.5 * var_want)
