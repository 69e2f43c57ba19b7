"""distributed(reuse_fp32_param(tx)): ZeRO-1 shards whose fp32 masters live in the bf16 params buffer.

References: the single-device ``reuse_fp32_param`` (same rounding, same AdamW step) and the
distributed optimizer with bf16 params and fp32 master shards (``distributed(adamw)``, i.e.
distributed mixed precision). Params are kept away from zero (|p| >= 0.5, lr 1e-2, 20 steps) so
AdamW's ``update`` (``p + (p2 - p)``, used by ``distributed(adamw)``) equals its in-place ``step``
(``p2``, used by both reuse variants) bitwise (Sterbenz); the comparisons are then all bitwise.
"""
import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardfn import P, pvary, shard_map
from shardfn.optim import (
    DistributedReuseState,
    adamw,
    apply_step,
    chain,
    clip_by_global_norm,
    distributed,
    opt_state_specs,
    pack_fp32,
    reuse_fp32_param,
    sgd,
    state_nbytes,
    unpack_fp32,
)
from shardfn.optim.distributed import _overlay_master, _split_master
from shardfn.testing import cached_mesh

# numel 24 + 4 + 5 = 33: odd, so both dp=2 (shard 17 -> 18) and dp=3 (11 -> 12) pad
SHAPES = {"w": (6, 4), "b": (4,), "c": (5,)}


def _bits16(x):
    return x.view(torch.int16)


def _away_from_zero(shapes, seed, ties_every=0):
    """fp32 params with |p| in [0.5, 1.5); optionally exact even bf16 ties every few elements."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        x = torch.randn(*s, generator=gen).sign() * (0.5 + torch.rand(*s, generator=gen))
        if ties_every:
            bits = x.reshape(-1).view(torch.int32)
            bits[::ties_every] = (bits[::ties_every] & ~0x1FFFF) | 0x08000
        out[k] = x
    return out


def _global_masters(state, nu):
    """The fp32 masters [Np] from a global DistributedReuseState (residual and buffer as gathered)."""
    word = torch.cat([state.residual[0], _bits16(state.buffer[0])]).view(torch.int32).clone()
    return unpack_fp32(word, nu.clone() if nu is not None else None)


def _loss_grads(params, x, y):
    p = {k: v.detach().requires_grad_() for k, v in params.items()}
    out = x.bfloat16() @ p["w"] + p["b"]
    loss = (out.float() - y).square().mean() + p["c"].float().square().sum()
    return dict(zip(p, torch.autograd.grad(loss, list(p.values()))))


@pytest.mark.parametrize("dp", [2, 3])
@pytest.mark.parametrize("deterministic", [True, False])
def test_slot_overlay_places_the_master_in_two_param_slots(dp, deterministic):
    """Device r's fp32 master shard is rebuilt bitwise in bf16 slots [max(r-1,0), +2) of the params
    buffer, the other slots are untouched, and splitting it again gives ``.to(bfloat16)`` (ties
    away in non-deterministic mode) plus a residual that rebuilds the new master bitwise."""
    n = 6
    gen = torch.Generator().manual_seed(dp)
    masters = torch.randn(dp * n, generator=gen)
    bits = masters.view(torch.int32)
    bits[::4] = (bits[::4] & ~0x1FFFF) | 0x08000  # even ties
    nus = [torch.rand(n, generator=gen) for _ in range(dp)]
    buffer = torch.empty(dp * n, dtype=torch.bfloat16)
    residuals = []
    for s in range(dp):
        word = masters[s * n : (s + 1) * n].clone().view(torch.int32)
        buffer[s * n : (s + 1) * n] = pack_fp32(word, nus[s] if deterministic else None)
        residuals.append(_bits16(word)[:n].clone())
    for r in range(dp):
        work, nu = buffer.clone(), nus[r].clone()
        m = _overlay_master(work, residuals[r], r, n, nu if deterministic else None)
        lo = max(r - 1, 0)
        assert m.data_ptr() == work.data_ptr() + lo * n * 2  # bf16 slot lo, 4n bytes = slots lo, lo+1
        assert torch.equal(m.view(torch.int32), masters[r * n : (r + 1) * n].view(torch.int32))
        assert torch.equal(nu, nus[r].abs())  # tie bits read and cleared
        others = [s for s in range(dp) if s not in (lo, lo + 1)]
        for s in others:
            assert torch.equal(_bits16(work[s * n : (s + 1) * n]), _bits16(buffer[s * n : (s + 1) * n]))
        m.mul_(1.25).add_(0.01)  # the optimizer step, in place
        new = m.clone()
        own, res = _split_master(work, r, n, nu if deterministic else None)
        assert own.data_ptr() == work.data_ptr() + (lo + 1) * n * 2
        if deterministic:
            assert torch.equal(_bits16(own), _bits16(new.to(torch.bfloat16)))
        else:
            tie = (new.view(torch.int32) & 0x1FFFF) == 0x08000
            mism = _bits16(own) != _bits16(new.to(torch.bfloat16))
            assert not (mism & ~tie).any()
        # next step: the all-gather put `own` back in slot r
        again = buffer.clone()
        again[r * n : (r + 1) * n] = own
        back = _overlay_master(again, res, r, n, nu if deterministic else None)
        assert torch.equal(back.view(torch.int32), new.view(torch.int32))


def _setup(dp, params, deterministic, tx=None):
    mesh = cached_mesh((dp,), ("dp",))
    dtx = distributed(reuse_fp32_param(tx or adamw(1e-2, weight_decay=0.1), deterministic=deterministic), "dp")
    specs = opt_state_specs(dtx, params, P(), mesh)
    state = shard_map(dtx.init, mesh=mesh, in_specs=(P(),), out_specs=specs)(params)
    upd = shard_map(dtx.update, mesh=mesh, in_specs=(P(), specs, P()), out_specs=(P(), specs))
    return mesh, dtx, specs, state, upd


@pytest.mark.parametrize("dp", [2, 3])
@pytest.mark.parametrize("deterministic", [True, False])
def test_trajectory_matches_single_device_reuse_bitwise(dp, deterministic):
    """20 AdamW steps from fp32 masters with injected even ties: bf16 params every step and the
    fp32 masters at the end equal the single-device reuse_fp32_param bitwise (both modes)."""
    w0 = _away_from_zero(SHAPES, 10 + dp, ties_every=5)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 4, generator=gen)
    _, _, _, state, upd = _setup(dp, w0, deterministic)
    rtx = reuse_fp32_param(adamw(1e-2, weight_decay=0.1), deterministic=deterministic)
    rs = rtx.init(w0)
    for _ in range(20):
        for k in w0:
            assert torch.equal(_bits16(state.params[k]), _bits16(rs.params[k]))
        g = _loss_grads(rs.params, x, y)
        _, state = upd(g, state, None)
        _, rs = apply_step(rtx, g, rs, None)
    nu = state.inner.nu[0] if deterministic else None
    mine = _global_masters(state, nu)
    ref = unpack_fp32(rs.buffer.clone(), rs.inner.nu.clone() if deterministic else None)
    n = ref.numel()
    assert torch.equal(mine[:n].view(torch.int32), ref.view(torch.int32))
    assert not mine[n:].any() and not state.buffer[0][n:].float().any()  # padding stays zero


@pytest.mark.parametrize("dp", [2, 3])
def test_trajectory_matches_distributed_mixed_precision_bitwise(dp):
    """Deterministic mode, 20 steps, partial per-device grads reduce-scattered: params every step
    and master shards at the end equal distributed(adamw) over bf16 params with fp32 master shards."""
    w0 = {k: v.bfloat16() for k, v in _away_from_zero(SHAPES, 20 + dp).items()}
    gen = torch.Generator().manual_seed(4)
    batch = 4 * dp
    x, y = torch.randn(batch, 6, generator=gen), torch.randn(batch, 4, generator=gen)
    mesh, dtx, specs, state, _ = _setup(dp, w0, True)
    mp = distributed(adamw(1e-2, weight_decay=0.1), "dp")
    mp_specs = opt_state_specs(mp, w0, P(), mesh)
    mp_state = shard_map(mp.init, mesh=mesh, in_specs=(P(),), out_specs=mp_specs)(w0)

    def train(tx):
        def step(params, state, x, y):
            with torch.enable_grad():
                local = {k: pvary(v, "dp").detach().requires_grad_() for k, v in params.items()}
                out = x.bfloat16() @ local["w"] + local["b"]
                loss = (out.float() - y).square().sum() / batch + local["c"].float().square().sum() / dp
                grads = dict(zip(local, torch.autograd.grad(loss, list(local.values()))))
            u, state = tx.update(grads, state, params)
            return u, state

        return step

    run = shard_map(train(dtx), mesh=mesh, in_specs=(P(), specs, P("dp"), P("dp")), out_specs=(P(), specs))
    run_mp = shard_map(train(mp), mesh=mesh, in_specs=(P(), mp_specs, P("dp"), P("dp")), out_specs=(P(), mp_specs))
    p_mp = w0
    for _ in range(20):
        for k in w0:
            assert torch.equal(_bits16(state.params[k]), _bits16(p_mp[k]))
        _, state = run(state.params, state, x, y)
        u, mp_state = run_mp(p_mp, mp_state, x, y)
        p_mp = {k: (p_mp[k].float() + u[k]).bfloat16() for k in w0}
    n = sum(v.numel() for v in w0.values())
    mine = _global_masters(state, state.inner.nu[0])
    assert torch.equal(mine[:n].view(torch.int32), mp_state.master[0][:n].view(torch.int32))
    assert torch.equal(state.inner.mu[0][:n], mp_state.inner.mu[0][:n])


@pytest.mark.parametrize("dp", [2, 3])
@pytest.mark.parametrize("shapes", [{"w": (6, 4)}, SHAPES], ids=["N24", "N33"])
def test_bytes_per_device_measured(dp, shapes):
    """Per device, params + optimizer state (measured with state_nbytes, storages counted once):

    reuse:  2*Np (bf16 params buffer; params are views) + 2*n (residual) + 8*n (AdamW mu, nu) + 8
    mixed:  2*N  (bf16 params)                         + 4*n' (fp32 master) + 8*n' + 8

    with n = Np/d = 2*ceil(N/(2d)) and n' = ceil(N/d). With N divisible by 2d: 2 + 10/d bytes
    per parameter against 2 + 12/d, i.e. exactly 2*N/d bytes less."""
    params = {k: v.bfloat16() for k, v in _away_from_zero(shapes, 5).items()}
    N = sum(v.numel() for v in params.values())
    mesh = cached_mesh((dp,), ("dp",))
    dtx = distributed(reuse_fp32_param(adamw(1e-3)), "dp")
    mp = distributed(adamw(1e-3), "dp")

    def measure(params):
        st_ = dtx.init(params)
        shared = all(v.untyped_storage().data_ptr() == st_.buffer[0].untyped_storage().data_ptr() for v in st_.params.values())
        reuse = state_nbytes(st_)
        mixed = state_nbytes((params, mp.init(params)))
        return torch.tensor([[float(reuse), float(mixed), float(shared)]], dtype=torch.float64)

    got = shard_map(measure, mesh=mesh, in_specs=(P(),), out_specs=P("dp"))(params)
    n = 2 * -(-N // (2 * dp))
    n_mp = -(-N // dp)
    for reuse, mixed, shared in got.tolist():
        assert shared == 1.0
        assert reuse == 2 * dp * n + 2 * n + 8 * n + 8
        assert mixed == 2 * N + 12 * n_mp + 8
        if N % (2 * dp) == 0:
            assert mixed - reuse == 2 * N // dp


@settings(max_examples=6, deadline=None)
@given(
    dp=st.sampled_from([2, 3]),
    shapes=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=2), min_size=1, max_size=3),
    seed=st.integers(0, 1000),
)
def test_any_layout_pads_and_matches(dp, shapes, seed):
    """Random leaf shapes (leaves straddle shards, totals rarely divisible): two deterministic
    steps equal the single-device reuse; the global buffer is [Np] with zero padding."""
    params = _away_from_zero({f"p{i}": tuple(s) for i, s in enumerate(shapes)}, seed, ties_every=3)
    N = sum(v.numel() for v in params.values())
    _, _, _, state, upd = _setup(dp, params, True)
    Np = dp * 2 * -(-N // (2 * dp))
    assert isinstance(state, DistributedReuseState)
    assert state.buffer[0].shape == (Np,) and state.residual[0].shape == (Np,)
    rtx = reuse_fp32_param(adamw(1e-2, weight_decay=0.1), deterministic=True)
    rs = rtx.init(params)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(2):
        g = {k: torch.randn(v.shape, generator=gen).bfloat16() for k, v in params.items()}
        before = [x.clone() for x in optree.tree_leaves(state)]
        u, new_state = upd(g, state, None)
        for a, b in zip(before, optree.tree_leaves(state)):  # update is pure
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        for k in params:  # updates reproduce the new params through apply_updates
            assert torch.equal(_bits16((state.params[k].float() + u[k]).bfloat16()), _bits16(new_state.params[k]))
        state = new_state
        rp, rs = apply_step(rtx, g, rs, None)
        for k in params:
            assert torch.equal(_bits16(state.params[k]), _bits16(rp[k]))
    assert not state.buffer[0][N:].float().any()
    assert not _global_masters(state, state.inner.nu[0])[N:].any()


def test_errors():
    mesh = cached_mesh((2,), ("dp",))
    dtx = distributed(reuse_fp32_param(sgd(0.1), deterministic=True), "dp")
    with pytest.raises(Exception, match="AdamState"):
        shard_map(lambda p: dtx.init(p).residual[0], mesh=mesh, in_specs=(P(),), out_specs=P("dp"))({"w": torch.ones(4)})
    with pytest.raises(Exception, match="vary over the optimizer axis"):
        shard_map(lambda p: distributed(reuse_fp32_param(adamw(1e-3))).init(p).residual[0], mesh=mesh, in_specs=(P("dp"),), out_specs=P("dp"))(
            {"w": torch.ones(4)}
        )


def test_dp_by_tp_mesh_with_clip_matches_single_device_reuse():
    """dp x tp: a tp-sharded leaf and a replicated leaf form two groups (buffers P('tp') and P());
    clip + adamw equals the single-device reuse on the full params at E1 (the global norm sums
    shards in another order): bf16 params within one bf16 ulp."""
    mesh = cached_mesh((2, 2), ("dp", "tp"))
    params = _away_from_zero({"w": (3, 4), "b": (5,)}, 30)
    pspecs = {"w": P(None, "tp"), "b": P()}
    make = lambda: reuse_fp32_param(chain(clip_by_global_norm(0.5), adamw(1e-2)), deterministic=True)  # noqa: E731
    dtx = distributed(make(), "dp")
    specs = opt_state_specs(dtx, params, pspecs, mesh)
    assert specs.buffer == (P("tp"), P()) or specs.buffer == (P(), P("tp"))
    state = shard_map(dtx.init, mesh=mesh, in_specs=(pspecs,), out_specs=specs)(params)
    upd = shard_map(dtx.update, mesh=mesh, in_specs=(pspecs, specs, pspecs), out_specs=(pspecs, specs))
    rtx = make()
    rs = rtx.init(params)
    gen = torch.Generator().manual_seed(31)
    for _ in range(3):
        g = {"w": torch.randn(3, 4, generator=gen) * 3, "b": torch.randn(5, generator=gen)}
        _, state = upd(g, state, state.params)
        rp, rs = apply_step(rtx, {k: v.bfloat16() for k, v in g.items()}, rs, None)
        for k in params:
            torch.testing.assert_close(state.params[k].float(), rp[k].float(), rtol=2**-7, atol=0)


def test_single_device_axis_uses_a_two_slot_workspace():
    """d == 1: rank 0's overlay needs slots 0 and 1, so the step's workspace gets a second slot;
    results equal the single-device reuse bitwise."""
    params = _away_from_zero(SHAPES, 40, ties_every=4)
    _, _, _, state, upd = _setup(1, params, True)
    rtx = reuse_fp32_param(adamw(1e-2, weight_decay=0.1), deterministic=True)
    rs = rtx.init(params)
    gen = torch.Generator().manual_seed(41)
    for _ in range(3):
        g = {k: torch.randn(v.shape, generator=gen).bfloat16() for k, v in params.items()}
        _, state = upd(g, state, None)
        rp, rs = apply_step(rtx, g, rs, None)
        for k in params:
            assert torch.equal(_bits16(state.params[k]), _bits16(rp[k]))
