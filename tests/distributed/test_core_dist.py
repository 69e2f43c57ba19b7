"""The core on 2 real gloo processes: the same checks as on the simulated mesh, same numbers.

One launch: `_checks(mesh)` runs every collective (values on arange, float64 gradients of plain
and DTensor inputs), a data-parallel and a tensor-parallel program with replicated weights (auto
pvary) and count_comms, and returns plain tensors. The parent runs `_checks` on a 2-device sim
mesh and on the 2 processes, and compares: rank 0 == rank 1 == sim (exactly for data movement
and integer-valued sums, rtol=atol=1e-12 for float64 gradients), and the loop-over-blocks
reference for values and gradients (torch.func.grad, rtol=atol=1e-12).
"""
from __future__ import annotations

import math

import pytest
import torch

import shardfn
from shardfn import P, make_mesh, psum, shard_map
from shardfn.debug import count_comms
from shardfn.testing import cached_mesh, run_distributed

TOL = dict(rtol=1e-12, atol=1e-12)


# ---- cases: (name, axes, block shape, per-device program, per-device reference) ------------------
def _total(b, ms):
    acc = b[ms[0]]
    for m in ms[1:]:
        acc = acc + b[m]
    return acc


def _cases():
    """Collective calls over a 2-device group; block shapes keep every call valid for n=2."""
    out = []
    for axes in ("a", ("a", "b"), ("b", "a")):
        c = [
            ("psum", (2, 3), lambda x, ax=axes: shardfn.psum(x, ax), lambda b, ms, i: _total(b, ms)),
            ("pmean", (2, 3), lambda x, ax=axes: shardfn.pmean(x, ax), lambda b, ms, i: _total(b, ms) / 2),
            ("pmax", (2, 3), lambda x, ax=axes: shardfn.pmax(x, ax), lambda b, ms, i: torch.maximum(b[ms[0]], b[ms[1]])),
            ("pmin", (2, 3), lambda x, ax=axes: shardfn.pmin(x, ax), lambda b, ms, i: torch.minimum(b[ms[0]], b[ms[1]])),
            ("all_gather", (2, 3), lambda x, ax=axes: shardfn.all_gather(x, ax, dim=1),
             lambda b, ms, i: torch.stack([b[m] for m in ms], 1)),
            ("all_gather_tiled", (2, 3), lambda x, ax=axes: shardfn.all_gather(x, ax, dim=1, tiled=True),
             lambda b, ms, i: torch.cat([b[m] for m in ms], 1)),
            ("all_gather_invariant", (2, 3), lambda x, ax=axes: shardfn.all_gather_invariant(x, ax, tiled=True),
             lambda b, ms, i: torch.cat([b[m] for m in ms], 0)),
            ("psum_scatter", (3, 2), lambda x, ax=axes: shardfn.psum_scatter(x, ax, dim=1),
             lambda b, ms, i: _total(b, ms).select(1, i)),
            ("psum_scatter_tiled", (4, 3), lambda x, ax=axes: shardfn.psum_scatter(x, ax, dim=0, tiled=True),
             lambda b, ms, i: _total(b, ms).chunk(2, 0)[i]),
            ("all_to_all_tiled", (4, 3), lambda x, ax=axes: shardfn.all_to_all(x, ax, 0, 1, tiled=True),
             lambda b, ms, i: torch.cat([b[m].chunk(2, 0)[i] for m in ms], 1)),
            ("all_to_all_same_dim", (4, 3), lambda x, ax=axes: shardfn.all_to_all(x, ax, 0, 0, tiled=True),
             lambda b, ms, i: torch.cat([b[m].chunk(2, 0)[i] for m in ms], 0)),
            ("all_to_all", (3, 2), lambda x, ax=axes: shardfn.all_to_all(x, ax, 1, 0),
             lambda b, ms, i: torch.stack([b[m].select(1, i) for m in ms], 0)),
            ("ppermute_swap", (2, 3), lambda x, ax=axes: shardfn.ppermute(x, ax, [(0, 1), (1, 0)]),
             lambda b, ms, i: b[ms[1 - i]]),
            ("ppermute_one_way", (2, 3), lambda x, ax=axes: shardfn.ppermute(x, ax, [(0, 1)]),
             lambda b, ms, i: b[ms[0]] if i == 1 else torch.zeros_like(b[ms[0]])),
        ]
        out += [(f"{name}/{axes}", axes, block, local, ref) for name, block, local, ref in c]
    return out


def _mesh_for(axes, size_a, sim):
    if axes == "a":
        return cached_mesh((size_a,), ("a",)) if sim else make_mesh((size_a,), ("a",))
    return cached_mesh((size_a, 1), ("a", "b")) if sim else make_mesh((size_a, 1), ("a", "b"))


def _full(y):
    from torch.distributed.tensor import DTensor

    return y.full_tensor() if isinstance(y, DTensor) else y


def _mapped(mesh, local):
    every = P(tuple(mesh.axis_names))
    return shard_map(lambda x: local(x[0]).unsqueeze(0), mesh=mesh, in_specs=every, out_specs=every)


def _inputs(block, seed):
    shape = (2,) + block
    arange = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
    gen = torch.Generator().manual_seed(seed)
    return arange, torch.randn(shape, generator=gen, dtype=torch.float64)


def _checks(sim: bool):
    """Every check, on a sim mesh (sim=True) or the initialised 2-process world; tensors out."""
    res = {}
    meshes = {axes: _mesh_for(axes, 2, sim) for axes in ("a", ("a", "b"))}
    res["backend"] = meshes["a"].backend
    for k, (key, axes, block, local, _) in enumerate(_cases()):
        mesh = meshes["a" if axes == "a" else ("a", "b")]
        f = _mapped(mesh, local)
        arange, rand = _inputs(block, k)
        res[f"value/{key}"] = _full(f(arange)).detach()
        cot = torch.randn((2,) + tuple(res[f"value/{key}"].shape[1:]), generator=torch.Generator().manual_seed(100 + k),
                          dtype=torch.float64)
        x = rand.clone().requires_grad_(True)  # a plain input: the full global gradient on every rank
        (_full(f(x)) * cot).sum().backward()
        res[f"grad/{key}"] = x.grad.clone()
        if not sim and k % 3 == 0:  # DTensor inputs, split by the spec's placements
            from torch.distributed.tensor import Shard, distribute_tensor

            xd = distribute_tensor(rand, mesh.device_mesh, [Shard(0)] * len(mesh.axis_names)).requires_grad_(True)
            yd = f(xd)
            (_full(yd) * cot).sum().backward()
            res[f"dtensor_grad/{key}"] = _full(xd.grad).clone()
    for k, axes in enumerate(("a", ("a", "b"), ("b", "a"))):
        mesh = meshes["a" if axes == "a" else ("a", "b")]
        f = shard_map(lambda x, ax=axes: torch.stack([shardfn.axis_index(ax).double(), torch.tensor(float(shardfn.axis_size(ax)))]).unsqueeze(0) + x,
                      mesh=mesh, in_specs=P(tuple(mesh.axis_names)), out_specs=P(tuple(mesh.axis_names)))
        res[f"axis_index_size/{axes}"] = _full(f(torch.zeros(2, 2, dtype=torch.float64)))

    # data parallel with a replicated weight (auto pvary), tensor parallel MLP (plain inputs)
    mesh = meshes["a"]
    gen = torch.Generator().manual_seed(7)
    x, w, w1, w2 = (torch.randn(s, generator=gen, dtype=torch.float64) for s in ((4, 3), (3, 2), (3, 4), (4, 3)))
    dp = shard_map(lambda x, w: psum((torch.tanh(x @ w) ** 2).sum(), "a"), mesh=mesh, in_specs=(P("a"), P()), out_specs=P())
    args = [t.clone().requires_grad_(True) for t in (x, w)]
    with count_comms() as log:
        loss = _full(dp(*args))
        loss.backward()
    res["dp/loss"] = loss.detach()
    res["dp/grads"] = [a.grad.clone() for a in args]
    res["dp/comms"] = [(r.name, r.axis_name, r.phase, float(r.bytes_sent)) for r in log.records if r.device == 0] if sim else [
        (r.name, r.axis_name, r.phase, float(r.bytes_sent)) for r in log.records]
    tp = shard_map(lambda x, w1, w2: psum(torch.tanh(x @ w1) @ w2, "a"), mesh=mesh,
                   in_specs=(P(), P(None, "a"), P("a")), out_specs=P())
    args = [t.clone().requires_grad_(True) for t in (x, w1, w2)]
    y = _full(tp(*args))
    (y * torch.arange(9.0, dtype=torch.float64).reshape(3, 3)[:1].expand(4, 3)).sum().backward()
    res["tp/out"] = y.detach()
    res["tp/grads"] = [a.grad.clone() for a in args]

    # errors
    try:
        shardfn.psum(torch.ones(1), "a")
    except RuntimeError as err:
        res["error/outside"] = str(err)
    if not sim:
        try:
            make_mesh((4,), ("a",), backend="dist")
        except ValueError as err:
            res["error/world_size"] = str(err)
    return res


def _worker():
    return _checks(sim=False)


def _ref_grad(ref_block, block, k, out_shape):
    """torch.func.grad of the single-device reference of case k (the same seeds as _checks)."""
    _, rand = _inputs(block, k)
    cot = torch.randn((2,) + tuple(out_shape), generator=torch.Generator().manual_seed(100 + k), dtype=torch.float64)
    return torch.func.grad(lambda t: (ref_block(t) * cot).sum())(rand)


@pytest.fixture(scope="module")
def results():
    dist_res = run_distributed(_worker, nprocs=2, timeout=240.0)
    return dist_res, _checks(sim=True)


def _assert_same(a, b, key, exact):
    if isinstance(a, list):
        assert len(a) == len(b), key
        for x, y in zip(a, b):
            _assert_same(x, y, key, exact)
    elif isinstance(a, torch.Tensor):
        if exact:
            assert torch.equal(a, b), (key, a, b)
        else:
            torch.testing.assert_close(a, b, **TOL, msg=key)
    else:
        assert a == b, (key, a, b)


def test_ranks_agree_with_each_other_and_with_sim(results):
    (r0, r1), sim = results
    assert r0["backend"] == "dist" and sim["backend"] == "sim"
    for key in sim:
        if key in ("backend", "dp/comms"):
            continue
        exact = key.startswith("value/") or key.startswith("axis_index")
        _assert_same(r0[key], r1[key], key, exact)
        _assert_same(r0[key], sim[key], key, exact)
    dtensor_keys = [k for k in r0 if k.startswith("dtensor_grad/")]
    assert dtensor_keys
    for key in dtensor_keys:
        _assert_same(r0[key], sim["grad/" + key.split("/", 1)[1]], key, False)
        _assert_same(r1[key], r0[key], key, False)


def test_values_and_gradients_match_the_reference(results):
    (r0, _), _ = results
    for k, (key, axes, block, _, ref) in enumerate(_cases()):
        groups = [([0, 1], 0), ([0, 1], 1)]  # 2 devices, one group of both in every case here

        def ref_global(x, ref=ref):
            blocks = list(x.unbind(0))
            return torch.stack([ref(blocks, ms, i) for ms, i in groups])

        arange, _ = _inputs(block, k)
        want = ref_global(arange)
        assert torch.equal(r0[f"value/{key}"], want), key
        torch.testing.assert_close(r0[f"grad/{key}"], _ref_grad(ref_global, block, k, want.shape[1:]), **TOL, msg=key)
    for axes in ("a", ("a", "b"), ("b", "a")):
        got = r0[f"axis_index_size/{axes}"]
        assert got.tolist() == [[0.0, 2.0], [1.0, 2.0]], (axes, got)


def test_replicated_weights_get_the_full_gradient(results):
    (r0, r1), sim = results
    gen = torch.Generator().manual_seed(7)
    x, w, w1, w2 = (torch.randn(s, generator=gen, dtype=torch.float64) for s in ((4, 3), (3, 2), (3, 4), (4, 3)))
    want = torch.func.grad(lambda x, w: (torch.tanh(x @ w) ** 2).sum(), argnums=(0, 1))(x, w)
    for r in (r0, r1):
        for g, ref in zip(r["dp/grads"], want):
            torch.testing.assert_close(g, ref, **TOL)
    cot = torch.arange(9.0, dtype=torch.float64).reshape(3, 3)[:1].expand(4, 3)
    want = torch.func.grad(lambda *a: ((torch.tanh(a[0] @ a[1]) @ a[2]) * cot).sum(), argnums=(0, 1, 2))(x, w1, w2)
    for r in (r0, r1):
        torch.testing.assert_close(r["tp/out"], torch.tanh(x @ w1) @ w2, **TOL)
        for g, ref in zip(r["tp/grads"], want):
            torch.testing.assert_close(g, ref, **TOL)
    # the same collectives and bytes per device on both backends: a forward psum of the loss and
    # the backward psum of w's gradient inserted by the automatic pvary
    assert r0["dp/comms"] == sim["dp/comms"]
    assert [c[:3] for c in r0["dp/comms"]] == [("psum", ("a",), "forward"), ("psum", ("a",), "backward")]


def test_errors_on_real_processes(results):
    (r0, r1), _ = results
    for r in (r0, r1):
        assert "only inside a function mapped by shard_map" in r["error/outside"]
        msg = r["error/world_size"]
        assert "mesh size 4" in msg and "world size 2" in msg
