"""swap_optimizer and virtual_optimizer: placement, windowing, byte accounting, bitwise results."""
import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardfn.optim import (
    adamw,
    apply_step,
    apply_updates,
    fused_ema_adamw,
    plan_virtual,
    state_nbytes,
    swap_optimizer,
    swap_windows,
    virtual_optimizer,
)


def _problem(sizes, steps=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = {f"l{i:02d}": torch.randn(n, generator=gen) for i, n in enumerate(sizes)}
    grads = [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(steps)]
    return params, grads


def _reference(tx, params, grads, use_step=True):
    p = {k: v.clone() for k, v in params.items()}
    s = tx.init(p)
    for g in grads:
        if use_step:
            p, s = apply_step(tx, g, s, p)
        else:
            u, s = tx.update(g, s, p)
            p = apply_updates(p, u)
    return p, s


@settings(max_examples=8)
@given(numels=st.lists(st.integers(1, 300), min_size=1, max_size=12), times=st.sampled_from([0, 1, 4, 16]))
def test_swap_windows_cover_every_leaf_once(numels, times):
    windows = swap_windows(numels, times)
    flat = [i for w in windows for i in w]
    assert sorted(flat) == list(range(len(numels)))
    if times == 0:
        assert len(windows) == 1 and [numels[i] for i in windows[0]] == sorted(numels, reverse=True)
    else:
        chunk = max(1, sum(numels) // times)
        assert all(sum(numels[i] for i in w) >= chunk for w in windows[:-1])
        assert all(sum(numels[i] for i in w[:-1]) < chunk for w in windows)  # closes as soon as full
        assert len(windows) <= max(times, 1) + 1


@pytest.mark.parametrize("times", [0, 1, 4, 16])
@pytest.mark.parametrize("use_step", [True, False])
def test_swap_is_bitwise_unswapped_with_window_accounting(times, use_step):
    sizes = [64, 300, 7, 120, 90, 33, 250, 5]
    params, grads = _problem(sizes)
    ref_p, ref_s = _reference(adamw(1e-2), params, grads, use_step)
    log = []
    tx = swap_optimizer(adamw(1e-2), times=times, host_device="cpu", on_window=log.append)
    p = {k: v.clone() for k, v in params.items()}
    s = tx.init(p)
    for x in optree.tree_leaves(s):
        assert x.device == torch.device("cpu")
    for g in grads:
        if use_step:
            p, s = apply_step(tx, g, s, p)
        else:
            u, s = tx.update(g, s, p)
            p = apply_updates(p, u)
    keys = sorted(params)
    for i, k in enumerate(keys):
        assert torch.equal(p[k], ref_p[k])
        assert torch.equal(s.inner[i].mu, ref_s.mu[k]) and torch.equal(s.inner[i].nu, ref_s.nu[k])
    windows = swap_windows(sizes, times)
    per_step = log[: len(windows)]
    assert [w.leaves for w in per_step] == [tuple(w) for w in windows]
    for w in per_step:
        expected = sum(8 * sizes[i] + 8 for i in w.leaves)  # mu + nu (fp32) + the int64 counter
        assert w.device_bytes == w.h2d_bytes == w.d2h_bytes == expected
    total_state = state_nbytes(s)
    assert sum(w.device_bytes for w in per_step) == total_state
    if times >= 4:
        assert max(w.device_bytes for w in per_step) < total_state


def test_swap_wraps_fused_ema_adamw_bitwise():
    params, grads = _problem([40, 13, 200], seed=5)
    ema = lambda: fused_ema_adamw(1e-2, ema_decay=0.9, impl="foreach")  # noqa: E731
    ref_p, ref_s = _reference(ema(), params, grads)
    p, s = _reference(swap_optimizer(ema(), times=2), params, grads)
    for i, k in enumerate(sorted(params)):
        assert torch.equal(p[k], ref_p[k]) and torch.equal(s.inner[i].ema, ref_s.ema[k])


def test_plan_virtual_budget_checks_before_each_allocation():
    assert plan_virtual([400] * 5, 1000) == [True, True, True, False, False]  # last host one overshoots
    assert plan_virtual([400] * 3, 0) == [False] * 3
    assert plan_virtual([100, 5000, 100], 150) == [True, True, False]
    with pytest.raises(ValueError, match="budget_bytes=-1"):
        plan_virtual([1], -1)


@pytest.mark.parametrize("budget,stage", [(0, 0), (2000, 0), ([10**9, 0], 0), ([10**9, 0], 1), (10**9, 0)])
def test_virtual_optimizer_is_bitwise_and_places_by_budget(budget, stage):
    params, grads = _problem([64, 300, 7, 120])
    ref_p, ref_s = _reference(adamw(1e-2), params, grads, use_step=False)
    tx = virtual_optimizer(adamw(1e-2), budget_bytes=budget, stage=stage, host_device="cpu")
    p = {k: v.clone() for k, v in params.items()}
    s = tx.init(p)
    for g in grads:
        u, s = tx.update(g, s, p)
        p = apply_updates(p, u)
    for i, k in enumerate(sorted(params)):
        assert torch.equal(p[k], ref_p[k]) and torch.equal(s.inner[i].nu, ref_s.nu[k])
    this_budget = budget[stage] if isinstance(budget, list) else budget
    moments = [x for st_ in s.inner for x in (st_.mu, st_.nu)]
    expect = plan_virtual([x.nbytes for x in moments], this_budget)
    host_bytes = sum(x.nbytes for x, h in zip(moments, expect) if h)
    assert host_bytes >= min(this_budget, sum(x.nbytes for x in moments))
    with pytest.raises(ValueError, match="stage=2"):
        virtual_optimizer(adamw(1e-2), budget_bytes=[1, 2], stage=2)
