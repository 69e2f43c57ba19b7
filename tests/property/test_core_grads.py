"""shard_map'd programs against their single-device function: splitting/joining by drawn specs,
and float64 gradients against torch.func.grad (auto pvary, manual pvary under check_vma=False,
pytrees in and out with non-tensor leaves passing through).

Tolerance: rtol=atol=1e-10 for float64 programs with matmuls and tanh (sums reordered across
devices differ from the single-device sums by a few ulps per element).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, strategies as st

import shardfn
from shardfn import P, pvary, psum, shard_map
from shardfn.testing import assert_equivalent, cached_mesh, meshes, sharded_shapes, specs

RTOL = ATOL = 1e-10


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def _block_of(x, spec, mesh, d):
    """Device d's block of global x under spec: a reference written without shardfn.spec."""
    sizes = [mesh.shape[a] for a in mesh.axis_names]
    coords = dict(zip(mesh.axis_names, list(itertools.product(*(range(s) for s in sizes)))[d]))
    for dim, entry in enumerate(spec):
        axes = () if entry is None else ((entry,) if isinstance(entry, str) else entry)
        if not axes:
            continue
        index = 0
        for a in axes:
            index = index * mesh.shape[a] + coords[a]
        n = math.prod(mesh.shape[a] for a in axes)
        x = x.tensor_split(n, dim)[index]
    return x


def _seeded(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@st.composite
def mesh_and_spec(draw, ndim):
    mesh = draw(meshes(), label="mesh")
    spec = draw(specs(mesh, ndim), label="spec")
    shape = draw(sharded_shapes(mesh, spec, ndim), label="shape")
    return mesh, spec, shape


# ---- splitting and joining ------------------------------------------------------------------------
@given(data=st.data())
def test_blocks_follow_the_spec(data):
    """Device d sees exactly its block; out_specs=P(every axis) stacks what each device saw."""
    ndim = data.draw(st.integers(1, 3), label="ndim")
    mesh, spec, shape = data.draw(mesh_and_spec(ndim))
    x = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
    every = P(tuple(mesh.axis_names))
    seen = shard_map(lambda t: t.unsqueeze(0), mesh=mesh, in_specs=spec, out_specs=every, check_vma=False)(x)
    for d in range(mesh.size):
        assert torch.equal(seen[d], _block_of(x, spec, mesh, d)), (d, spec)
    # identity round trip under the same spec, with and without vma tracking
    for check_vma in (True, False):
        back = shard_map(lambda t: t, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=check_vma)(x)
        assert torch.equal(back, x)


@given(data=st.data())
def test_elementwise_program_gradient(data):
    """An elementwise program under any spec: values and float64 gradients match the reference."""
    ndim = data.draw(st.integers(1, 3), label="ndim")
    mesh, spec, shape = data.draw(mesh_and_spec(ndim))
    x = _seeded(shape, 0)
    cot = _seeded(shape, 1)
    ref = lambda t: torch.tanh(t) * t + 1.5
    f = shard_map(ref, mesh=mesh, in_specs=spec, out_specs=spec)
    xs = x.clone().requires_grad_(True)
    y = f(xs)
    _close(y.detach(), ref(x))
    (g,) = torch.autograd.grad(y, xs, cot)
    _close(g, torch.func.grad(lambda t: (ref(t) * cot).sum())(x))


# ---- replicated weights used by sharded activations --------------------------------------------------
@st.composite
def split_axes(draw, mesh):
    """Two disjoint groups of mesh axes (either may be empty), each in a drawn order."""
    order = draw(st.permutations(mesh.axis_names))
    cut = draw(st.integers(0, len(order)))
    rest = order[cut:]
    cut2 = draw(st.integers(0, len(rest)))
    return tuple(order[:cut]), tuple(rest[:cut2])


def _entry(axes):
    return None if not axes else (axes[0] if len(axes) == 1 else tuple(axes))


@pytest.mark.parametrize("check_vma", [True, False])
@given(data=st.data())
def test_data_parallel_linear_auto_or_manual_pvary(check_vma, data):
    """x split over dp axes, w and b replicated: grad of w and b summed over dp with no manual step.

    With check_vma=False the program places pvary on the replicated weights by hand.
    """
    mesh = data.draw(meshes(), label="mesh")
    dp, _ = data.draw(split_axes(mesh), label="axes")
    n = math.prod(mesh.shape[a] for a in dp)
    b, h, f = n * data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    x, w, bias = _seeded((b, h), 2), _seeded((h, f), 3), _seeded((f,), 4)

    def ref(x, w, bias):
        return (torch.tanh(x @ w + bias) ** 2).sum()

    def local(x, w, bias):
        if not check_vma and dp:
            w, bias = pvary((w, bias), dp)  # Megatron's copy-to-region operator, by hand
        y = (torch.tanh(x @ w + bias) ** 2).sum()
        return psum(y, dp) if dp else y

    sharded = shard_map(local, mesh=mesh, in_specs=(P(_entry(dp)), P(), None), out_specs=P(), check_vma=check_vma)
    args = [t.clone().requires_grad_(True) for t in (x, w, bias)]
    out = sharded(*args)
    _close(out.detach(), ref(x, w, bias))
    got = torch.autograd.grad(out, args)
    want = torch.func.grad(ref, argnums=(0, 1, 2))(x, w, bias)
    for g, r in zip(got, want):
        _close(g, r)


@given(data=st.data())
def test_megatron_mlp_auto_pvary(data):
    """Column- then row-parallel MLP over tp axes, batch over dp axes, replicated x over tp."""
    mesh = data.draw(meshes(), label="mesh")
    dp, tp = data.draw(split_axes(mesh), label="axes")
    ndp = math.prod(mesh.shape[a] for a in dp)
    ntp = math.prod(mesh.shape[a] for a in tp)
    b, h, f = ndp * data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), ntp * data.draw(st.integers(1, 2))
    x, w1, w2 = _seeded((b, h), 5), _seeded((h, f), 6), _seeded((f, h), 7)

    def ref(x, w1, w2):
        return torch.tanh(x @ w1) @ w2

    def local(x, w1, w2):
        y = torch.tanh(x @ w1) @ w2
        return psum(y, tp) if tp else y

    sharded = shard_map(local, mesh=mesh, in_specs=(P(_entry(dp)), P(None, _entry(tp)), P(_entry(tp))),
                        out_specs=P(_entry(dp)))
    assert_equivalent(sharded, ref, x, w1, w2, rtol=RTOL, atol=ATOL)
    # the same with torch.func.grad of a scalar loss, as a second, independent oracle
    cot = _seeded((b, h), 8)
    args = [t.clone().requires_grad_(True) for t in (x, w1, w2)]
    got = torch.autograd.grad((sharded(*args) * cot).sum(), args)
    want = torch.func.grad(lambda *a: (ref(*a) * cot).sum(), argnums=(0, 1, 2))(x, w1, w2)
    for g, r in zip(got, want):
        _close(g, r)


@given(data=st.data())
def test_pvary_transposes_to_psum(data):
    """pvary of a replicated value handed out per device: the gradient sums every device's cotangent."""
    mesh = data.draw(meshes(), label="mesh")
    axes = tuple(data.draw(st.lists(st.sampled_from(mesh.axis_names), min_size=1, unique=True), label="axes"))
    check_vma = data.draw(st.booleans(), label="check_vma")
    every = tuple(mesh.axis_names)
    x = _seeded((3,), 9)
    cot = _seeded((mesh.size, 3), 10)

    def local(x):
        # with check_vma=True shard_map adds the pvary over the axes out_specs names beyond `axes`;
        # by hand (check_vma=False) the program names them all.
        return pvary(x, axes if check_vma else every).unsqueeze(0)

    f = shard_map(local, mesh=mesh, in_specs=P(), out_specs=P(every), check_vma=check_vma)
    xs = x.clone().requires_grad_(True)
    y = f(xs)
    assert torch.equal(y.detach(), x.expand(mesh.size, 3))
    (g,) = torch.autograd.grad(y, xs, cot)
    _close(g, cot.sum(0))
    # dot-product transpose test: <pvary(x), y> == <x, psum(y)> summed over devices
    _close((y.detach() * cot).sum(), (x * g).sum())


# ---- pytrees in and out ---------------------------------------------------------------------------
@given(data=st.data())
def test_pytrees_in_and_out(data):
    """Dicts and tuples in and out; None, int and str leaves pass through; specs are prefixes."""
    mesh = data.draw(meshes(), label="mesh")
    dp, tp = data.draw(split_axes(mesh), label="axes")
    ndp = math.prod(mesh.shape[a] for a in dp)
    ntp = math.prod(mesh.shape[a] for a in tp)
    b, h = ndp * 2, ntp * data.draw(st.integers(1, 2))
    params = {"w": _seeded((h, h), 11), "scale": _seeded((h,), 12)}
    batch = (_seeded((b, h), 13), None, 3, "tag")
    every = dp + tp

    def ref(params, batch):
        x, nothing, k, tag = batch
        y = torch.tanh(x @ params["w"]) * params["scale"] * k
        return {"loss": (y ** 2).sum(), "y": y, "k": k, "none": nothing, "tag": tag}

    def local(params, batch):
        x, nothing, k, tag = batch
        assert nothing is None and k == 3 and tag == "tag"
        y = torch.tanh(x @ params["w"]) * params["scale"] * k  # [b/dp, h/tp]
        loss = (y ** 2).sum()
        return {"loss": psum(loss, every) if every else loss, "y": y, "k": k, "none": nothing, "tag": tag}

    # a dict of specs for params; for the batch tuple one spec per leaf (a split P over the whole
    # tuple would also try to split its int and str leaves, an error tested elsewhere)
    in_specs = ({"w": P(None, _entry(tp)), "scale": P(_entry(tp))}, (P(_entry(dp)), None, None, P()))
    out_specs = {"loss": P(), "y": P(_entry(dp), _entry(tp)), "k": None, "none": None, "tag": P()}
    sharded = shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    assert_equivalent(sharded, ref, params, batch, rtol=RTOL, atol=ATOL)
    out = sharded(params, batch)
    assert out["k"] == 3 and out["none"] is None and out["tag"] == "tag"
    assert set(out) == {"loss", "y", "k", "none", "tag"}
    # gradients of the dict leaves against torch.func.grad
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    got = torch.autograd.grad(sharded(leaves, batch)["loss"], [leaves["w"], leaves["scale"]])
    want = torch.func.grad(lambda p: ref(p, batch)["loss"])(params)
    _close(got[0], want["w"])
    _close(got[1], want["scale"])


def test_tuple_output_with_unused_input_gradient():
    """An input that no output depends on gets a zero gradient (or None), never garbage."""
    mesh = cached_mesh((2, 2), ("a", "b"))
    x, z = _seeded((4, 2), 14), _seeded((2,), 15)
    f = shard_map(lambda x, z: (x * 2, psum(x.sum(), ("a", "b"))), mesh=mesh,
                  in_specs=(P(("a", "b")), P()), out_specs=(P(("a", "b")), P()))
    xs, zs = x.clone().requires_grad_(True), z.clone().requires_grad_(True)
    y, s = f(xs, zs)
    gx, gz = torch.autograd.grad(y.sum() + 3 * s, (xs, zs), allow_unused=True)
    _close(gx, torch.full_like(x, 5.0))
    assert gz is None or torch.equal(gz, torch.zeros_like(z))


def test_one_device_mesh_runs_inline_with_autograd():
    mesh = cached_mesh((1,), ("a",))
    x = _seeded((3, 2), 16)
    f = shard_map(lambda x: psum(torch.sin(x), "a") * shardfn.axis_size("a"), mesh=mesh, in_specs=P("a"), out_specs=P("a"))
    assert_equivalent(f, torch.sin, x, rtol=RTOL, atol=ATOL)


def test_integer_and_python_outputs_next_to_differentiable_ones():
    """int64 tensors (axis_index) and Python numbers (psum of an int) come out unchanged; grads flow."""
    mesh = cached_mesh((2, 2), ("a", "b"))
    x = _seeded((4,), 17)
    f = shard_map(lambda x: (torch.sin(x), shardfn.axis_index(("b", "a")).reshape(1), psum(1, ("a", "b"))),
                  mesh=mesh, in_specs=P(("a", "b")), out_specs=(P(("a", "b")), P(("a", "b")), None))
    xs = x.clone().requires_grad_(True)
    y, idx, n = f(xs)
    assert idx.tolist() == [0, 2, 1, 3] and idx.dtype == torch.int64 and n == 4
    (g,) = torch.autograd.grad(y, xs, torch.ones(4, dtype=torch.float64))
    _close(g, torch.cos(x))
