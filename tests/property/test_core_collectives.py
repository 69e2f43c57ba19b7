"""Every named collective against a loop-over-blocks reference written here, on drawn meshes.

Each case maps one collective over every device of a mesh (1-8 devices over 1-3 axes) with
device d holding block d of a global tensor X [size, *block]; the result of device d is row d of
the output. The references below compute each device's result with plain torch ops from the list
of blocks and the device's group (members in group order, its index in the group), independently
of shardfn's own spec helpers. The same references are differentiable, so they also serve as the
single-device oracle for gradients (torch.func.grad, float64), and the linear cases get the
dot-product transpose test <f(x), y> == <x, f_T(y)> summed over devices, with f_T both from
autograd and from the explicit transpose collective. count_comms is checked against PERF.md 2.1.

Tolerances: values on arange inputs are compared exactly (integers in float64 are summed exactly
in any order); gradients and dot products of random float64 inputs use rtol=1e-12, atol=1e-12
(a handful of float64 roundings).
"""
from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings, strategies as st

import shardfn
from shardfn import P, shard_map
from shardfn.debug import count_comms
from shardfn.testing import cached_mesh, meshes

RTOL = ATOL = 1e-12


# ---- the reference: groups and per-device results from a list of blocks --------------------------
def coords_table(mesh):
    """Coordinates of every device in rank order (row-major, last axis fastest)."""
    sizes = [mesh.shape[a] for a in mesh.axis_names]
    return [dict(zip(mesh.axis_names, c)) for c in itertools.product(*(range(s) for s in sizes))]


def group_of(mesh, d, axes):
    """(members of device d's group over `axes` in group order, d's index in it)."""
    table = coords_table(mesh)
    others = [a for a in mesh.axis_names if a not in axes]

    def radix(e):
        index = 0
        for a in axes:
            index = index * mesh.shape[a] + table[e][a]
        return index

    members = [e for e, c in enumerate(table) if all(c[a] == table[d][a] for a in others)]
    members.sort(key=radix)
    return members, radix(d)


def _total(blocks, members):
    acc = blocks[members[0]]
    for m in members[1:]:
        acc = acc + blocks[m]
    return acc


class Case:
    """One collective call: block shape, the per-device program and its per-device reference."""

    def __init__(self, block, local, ref, *, linear, transpose=None, values="arange", out_varies=True):
        self.block = block  # per-device input shape
        self.local = local  # x_local -> y_local (inside shard_map)
        self.ref = ref  # (blocks, members, index) -> y_local expected
        self.linear = linear
        self.transpose = transpose  # y_local -> x_local, the explicit transpose collective
        self.values = values
        self.out_varies = out_varies  # False for outputs typed invariant over the axes


def _shape(draw, rank_min=0, rank_max=2, fixed=None):
    rank = draw(st.integers(rank_min, rank_max))
    shape = [draw(st.integers(1, 3)) for _ in range(rank)]
    for dim, size in (fixed or {}).items():
        shape[dim] = size(shape[dim])
    return tuple(shape)


def make_case(name, draw, axes, n):
    """Draw the arguments of collective `name` over `axes` (group size n) and build its Case."""
    if name in ("psum", "pmean", "pmax", "pmin"):
        fn = getattr(shardfn, name)
        block = _shape(draw)
        if name == "psum":
            ref = lambda b, ms, i: _total(b, ms)
        elif name == "pmean":
            ref = lambda b, ms, i: _total(b, ms) / len(ms)
        elif name == "pmax":
            ref = lambda b, ms, i: torch.stack([b[m] for m in ms]).amax(0)
        else:
            ref = lambda b, ms, i: torch.stack([b[m] for m in ms]).amin(0)
        linear = name in ("psum", "pmean")
        return Case(
            block, lambda x: fn(x, axes), ref, linear=linear,
            transpose=(lambda y: fn(y, axes)) if linear else None,
            values="arange" if linear else "distinct", out_varies=False,
        )
    if name in ("all_gather", "all_gather_tiled", "all_gather_invariant", "all_gather_invariant_tiled"):
        tiled = name.endswith("tiled")
        fn = shardfn.all_gather_invariant if "invariant" in name else shardfn.all_gather
        block = _shape(draw, rank_min=1 if tiled else 0)
        dim = draw(st.integers(0, len(block) - 1 if tiled else len(block)))
        if tiled:
            ref = lambda b, ms, i: torch.cat([b[m] for m in ms], dim)
        else:
            ref = lambda b, ms, i: torch.stack([b[m] for m in ms], dim)
        transpose = None if "invariant" in name else (lambda y: shardfn.psum_scatter(y, axes, dim=dim, tiled=tiled))
        return Case(block, lambda x: fn(x, axes, dim=dim, tiled=tiled), ref, linear=True, transpose=transpose,
                    out_varies="invariant" not in name)
    if name in ("psum_scatter", "psum_scatter_tiled"):
        tiled = name.endswith("tiled")
        rank = draw(st.integers(1, 3))
        dim = draw(st.integers(0, rank - 1))
        block = list(_shape(draw, rank, rank))
        block[dim] = n * draw(st.integers(1, 2)) if tiled else n
        if tiled:
            ref = lambda b, ms, i: _total(b, ms).chunk(n, dim)[i]
        else:
            ref = lambda b, ms, i: _total(b, ms).select(dim, i)
        return Case(tuple(block), lambda x: shardfn.psum_scatter(x, axes, dim=dim, tiled=tiled), ref, linear=True,
                    transpose=lambda y: shardfn.all_gather(y, axes, dim=dim, tiled=tiled))
    if name in ("all_to_all", "all_to_all_tiled"):
        tiled = name.endswith("tiled")
        rank = draw(st.integers(1, 3))
        split = draw(st.integers(0, rank - 1))
        concat = draw(st.integers(0, rank - 1))
        block = list(_shape(draw, rank, rank))
        block[split] = n * draw(st.integers(1, 2)) if tiled else n
        if tiled:
            ref = lambda b, ms, i: torch.cat([b[m].chunk(n, split)[i] for m in ms], concat)
        else:  # jax.lax.all_to_all: split_dim removed, a new axis of size n at concat_dim
            ref = lambda b, ms, i: torch.stack([b[m].select(split, i) for m in ms], concat)
        return Case(tuple(block), lambda x: shardfn.all_to_all(x, axes, split, concat, tiled=tiled), ref, linear=True,
                    transpose=lambda y: shardfn.all_to_all(y, axes, concat, split, tiled=tiled))
    if name == "ppermute":
        block = _shape(draw)
        targets = draw(st.permutations(range(n)))
        sources = draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n))  # some may receive nothing
        perm = [(s, targets[s]) for s in sources]
        inverse = [(d, s) for s, d in perm]

        def ref(b, ms, i):
            got = [s for s, d in perm if d == i]
            return b[ms[got[0]]] if got else torch.zeros_like(b[ms[i]])

        case = Case(block, lambda x: shardfn.ppermute(x, axes, perm), ref, linear=True,
                    transpose=lambda y: shardfn.ppermute(y, axes, inverse))
        case.perm = perm
        return case
    if name == "axis_index":
        return Case((), lambda x: shardfn.axis_index(axes), lambda b, ms, i: torch.tensor(i, dtype=torch.int64),
                    linear=False)
    if name == "axis_size":
        return Case((), lambda x: torch.tensor(shardfn.axis_size(axes)), lambda b, ms, i: torch.tensor(len(ms)),
                    linear=False, out_varies=False)
    raise KeyError(name)


ALL = [
    "psum", "pmean", "pmax", "pmin",
    "all_gather", "all_gather_tiled", "all_gather_invariant", "all_gather_invariant_tiled",
    "psum_scatter", "psum_scatter_tiled", "all_to_all", "all_to_all_tiled", "ppermute",
    "axis_index", "axis_size",
]
LINEAR = [c for c in ALL if c not in ("pmax", "pmin", "axis_index", "axis_size")]
DIFFERENTIABLE = [c for c in ALL if c not in ("axis_index", "axis_size")]


@st.composite
def axis_names(draw, mesh):
    """A str or a tuple of distinct mesh axis names in any order."""
    axes = tuple(draw(st.lists(st.sampled_from(mesh.axis_names), min_size=1, unique=True)))
    if len(axes) == 1 and draw(st.booleans()):
        return axes[0]
    return axes


def as_tuple(axis_name):
    return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def global_input(mesh, case, *, random=False, seed=0):
    shape = (mesh.size,) + case.block
    numel = math.prod(shape)
    if random:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=gen, dtype=torch.float64)
    if case.values == "distinct":  # a fixed scramble of arange: no ties for pmax / pmin
        return ((torch.arange(numel, dtype=torch.float64) * 7) % (numel + (numel % 7 == 0)) - numel / 2).reshape(shape)
    return torch.arange(numel, dtype=torch.float64).reshape(shape)


def mapped(mesh, local, *, check_vma=True, wrap_pvary=None):
    """Global function X [size, *block] -> Y [size, *out]: row d is device d's result."""
    every = P(tuple(mesh.axis_names))

    def per_device(x):
        y = local(x[0])
        if wrap_pvary is not None:
            y = shardfn.pvary(y, wrap_pvary)
        return y.unsqueeze(0)

    return shard_map(per_device, mesh=mesh, in_specs=every, out_specs=every, check_vma=check_vma)


def reference(mesh, case, axes):
    """The global reference function built from the per-device references."""
    groups = [group_of(mesh, d, axes) for d in range(mesh.size)]

    def ref(x):
        blocks = list(x.unbind(0))
        return torch.stack([case.ref(blocks, ms, i) for ms, i in groups])

    return ref


# ---- values ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@given(data=st.data())
def test_collective_matches_loop_reference(name, data):
    mesh = data.draw(meshes(), label="mesh")
    axis_name = data.draw(axis_names(mesh), label="axis_name")
    axes = as_tuple(axis_name)
    n = math.prod(mesh.shape[a] for a in axes)
    case = make_case(name, data.draw, axis_name, n)
    check_vma = data.draw(st.booleans(), label="check_vma")
    x = global_input(mesh, case)
    got = mapped(mesh, case.local, check_vma=check_vma)(x)
    want = reference(mesh, case, axes)(x)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert torch.equal(got, want), f"{name} over {axis_name!r} on {mesh}:\n{got}\n!=\n{want}"


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
@pytest.mark.parametrize("name", ALL)
@settings(max_examples=3)
@given(data=st.data())
def test_tuple_axis_names_in_both_orders(name, order, data):
    """A tuple axis_name is a mixed-radix index, first name major, whatever the mesh order."""
    mesh = cached_mesh((2, 3), ("a", "b"))
    case = make_case(name, data.draw, order, 6)
    x = global_input(mesh, case)
    got = mapped(mesh, case.local)(x)
    want = reference(mesh, case, order)(x)
    assert torch.equal(got, want), f"{name} over {order}:\n{got}\n!=\n{want}"


def test_axis_index_varies_and_is_int64():
    mesh = cached_mesh((2, 2), ("a", "b"))
    seen = []

    def f(x):
        i = shardfn.axis_index("b")
        seen.append((i.dtype, i.dim(), shardfn.vma_of(i)))
        return x + i

    out = shard_map(f, mesh=mesh, in_specs=P(("a", "b")), out_specs=P(("a", "b")))(torch.zeros(4, dtype=torch.int64))
    assert out.tolist() == [0, 1, 0, 1]
    assert set(seen) == {(torch.int64, 0, frozenset({"b"}))}


# ---- gradients: shard_map'd collectives vs torch.func.grad of the reference -------------------------
@pytest.mark.parametrize("name", DIFFERENTIABLE)
@given(data=st.data())
def test_collective_gradient_matches_reference(name, data):
    mesh = data.draw(meshes(), label="mesh")
    axis_name = data.draw(axis_names(mesh), label="axis_name")
    axes = as_tuple(axis_name)
    n = math.prod(mesh.shape[a] for a in axes)
    case = make_case(name, data.draw, axis_name, n)
    # check_vma=False: the user places pvary by hand on outputs typed invariant (psum's transpose
    # is then the identity, so an invariant value copied into per-device blocks needs it).
    check_vma = data.draw(st.booleans(), label="check_vma")
    manual = None if case.out_varies else axis_name
    if check_vma and data.draw(st.booleans(), label="manual pvary under check_vma"):
        manual = None
    x = global_input(mesh, case, random=True, seed=1)
    cot = torch.randn((mesh.size,) + tuple(reference(mesh, case, axes)(x).shape[1:]),
                      generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = reference(mesh, case, axes)
    want = torch.func.grad(lambda t: (ref(t) * cot).sum())(x)
    xs = x.clone().requires_grad_(True)
    y = mapped(mesh, case.local, check_vma=check_vma, wrap_pvary=manual)(xs)
    torch.testing.assert_close(y.detach(), ref(x), rtol=RTOL, atol=ATOL)
    (got,) = torch.autograd.grad(y, xs, cot)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


# ---- dot-product transpose test ---------------------------------------------------------------------
@pytest.mark.parametrize("name", LINEAR)
@given(data=st.data())
def test_dot_product_transpose(name, data):
    """<f(x), y> == <x, f_T(y)> summed over devices, f_T from autograd and from the transpose collective."""
    mesh = data.draw(meshes(), label="mesh")
    axis_name = data.draw(axis_names(mesh), label="axis_name")
    axes = as_tuple(axis_name)
    n = math.prod(mesh.shape[a] for a in axes)
    case = make_case(name, data.draw, axis_name, n)
    x = global_input(mesh, case, random=True, seed=3).requires_grad_(True)
    # check_vma=False: each collective's own transpose, with no automatic pvary around it
    f = mapped(mesh, case.local, check_vma=False)
    fx = f(x)
    y = torch.randn(fx.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    lhs = (fx * y).sum()
    if case.out_varies:
        (ft_y,) = torch.autograd.grad(fx, x, y)
        torch.testing.assert_close((x * ft_y).sum(), lhs, rtol=RTOL, atol=ATOL)
    if case.transpose is not None:
        ft = mapped(mesh, case.transpose, check_vma=False)(y)
        torch.testing.assert_close((x * ft).sum(), lhs, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["psum", "pmean", "all_gather_invariant", "all_gather_invariant_tiled"])
@given(data=st.data())
def test_dot_product_transpose_invariant_results(name, data):
    """An invariant result handed out as per-device blocks: its transpose sums the blocks' cotangents.

    With check_vma=True shard_map adds that pvary itself; the identity <f(x), y> == <x, f_T(y)>
    then holds for the autograd transpose of the whole mapped function.
    """
    mesh = data.draw(meshes(), label="mesh")
    axis_name = data.draw(axis_names(mesh), label="axis_name")
    axes = as_tuple(axis_name)
    n = math.prod(mesh.shape[a] for a in axes)
    case = make_case(name, data.draw, axis_name, n)
    x = global_input(mesh, case, random=True, seed=5).requires_grad_(True)
    fx = mapped(mesh, case.local, check_vma=True)(x)
    y = torch.randn(fx.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    (ft_y,) = torch.autograd.grad(fx, x, y)
    torch.testing.assert_close((x * ft_y).sum(), (fx * y).sum(), rtol=RTOL, atol=ATOL)


# ---- count_comms: bytes per device equal PERF.md 2.1 ------------------------------------------------
def expected_bytes(name, case, n, element_size, mesh, axes):
    """Per-device forward bytes under ring algorithms (PERF.md 2.1), keyed by device."""
    local = math.prod(case.block) * element_size
    if n == 1 and name != "ppermute":
        return {d: Fraction(0) for d in range(mesh.size)}
    if name in ("psum", "pmean", "pmax", "pmin"):
        per = Fraction(2 * (n - 1) * local, n)  # all-reduce of M = local
    elif name.startswith("all_gather"):
        per = Fraction((n - 1) * local)  # all-gather: (n-1)/n of the gathered n*local
    elif name.startswith("psum_scatter"):
        per = Fraction((n - 1) * local, n)  # reduce-scatter: (n-1)/n of the input
    elif name.startswith("all_to_all"):
        per = Fraction((n - 1) * local, n)  # all-to-all: (n-1)/n of the local block
    else:
        raise KeyError(name)
    return {d: per for d in range(mesh.size)}


COUNTED = ["psum", "pmean", "pmax", "pmin", "all_gather", "all_gather_tiled", "all_gather_invariant",
           "psum_scatter", "psum_scatter_tiled", "all_to_all", "all_to_all_tiled", "ppermute"]


@pytest.mark.parametrize("name", COUNTED)
@given(data=st.data())
def test_count_comms_matches_ring_formulas(name, data):
    mesh = data.draw(meshes(), label="mesh")
    axis_name = data.draw(axis_names(mesh), label="axis_name")
    axes = as_tuple(axis_name)
    n = math.prod(mesh.shape[a] for a in axes)
    case = make_case(name, data.draw, axis_name, n)
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    x = global_input(mesh, case).to(dtype)
    with count_comms() as log:
        mapped(mesh, case.local)(x)
    if name == "ppermute":
        local = math.prod(case.block) * x.element_size()
        want = {}
        for d in range(mesh.size):
            _, i = group_of(mesh, d, axes)
            sends = any(src == i and dst != i for src, dst in case.perm)
            want[d] = Fraction(local) if sends else Fraction(0)
    else:
        want = expected_bytes(name, case, n, x.element_size(), mesh, axes)
    got = {d: log.bytes_sent(d, phase="forward") for d in range(mesh.size)}
    assert got == want, (name, axis_name, dict(mesh.shape), got, want)
    record_name = {"pmean": "psum", "all_gather_tiled": "all_gather", "all_gather_invariant": "all_gather",
                   "psum_scatter_tiled": "psum_scatter", "all_to_all_tiled": "all_to_all"}.get(name, name)
    for r in log.records:
        assert (r.name, r.axis_name, r.phase) == (record_name, axes, "forward"), r
    if n > 1:  # one record per device per call
        assert sorted(r.device for r in log.records) == list(range(mesh.size))


@pytest.mark.parametrize("name", ["all_gather", "all_gather_tiled", "psum_scatter", "all_to_all_tiled", "ppermute"])
@settings(max_examples=3)
@given(data=st.data())
def test_count_comms_backward_is_the_transpose(name, data):
    """Backward bytes are those of the transpose collective on the cotangent (PERF.md 2.1)."""
    mesh = cached_mesh((2, 2), ("a", "b"))
    axes = ("b", "a")
    case = make_case(name, data.draw, axes, 4)
    x = global_input(mesh, case, random=True).requires_grad_(True)
    with count_comms() as log:
        y = mapped(mesh, case.local)(x)
        y.backward(torch.ones_like(y))
    g = math.prod(y.shape[1:]) * 8  # bytes of one device's cotangent
    for d in range(mesh.size):
        if name == "ppermute":
            _, i = group_of(mesh, d, axes)
            sends_back = any(dst == i and src != i for src, dst in case.perm)
            want = [("ppermute", Fraction(g) if sends_back else Fraction(0))]
        else:
            want = [{
                "all_gather": ("psum_scatter", Fraction(3 * g, 4)),
                "all_gather_tiled": ("psum_scatter", Fraction(3 * g, 4)),
                "psum_scatter": ("all_gather", Fraction(3 * g)),
                "all_to_all_tiled": ("all_to_all", Fraction(3 * g, 4)),
            }[name]]
        back = [(r.name, r.bytes_sent) for r in log.records if r.device == d and r.phase == "backward"]
        assert back == want, (d, back, want)


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_all_to_all_split_dim_equals_concat_dim(tiled, dim):
    """split_dim == concat_dim: the dim keeps its size and holds one chunk from each member in order."""
    mesh = cached_mesh((2, 2), ("a", "b"))
    axes = ("b", "a")
    block = [2, 3, 2]
    block[dim] = 8 if tiled else 4
    x = torch.arange(4 * math.prod(block), dtype=torch.float64).reshape([4] + block)
    got = mapped(mesh, lambda t: shardfn.all_to_all(t, axes, dim, dim, tiled=tiled))(x)
    blocks = list(x.unbind(0))
    for d in range(4):
        ms, i = group_of(mesh, d, axes)
        want = torch.cat([blocks[m].chunk(4, dim)[i] for m in ms], dim)
        assert torch.equal(got[d], want), d
    # and it is its own transpose: <f(x), y> == <x, f(y)> summed over devices
    xr = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    f = mapped(mesh, lambda t: shardfn.all_to_all(t, axes, dim, dim, tiled=tiled))
    torch.testing.assert_close((f(xr) * y).sum(), (xr * f(y)).sum(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", [c for c in DIFFERENTIABLE if c not in ("pmax", "pmin")])
@given(data=st.data())
def test_collective_of_replicated_input_gradient(name, data):
    """A replicated (invariant) input fed to a collective is lifted by pvary: its gradient sums over devices.

    pmax/pmin are left out: on equal copies the extreme is a tie everywhere (not differentiable).
    """
    mesh = data.draw(meshes(), label="mesh")
    axis_name = data.draw(axis_names(mesh), label="axis_name")
    axes = as_tuple(axis_name)
    n = math.prod(mesh.shape[a] for a in axes)
    case = make_case(name, data.draw, axis_name, n)
    every = P(tuple(mesh.axis_names))
    w = torch.randn(case.block, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    groups = [group_of(mesh, d, axes) for d in range(mesh.size)]

    def ref(w):
        blocks = [w] * mesh.size
        return torch.stack([case.ref(blocks, ms, i) for ms, i in groups])

    want_y = ref(w)
    cot = torch.randn(want_y.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    f = shard_map(lambda t: case.local(t).unsqueeze(0), mesh=mesh, in_specs=P(), out_specs=every)
    ws = w.clone().requires_grad_(True)
    y = f(ws)
    torch.testing.assert_close(y.detach(), want_y, rtol=RTOL, atol=ATOL)
    (got,) = torch.autograd.grad(y, ws, cot)
    torch.testing.assert_close(got, torch.func.grad(lambda t: (ref(t) * cot).sum())(w), rtol=RTOL, atol=ATOL)
