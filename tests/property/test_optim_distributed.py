"""distributed (ZeRO-1) and clip_by_global_norm inside shard_map on simulated meshes."""
import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardfn import P, make_mesh, pvary, shard_map
from shardfn.debug import count_comms
from shardfn.optim import (
    adamw,
    apply_updates,
    chain,
    clip_by_global_norm,
    fused_ema_adamw,
    global_norm,
    sgd,
    state_nbytes,
)
from shardfn.optim import distributed, opt_state_specs

_MESHES = {}


def _mesh(shape, names):
    key = (shape, names)
    if key not in _MESHES:
        _MESHES[key] = make_mesh(shape, names, backend="sim")
    return _MESHES[key]


def _params(sizes, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(*s, generator=gen).to(dtype) for i, s in enumerate(sizes)}


# total numel 15 + 7 + 4 = 26: not divisible by 3 or 4 (padding) and p0 straddles every boundary
SIZES = [(5, 3), (7,), (2, 2)]


@pytest.mark.parametrize("dp", [2, 3, 4])
@pytest.mark.parametrize("make_tx", [lambda: adamw(1e-2), lambda: sgd(0.1, 0.9), lambda: fused_ema_adamw(1e-2, ema_decay=0.9, impl="foreach")])
def test_updates_bitwise_given_equal_grads(dp, make_tx):
    """Invariant (already reduced) grads: each device slices its shard; updates equal the
    non-distributed transformation's bitwise, over several steps with the state round-tripped
    through global tensors by opt_state_specs."""
    mesh = _mesh((dp,), ("dp",))
    params = _params(SIZES, dp)
    dtx, tx = distributed(make_tx(), "dp"), make_tx()
    specs = opt_state_specs(dtx, params, P(), mesh)
    state = shard_map(dtx.init, mesh=mesh, in_specs=(P(),), out_specs=specs)(params)
    s_ref = tx.init(params)
    p, p_ref = params, params
    gen = torch.Generator().manual_seed(100 + dp)
    upd = shard_map(dtx.update, mesh=mesh, in_specs=(P(), specs, P()), out_specs=(P(), specs))
    for _ in range(4):
        g = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
        u, state = upd(g, state, p)
        u_ref, s_ref = tx.update(g, s_ref, p_ref)
        for k in params:
            assert torch.equal(u[k], u_ref[k])
        p, p_ref = apply_updates(p, u), apply_updates(p_ref, u_ref)
    n = sum(v.numel() for v in params.values())
    padded = -(-n // dp) * dp
    flat_leaves = [x for x in optree.tree_leaves(state) if x.dim() == 1 and x.numel() > 0]
    assert flat_leaves and all(x.shape == (padded,) for x in flat_leaves)  # global = padded flat buffer


def _loss(params, x, y, total_batch):
    out = x @ params["p0"] + params["p1"][:3]
    return ((out - y) ** 2).sum() / total_batch + (params["p2"] ** 2).sum() / 4


def _train_step(dtx, batch):
    def step(params, state, x, y):
        with torch.enable_grad():
            local = {k: pvary(v, "dp").detach().requires_grad_() for k, v in params.items()}
            loss = _loss(local, x, y, batch)
            grads = dict(zip(local, torch.autograd.grad(loss, list(local.values()))))
        u, state = dtx.update(grads, state, params)
        return apply_updates(params, u), state

    return step


@pytest.mark.parametrize("dp", [2, 3, 4])
def test_training_matches_full_batch_optimizer(dp):
    """Per-device batches, partial grads reduce-scattered: params after N steps equal the
    single-device optimizer on the full batch at E1 (the sum order differs)."""
    mesh = _mesh((dp,), ("dp",))
    params = _params(SIZES, 7)
    gen = torch.Generator().manual_seed(8)
    batch = 4 * dp
    x, y = torch.randn(batch, 5, generator=gen), torch.randn(batch, 3, generator=gen)
    dtx = distributed(chain(clip_by_global_norm(1.0), adamw(1e-2)), "dp")
    specs = opt_state_specs(dtx, params, P(), mesh)
    state = shard_map(dtx.init, mesh=mesh, in_specs=(P(),), out_specs=specs)(params)
    run = shard_map(_train_step(dtx, batch), mesh=mesh, in_specs=(P(), specs, P("dp"), P("dp")), out_specs=(P(), specs))
    tx = chain(clip_by_global_norm(1.0), adamw(1e-2))
    p_ref, s_ref = params, tx.init(params)
    p = params
    for _ in range(5):
        p, state = run(p, state, x, y)
        local = {k: v.detach().requires_grad_() for k, v in p_ref.items()}
        grads = dict(zip(local, torch.autograd.grad(_loss(local, x, y, batch), list(local.values()))))
        u, s_ref = tx.update(grads, s_ref, p_ref)
        p_ref = apply_updates(p_ref, u)
    for k in params:
        # E1: fp32 sums in a different order feed Adam's normalised step; 5 steps of lr 1e-2
        torch.testing.assert_close(p[k], p_ref[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dp", [2, 4])
def test_bf16_params_with_fp32_master_shards(dp):
    """bf16 params: fp32 master shards in the state; updates bitwise the mixed-precision reference."""
    mesh = _mesh((dp,), ("dp",))
    master = _params(SIZES, 11)
    params = {k: v.bfloat16() for k, v in master.items()}
    dtx = distributed(adamw(1e-2), "dp")
    specs = opt_state_specs(dtx, params, P(), mesh)
    state = shard_map(dtx.init, mesh=mesh, in_specs=(P(),), out_specs=specs)(params)
    tx = adamw(1e-2)
    m_ref = {k: v.float() for k, v in params.items()}  # masters start from the bf16 values
    s_ref = tx.init(m_ref)
    gen = torch.Generator().manual_seed(12)
    upd = shard_map(dtx.update, mesh=mesh, in_specs=(P(), specs, P()), out_specs=(P(), specs))
    for _ in range(3):
        g = {k: torch.randn(v.shape, generator=gen).bfloat16() for k, v in params.items()}
        u, state = upd(g, state, params)
        params = apply_updates(params, u)
        u_ref, s_ref = tx.update({k: v.float() for k, v in g.items()}, s_ref, m_ref)
        m_ref = apply_updates(m_ref, u_ref)
        for k in params:
            assert params[k].dtype == torch.bfloat16
            assert torch.equal(params[k], m_ref[k].bfloat16())


@pytest.mark.parametrize("dp", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_bytes_per_device_and_comm_volume(dp, dtype):
    """Optimizer-state bytes per device = 1/dp of the total (+ padding); comm = reduce-scatter of
    fp32 grads + all-gather of params, (dp-1)/dp of the padded buffer each (PERF.md 2.5)."""
    mesh = _mesh((dp,), ("dp",))
    params = _params(SIZES, 3, dtype)
    n = sum(v.numel() for v in params.values())
    padded = -(-n // dp) * dp
    dtx = distributed(adamw(1e-3), "dp")

    def measure(params):
        state = dtx.init(params)
        return torch.full((1,), float(state_nbytes(state)))

    per_device = shard_map(measure, mesh=mesh, in_specs=(P(),), out_specs=P("dp"))(params)
    shard = padded // dp
    master = 4 * shard if dtype != torch.float32 else 0
    expected = 8 * shard + master + 8  # mu + nu fp32 (+ fp32 master for bf16) + int64 counter
    assert per_device.tolist() == [float(expected)] * dp
    specs = opt_state_specs(dtx, params, P(), mesh)
    state = shard_map(dtx.init, mesh=mesh, in_specs=(P(),), out_specs=specs)(params)
    g = {k: torch.ones(v.shape, dtype=dtype) for k, v in params.items()}
    with count_comms() as log:
        shard_map(dtx.update, mesh=mesh, in_specs=(P(), specs, P()), out_specs=(P(), specs))(g, state, params)
    gather_bytes = log.bytes_sent(0, name="all_gather")
    elt = torch.finfo(dtype).bits // 8
    assert gather_bytes == (dp - 1) * shard * elt  # (d-1)/d of the padded param buffer
    assert log.bytes_sent(0, name="psum_scatter") == 0  # invariant grads are sliced, not summed


def test_reduce_scatter_volume_for_partial_grads():
    dp = 4
    mesh = _mesh((dp,), ("dp",))
    params = _params(SIZES, 3)
    padded = -(-26 // dp) * dp
    dtx = distributed(adamw(1e-3), "dp")
    specs = opt_state_specs(dtx, params, P(), mesh)
    state = shard_map(dtx.init, mesh=mesh, in_specs=(P(),), out_specs=specs)(params)
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    run = shard_map(_train_step(dtx, 8), mesh=mesh, in_specs=(P(), specs, P("dp"), P("dp")), out_specs=(P(), specs))
    with count_comms() as log:
        run(params, state, x, y)
    assert log.bytes_sent(0, name="psum_scatter") == (dp - 1) * (padded // dp) * 4
    assert log.bytes_sent(0, name="all_gather") == (dp - 1) * (padded // dp) * 4


@settings(max_examples=4)
@given(tp=st.sampled_from([2, 3]), rows=st.integers(1, 3), scale=st.floats(0.1, 10.0))
def test_clip_inside_shard_map_sums_over_exactly_the_varying_axes(tp, rows, scale):
    """A tp-sharded leaf is psum'd over tp; a replicated leaf (over dp and tp) is not."""
    mesh = _mesh((2, tp), ("dp", "tp"))
    gen = torch.Generator().manual_seed(rows)
    grads = {
        "col": torch.randn(4, rows * tp, generator=gen) * scale,  # P(None, 'tp')
        "row": torch.randn(rows * tp * 2, 3, generator=gen),  # P(('dp', 'tp'))
        "rep": torch.randn(5, generator=gen),  # replicated
    }
    specs = {"col": P(None, "tp"), "row": P(("dp", "tp")), "rep": P()}
    norm = shard_map(lambda g: global_norm(g).reshape(1), mesh=mesh, in_specs=(specs,), out_specs=P())(grads)
    ref = global_norm(grads)
    torch.testing.assert_close(norm[0], ref, rtol=1e-6, atol=0)  # E1: sum order
    clipped = shard_map(lambda g: clip_by_global_norm(1.0).update(g, (), None)[0], mesh=mesh, in_specs=(specs,), out_specs=specs)(grads)
    want, _ = clip_by_global_norm(1.0).update(grads, (), None)
    for k in grads:
        torch.testing.assert_close(clipped[k], want[k], rtol=1e-6, atol=1e-7)


def test_distributed_with_tp_sharded_params():
    """dp x tp mesh: a tp-sharded leaf and a replicated leaf form two groups; clip + adamw
    inside distributed equals the single-device chain on the full params (E1)."""
    mesh = _mesh((2, 2), ("dp", "tp"))
    params = {"w": torch.randn(3, 4), "b": torch.randn(5)}
    pspecs = {"w": P(None, "tp"), "b": P()}
    dtx = distributed(chain(clip_by_global_norm(0.5), adamw(1e-2)), "dp")
    specs = opt_state_specs(dtx, params, pspecs, mesh)
    assert specs.inner[1].mu[0] == P(("dp", "tp")) or specs.inner[1].mu[1] == P(("dp", "tp"))
    state = shard_map(dtx.init, mesh=mesh, in_specs=(pspecs,), out_specs=specs)(params)
    tx = chain(clip_by_global_norm(0.5), adamw(1e-2))
    s_ref, p_ref, p = tx.init(params), params, params
    upd = shard_map(dtx.update, mesh=mesh, in_specs=(pspecs, specs, pspecs), out_specs=(pspecs, specs))
    for i in range(3):
        g = {"w": torch.randn(3, 4) * 3, "b": torch.randn(5)}
        u, state = upd(g, state, p)
        u_ref, s_ref = tx.update(g, s_ref, p_ref)
        p, p_ref = apply_updates(p, u), apply_updates(p_ref, u_ref)
        for k in params:
            torch.testing.assert_close(p[k], p_ref[k], rtol=1e-5, atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="grad_reduce='max'"):
        distributed(adamw(1e-3), grad_reduce="max")
    with pytest.raises(TypeError, match="distributed"):
        opt_state_specs(adamw(1e-3), {"w": torch.ones(2)}, P(), _mesh((2,), ("dp",)))
    mesh = _mesh((2,), ("dp",))
    dtx = distributed(adamw(1e-3))
    with pytest.raises(Exception, match="vary over the optimizer axis"):
        shard_map(lambda p: dtx.init(p).inner.count, mesh=mesh, in_specs=(P("dp"),), out_specs=P())({"w": torch.ones(4)})


def test_state_checkpoint_round_trip(tmp_path):
    """The global state (shaped by opt_state_specs) saved with torch.save and loaded continues bitwise."""
    dp = 2
    mesh = _mesh((dp,), ("dp",))
    params = _params(SIZES, 21)
    dtx = distributed(adamw(1e-2), "dp")
    specs = opt_state_specs(dtx, params, P(), mesh)
    state = shard_map(dtx.init, mesh=mesh, in_specs=(P(),), out_specs=specs)(params)
    upd = shard_map(dtx.update, mesh=mesh, in_specs=(P(), specs, P()), out_specs=(P(), specs))
    g = {k: torch.randn(v.shape) for k, v in params.items()}
    _, state = upd(g, state, params)
    leaves, treespec = optree.tree_flatten(state)
    torch.save(leaves, tmp_path / "opt.pt")  # plain tensors: loads with weights_only=True
    loaded = optree.tree_unflatten(treespec, torch.load(tmp_path / "opt.pt", weights_only=True))
    u1, s1 = upd(g, state, params)
    u2, s2 = upd(g, loaded, params)
    for a, b in zip(optree.tree_leaves((u1, s1)), optree.tree_leaves((u2, s2))):
        assert torch.equal(a, b)


@settings(max_examples=8)
@given(
    dp=st.sampled_from([2, 3, 4]),
    shapes=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=2), min_size=1, max_size=4),
    seed=st.integers(0, 1000),
)
def test_any_layout_pads_and_matches(dp, shapes, seed):
    """Random leaf shapes (leaves straddle shard boundaries, total rarely divisible by dp)."""
    mesh = _mesh((dp,), ("dp",))
    params = _params(shapes, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    g = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    dtx, tx = distributed(adamw(1e-2, weight_decay=0.1), "dp"), adamw(1e-2, weight_decay=0.1)
    specs = opt_state_specs(dtx, params, P(), mesh)
    state = shard_map(dtx.init, mesh=mesh, in_specs=(P(),), out_specs=specs)(params)
    u, state = shard_map(dtx.update, mesh=mesh, in_specs=(P(), specs, P()), out_specs=(P(), specs))(g, state, params)
    u_ref, s_ref = tx.update(g, tx.init(params), params)
    for k in params:
        assert torch.equal(u[k], u_ref[k])
    n = sum(v.numel() for v in params.values())
    mu = state.inner.mu[0]
    assert mu.shape == (max(dp, -(-n // dp) * dp),)
    assert torch.equal(mu[:n], torch.cat([s_ref.mu[k].reshape(-1) for k in sorted(params)]))
    assert not mu[n:].any()  # padding stays inert
