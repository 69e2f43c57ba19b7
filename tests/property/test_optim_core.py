"""GradientTransformation basics, sgd, adamw against torch.optim, clip_by_global_norm (single device)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardfn.optim import (
    AdamState,
    GradientTransformation,
    adamw,
    apply_step,
    apply_updates,
    chain,
    clip_by_global_norm,
    global_norm,
    identity,
    sgd,
)

F32_EPS = torch.finfo(torch.float32).eps

shapes = st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3), min_size=1, max_size=3)


def _params(shape_list, seed):
    gen = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(*s, generator=gen) for i, s in enumerate(shape_list)}


def _grads(params, num_steps, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    return [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(num_steps)]


@settings(max_examples=8)
@given(
    shape_list=shapes,
    lr=st.floats(1e-4, 1e-1),
    b1=st.floats(0.0, 0.99),
    b2=st.floats(0.9, 0.9999),
    eps=st.sampled_from([1e-8, 1e-6]),
    wd=st.sampled_from([0.0, 0.01, 0.1]),
    seed=st.integers(0, 1000),
)
def test_adamw_matches_torch_over_50_steps(shape_list, lr, b1, b2, eps, wd, seed):
    """Moments bitwise at every step; params bitwise via step; via update+apply_updates within
    1 ulp of max(|p_old|, |p_new|) per step (one rounding of p_new - p, see adamw's docstring)."""
    params = _params(shape_list, seed)
    grads = _grads(params, 50, seed)
    ref = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = torch.optim.AdamW(list(ref.values()), lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    tx = adamw(lr, (b1, b2), eps, wd)
    p_step = {k: v.clone() for k, v in params.items()}
    s_step = tx.init(p_step)
    s_upd = tx.init(params)
    for g in grads:
        prev = {k: v.detach().clone() for k, v in ref.items()}
        for k in ref:
            ref[k].grad = g[k].clone()
        opt.step()
        p_step, s_step = apply_step(tx, g, s_step, p_step)
        # Feed torch's params into update so the per-step claim is checked exactly.
        updates, s_upd = tx.update(g, s_upd, prev)
        p_upd = apply_updates(prev, updates)
        for k, r in ref.items():
            r = r.detach()
            st_ = opt.state[ref[k]]
            assert torch.equal(s_step.mu[k], st_["exp_avg"]) and torch.equal(s_step.nu[k], st_["exp_avg_sq"])
            assert torch.equal(s_upd.mu[k], st_["exp_avg"]) and torch.equal(s_upd.nu[k], st_["exp_avg_sq"])
            assert torch.equal(p_step[k], r)
            bound = F32_EPS * torch.maximum(prev[k].abs(), r.abs())
            assert ((p_upd[k] - r).abs() <= bound).all()
    assert int(s_step.count) == int(s_upd.count) == 50


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 0.1), (0.8, True, 0.0)])
def test_sgd_matches_torch(momentum, nesterov, wd):
    params = _params([[6, 3], [4]], 0)
    ref = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = torch.optim.SGD(list(ref.values()), lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    tx = sgd(0.05, momentum, nesterov=nesterov, weight_decay=wd)
    p, s = {k: v.clone() for k, v in params.items()}, tx.init(params)
    s_upd = tx.init(params)
    for g in _grads(params, 20, 0):
        prev = {k: v.detach().clone() for k, v in ref.items()}
        for k in ref:
            ref[k].grad = g[k].clone()
        opt.step()
        p, s = apply_step(tx, g, s, p)
        u, s_upd = tx.update(g, s_upd, prev)
        p_upd = apply_updates(prev, u)
        for k in ref:
            assert torch.equal(p[k], ref[k].detach())
            bound = F32_EPS * torch.maximum(prev[k].abs(), ref[k].detach().abs())
            assert ((p_upd[k] - ref[k].detach()).abs() <= bound).all()
            if momentum:
                assert torch.equal(s_upd.momentum[k], opt.state[ref[k]]["momentum_buffer"])


def test_chain_threads_updates_and_states():
    params = _params([[5], [2, 2]], 3)
    g = _grads(params, 1, 3)[0]
    tx = chain(clip_by_global_norm(0.5), identity(), adamw(1e-2))
    state = tx.init(params)
    assert isinstance(state, tuple) and len(state) == 3 and isinstance(state[2], AdamState)
    u, state2 = tx.update(g, state, params)
    clipped, _ = clip_by_global_norm(0.5).update(g, (), params)
    u_ref, _ = adamw(1e-2).update(clipped, adamw(1e-2).init(params), params)
    for k in params:
        assert torch.equal(u[k], u_ref[k])
    # The chain's step reuses adamw's in-place step after the clip.
    p_step, _ = apply_step(tx, g, tx.init(params), {k: v.clone() for k, v in params.items()})
    p_upd = apply_updates(params, u)
    for k in params:
        bound = F32_EPS * torch.maximum(params[k].abs(), p_step[k].abs())
        assert ((p_step[k] - p_upd[k]).abs() <= bound).all()
    assert repr(tx).startswith("GradientTransformation(chain(clip_by_global_norm")


def test_chain_rejects_non_transformations():
    with pytest.raises(TypeError, match=r"txs\[1\]"):
        chain(sgd(0.1), lambda g: g)


def test_apply_updates_mixed_dtype_and_structure_errors():
    p = {"a": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    u = {"a": torch.tensor([0.5, -0.25])}
    out = apply_updates(p, u)
    assert out["a"].dtype == torch.bfloat16
    assert torch.equal(out["a"], (p["a"].float() + u["a"]).bfloat16())
    assert torch.equal(apply_updates(p, {"a": None})["a"], p["a"])
    with pytest.raises(ValueError, match="apply_updates"):
        apply_updates(p, {"a": torch.ones(2), "b": torch.ones(1)})


@settings(max_examples=8)
@given(shape_list=shapes, max_norm=st.floats(0.1, 10.0), scale=st.floats(0.01, 10.0), seed=st.integers(0, 100))
def test_clip_by_global_norm_matches_torch(shape_list, max_norm, scale, seed):
    params = _params(shape_list, seed)
    g = {k: v * scale for k, v in _grads(params, 1, seed)[0].items()}
    ref = {k: v.clone().requires_grad_() for k, v in params.items()}
    leaves = list(ref.values())
    for k in ref:
        ref[k].grad = g[k].clone()
    total = torch.nn.utils.clip_grad_norm_(leaves, max_norm)
    assert torch.equal(global_norm(g), total)
    out, _ = clip_by_global_norm(max_norm).update(g, (), None)
    for k in ref:
        assert torch.equal(out[k], ref[k].grad)
    # float64 oracle for the value itself
    exact = math.sqrt(sum(float(v.double().square().sum()) for v in g.values()))
    assert abs(float(total) - exact) <= 1e-5 * exact


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: adamw(-1.0), "lr=-1.0"),
        (lambda: adamw(1e-3, betas=(0.9, 1.0)), "betas"),
        (lambda: sgd(0.1, nesterov=True), "nesterov"),
        (lambda: clip_by_global_norm(0.0), "max_norm=0.0"),
    ],
)
def test_bad_hyperparameters_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_gradient_transformation_is_frozen():
    tx = adamw(1e-3)
    assert isinstance(tx, GradientTransformation)
    with pytest.raises(Exception):
        tx.name = "x"
    # schedules: lr as a function of the 1-based step
    sched = adamw(lambda t: 1e-2 / t, weight_decay=0.0)
    params = {"w": torch.ones(3)}
    s = sched.init(params)
    g = {"w": torch.ones(3)}
    u1, s = sched.update(g, s, params)
    u2, s = sched.update(g, s, params)
    # with a constant gradient the normalised Adam step is ~lr_t, so the ratio is ~2
    assert torch.allclose(u1["w"] / u2["w"], torch.full((3,), 2.0), rtol=1e-3)
