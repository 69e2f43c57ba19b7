"""reuse_fp32_param: the 0x8000 trick, deterministic ties, training parity, measured storage."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardfn.optim import adamw, apply_step, apply_updates, pack_fp32, reuse_fp32_param, state_nbytes, unpack_fp32


def _with_ties(n, num_ties, seed):
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randn(n, generator=gen).view(torch.int32).clone()
    idx = torch.randperm(n, generator=gen)[: 2 * num_ties]
    even, odd = idx[:num_ties], idx[num_ties:]
    bits[even] = (bits[even] & ~0x1FFFF) | 0x08000  # residual exactly half, bf16 LSB even
    bits[odd] = (bits[odd] & ~0x1FFFF) | 0x18000  # residual exactly half, bf16 LSB odd
    return bits.view(torch.float32), even


@settings(max_examples=8)
@given(n=st.integers(64, 4096), frac=st.floats(0.0, 0.2), seed=st.integers(0, 10_000))
def test_bf16_view_differs_only_at_even_ties_and_round_trip_is_bitwise(n, frac, seed):
    x, even = _with_ties(n, int(n * frac), seed)
    buf = x.clone().view(torch.int32)
    b16 = pack_fp32(buf)
    assert b16.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    ref = x.to(torch.bfloat16)
    mism = b16.view(torch.int16) != ref.view(torch.int16)
    is_even_tie = (x.view(torch.int32) & 0x1FFFF) == 0x08000
    assert not (mism & ~is_even_tie).any()
    assert int(mism.sum()) == int(is_even_tie.sum())  # every even tie rounds away instead of to even
    back = unpack_fp32(buf)
    assert torch.equal(back.view(torch.int32), x.view(torch.int32))


@settings(max_examples=8)
@given(n=st.integers(64, 4096), frac=st.floats(0.0, 0.2), seed=st.integers(0, 10_000))
def test_deterministic_mode_rounds_half_to_even_everywhere(n, frac, seed):
    x, _ = _with_ties(n, int(n * frac), seed)
    nu = torch.rand(n)
    nu[: n // 8] = 0.0  # zero second moments keep their bit too (signbit of -0.0)
    nu0 = nu.clone()
    buf = x.clone().view(torch.int32)
    b16 = pack_fp32(buf, nu)
    assert torch.equal(b16.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    back = unpack_fp32(buf, nu)
    assert torch.equal(back.view(torch.int32), x.view(torch.int32))
    assert torch.equal(nu.view(torch.int32), nu0.view(torch.int32))


def _grads_of(params, x, y):
    p = {k: v.detach().requires_grad_() for k, v in params.items()}
    out = x.bfloat16() @ p["w"] + p["b"]
    loss = (out.float() - y).square().mean()
    return dict(zip(p, torch.autograd.grad(loss, list(p.values()))))


@pytest.mark.parametrize("deterministic", [True, False])
def test_training_trajectory_matches_standard_mixed_precision(deterministic):
    """20 AdamW steps: bf16 params from fp32 masters (.to(bfloat16)) vs the reused buffer."""
    gen = torch.Generator().manual_seed(0)
    w0 = {"w": torch.randn(24, 12, generator=gen), "b": torch.randn(12, generator=gen)}
    # inject exact even ties into the starting masters so the two rounding rules meet
    w0["w"].view(torch.int32)[::7] = (w0["w"].view(torch.int32)[::7] & ~0x1FFFF) | 0x08000
    x, y = torch.randn(16, 24, generator=gen), torch.randn(16, 12, generator=gen)
    tx = adamw(1e-2)
    master = {k: v.clone() for k, v in w0.items()}
    s = tx.init(master)
    rtx = reuse_fp32_param(adamw(1e-2), deterministic=deterministic)
    rs = rtx.init(w0)
    rp = rs.params
    num_diff = 0
    for _ in range(20):
        bf16 = {k: v.to(torch.bfloat16) for k, v in master.items()}
        num_diff += sum(int((bf16[k].view(torch.int16) != rp[k].view(torch.int16)).sum()) for k in w0)
        if deterministic:
            for k in w0:
                assert torch.equal(rp[k].view(torch.int16), bf16[k].view(torch.int16))
        g = _grads_of(bf16, x, y)
        master, s = apply_step(tx, {k: v.float() for k, v in g.items()}, s, master)
        rp, rs = apply_step(rtx, _grads_of(rp, x, y), rs, rp)
    if deterministic:
        nu = rs.inner.nu.clone()
        masters = unpack_fp32(rs.buffer.clone(), nu)
        flat = torch.cat([master["b"], master["w"].reshape(-1)])  # optree sorts dict keys
        assert torch.equal(masters.view(torch.int32), flat.view(torch.int32))
    else:
        # ties away from zero differ from round-half-even at the injected ties: E2 closeness
        assert num_diff > 0
        for k in w0:
            torch.testing.assert_close(rp[k].float(), master[k].to(torch.bfloat16).float(), atol=2e-2, rtol=2e-2)


def test_storage_is_two_bytes_per_parameter_less():
    gen = torch.Generator().manual_seed(1)
    w0 = {"a": torch.randn(100, 10, generator=gen), "b": torch.randn(37, generator=gen)}
    n = sum(v.numel() for v in w0.values())
    # standard mixed precision: bf16 params + fp32 masters (+ the same Adam moments in both)
    std_params = {k: v.to(torch.bfloat16) for k, v in w0.items()}
    std_master = {k: v.clone() for k, v in w0.items()}
    std_moments = adamw(1e-3).init(torch.zeros(n))
    std_bytes = state_nbytes((std_params, std_master, std_moments))
    rs = reuse_fp32_param(adamw(1e-3)).init(w0)
    reuse_bytes = state_nbytes((rs.params, rs.buffer, rs.inner))
    assert std_bytes - reuse_bytes == 2 * n
    assert state_nbytes((rs.params, rs.buffer)) == 4 * n  # params are views into the master buffer


def test_pure_update_leaves_state_untouched_and_agrees_with_step():
    gen = torch.Generator().manual_seed(2)
    w0 = {"w": torch.randn(50, generator=gen)}
    g = {"w": torch.randn(50, generator=gen).bfloat16()}
    rtx = reuse_fp32_param(adamw(1e-2), deterministic=True)
    rs = rtx.init(w0)
    before = rs.buffer.clone()
    u, rs2 = rtx.update(g, rs, rs.params)
    assert torch.equal(rs.buffer, before)
    new = apply_updates(rs.params, u)
    p_step, _ = apply_step(rtx, g, rtx.init(w0), None)
    assert torch.equal(new["w"].view(torch.int16), p_step["w"].view(torch.int16))
    assert torch.equal(rs2.params["w"].view(torch.int16), p_step["w"].view(torch.int16))


def test_errors():
    with pytest.raises(ValueError, match="int32"):
        pack_fp32(torch.zeros(4))
    with pytest.raises(ValueError, match="AdamState"):
        from shardfn.optim import sgd

        reuse_fp32_param(sgd(0.1), deterministic=True).init({"w": torch.ones(3)})


@pytest.mark.parametrize("use_step", [True, False])
def test_mixed_precision_wrapper_is_the_standard_reference(use_step):
    """mixed_precision(adamw) reproduces the hand-written masters + .to(bfloat16) loop bitwise."""
    from shardfn.optim import mixed_precision

    gen = torch.Generator().manual_seed(4)
    w0 = {"w": torch.randn(24, 12, generator=gen), "b": torch.randn(12, generator=gen)}
    x, y = torch.randn(16, 24, generator=gen), torch.randn(16, 12, generator=gen)
    tx = adamw(1e-2)
    master = {k: v.clone() for k, v in w0.items()}
    s = tx.init(master)
    mtx = mixed_precision(adamw(1e-2))
    params = {k: v.bfloat16() for k, v in w0.items()}
    ms = mtx.init({k: v.clone() for k, v in w0.items()})  # masters from the fp32 values
    for _ in range(10):
        bf16 = {k: v.to(torch.bfloat16) for k, v in master.items()}
        for k in w0:
            assert torch.equal(params[k], bf16[k])
        g = _grads_of(bf16, x, y)
        g32 = {k: v.float() for k, v in g.items()}
        if use_step:
            master, s = apply_step(tx, g32, s, master)
        else:
            u32, s = tx.update(g32, s, master)
            master = apply_updates(master, u32)
        if use_step:
            params, ms = apply_step(mtx, g, ms, params)
        else:
            u, ms = mtx.update(g, ms, params)
            params = apply_updates(params, u)
    for k in w0:
        assert torch.equal(ms.master[k], master[k])
