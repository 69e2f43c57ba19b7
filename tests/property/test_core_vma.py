"""Varying-manual-axes tracking: vma_of values inside f, automatic pvary, out_specs violations."""
from __future__ import annotations

import math
import threading

import pytest
import torch
from hypothesis import given, strategies as st

import shardfn
from shardfn import P, all_gather, all_gather_invariant, axis_index, pmean, psum, pvary, shard_map, vma_of
from shardfn.debug import count_comms
from shardfn.testing import cached_mesh, meshes


class Recorder:
    """Collects (device, label, vma) from every device thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.rows = []

    def __call__(self, label, x):
        with self.lock:
            self.rows.append((label, vma_of(x)))
        return x

    def values(self, label):
        return {v for lab, v in self.rows if lab == label}


def _entry(axes):
    return None if not axes else (axes[0] if len(axes) == 1 else tuple(axes))


@given(data=st.data())
def test_vma_of_follows_the_rules(data):
    mesh = data.draw(meshes(), label="mesh")
    names = mesh.axis_names
    order = data.draw(st.permutations(names), label="order")
    cut = data.draw(st.integers(0, len(order)), label="cut")
    xa, other = tuple(order[:cut]), tuple(order[cut:])
    reduce_axes = tuple(data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True), label="reduce"))
    tracked = mesh.size > 1  # a 1-device mesh runs inline without tracking
    rec = Recorder()

    def f(x, w):
        rec("x", x)
        rec("w", w)
        rec("x*w", x * w)
        rec("psum", psum(x, reduce_axes))
        rec("pmean(w)", pmean(w, reduce_axes))
        rec("axis_index", axis_index(reduce_axes))
        rec("w+axis_index", w + axis_index(reduce_axes).to(w.dtype))
        rec("pvary(w)", pvary(w, reduce_axes))
        rec("all_gather", all_gather(x, reduce_axes, tiled=True))
        rec("all_gather_invariant", all_gather_invariant(x, reduce_axes, tiled=True))
        return psum(x, names)

    n = math.prod(mesh.shape[a] for a in xa)
    shard_map(f, mesh=mesh, in_specs=(P(_entry(xa)), P()), out_specs=P())(torch.ones(n * 2), torch.ones(2))
    xs, r = frozenset(xa), frozenset(reduce_axes)
    want = {
        "x": xs, "w": frozenset(), "x*w": xs, "psum": xs - r, "pmean(w)": frozenset(), "axis_index": r,
        "w+axis_index": r, "pvary(w)": r, "all_gather": xs | r, "all_gather_invariant": xs - r,
    }
    for label, v in want.items():
        expected = v if tracked else frozenset()
        assert rec.values(label) == {expected}, (label, rec.values(label), expected)


def test_vma_of_outside_and_non_tensors():
    assert vma_of(torch.ones(2)) == frozenset()
    assert vma_of(3) == frozenset()
    assert vma_of(None) == frozenset()


def test_check_vma_false_tracks_nothing():
    mesh = cached_mesh((2, 2), ("a", "b"))
    rec = Recorder()

    def f(x):
        rec("x", x)
        rec("idx", axis_index("a"))
        return x

    shard_map(f, mesh=mesh, in_specs=P("a"), out_specs=P("a"), check_vma=False)(torch.ones(4))
    assert rec.values("x") == {frozenset()} and rec.values("idx") == {frozenset()}


def test_auto_pvary_inserts_one_backward_psum_for_replicated_weight():
    """w replicated, x split over a: the gradient of w is summed over a by an inserted pvary."""
    mesh = cached_mesh((4,), ("a",))
    x = torch.arange(8.0, dtype=torch.float64).reshape(4, 2)
    w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    f = shard_map(lambda x, w: psum((x * w).sum(), "a"), mesh=mesh, in_specs=(P("a"), P()), out_specs=P())
    with count_comms() as log:
        out = f(x, w)
        (g,) = torch.autograd.grad(out, w)
    assert torch.equal(g, x.sum(0))
    back = [(r.name, r.axis_name) for r in log.records if r.device == 0 and r.phase == "backward"]
    assert back == [("psum", ("a",))]
    # no pvary for a weight that does not need a gradient: nothing in backward
    with count_comms() as log:
        f(x.requires_grad_(True), w.detach()).backward()
    assert [r for r in log.records if r.phase == "backward"] == []


def test_without_pvary_under_check_vma_false_the_gradient_is_one_devices():
    """Shows what auto pvary buys: the same program with tracking off and no manual pvary."""
    mesh = cached_mesh((4,), ("a",))
    x = torch.arange(8.0, dtype=torch.float64).reshape(4, 2)
    w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    f = shard_map(lambda x, w: psum((x * w).sum(), "a"), mesh=mesh, in_specs=(P("a"), P()), out_specs=P(), check_vma=False)
    (g,) = torch.autograd.grad(f(x, w), w)
    assert torch.equal(g, x[0])  # device 0's partial gradient, as documented


@given(data=st.data())
def test_out_specs_violation_names_path_and_axis(data):
    mesh = data.draw(meshes(), label="mesh")
    names = mesh.axis_names
    axis = data.draw(st.sampled_from([a for a in names]), label="axis")
    if mesh.shape[axis] == 1 or mesh.size == 1:
        mesh = cached_mesh((2,) + tuple(mesh.shape[a] for a in names[1:]) if len(names) > 1 else (2,), names)
        mesh = mesh if math.prod(mesh.shape.values()) <= 8 else cached_mesh((2,), ("a",))
        names = mesh.axis_names
        axis = names[0]
    n = mesh.shape[axis]
    x = torch.ones(n * 2)

    def f(x):
        return {"ok": psum(x, axis), "bad": (x * 2, x + 1)}

    with pytest.raises(ValueError) as err:
        shard_map(f, mesh=mesh, in_specs=P(axis), out_specs={"ok": P(), "bad": (P(), P(axis))})(x)
    msg = str(err.value)
    assert "out['bad'][0]" in msg and repr(axis) in msg and "psum" in msg
    assert "out['bad'][1]" not in msg and "out['ok']" not in msg
    # check_vma=False: no error, device 0's block is returned for the unnamed axis
    got = shard_map(f, mesh=mesh, in_specs=P(axis), out_specs={"ok": P(), "bad": (P(), P(axis))}, check_vma=False)(x)
    assert torch.equal(got["bad"][0], torch.full((2,), 2.0))


def test_out_specs_violation_lists_every_bad_output_and_axis():
    mesh = cached_mesh((2, 2), ("a", "b"))

    def f(x):
        return x, x * 3

    with pytest.raises(ValueError) as err:
        shard_map(f, mesh=mesh, in_specs=P(("a", "b")), out_specs=(P(), P("a")))(torch.ones(4))
    msg = str(err.value)
    assert "out[0]" in msg and "out[1]" in msg
    assert "'a'" in msg and "'b'" in msg


def test_auto_pvary_in_place_and_list_ops():
    """In-place ops and list-taking ops (cat, stack) propagate vma and lift invariant operands."""
    mesh = cached_mesh((2,), ("a",))
    x = torch.arange(4.0, dtype=torch.float64)
    w = torch.tensor([3.0, 5.0], dtype=torch.float64, requires_grad=True)

    def f(x, w):
        y = torch.cat([x, w])  # w lifted here
        z = w.clone()
        z.mul_(x)  # z invariant before, varying after: pvary'd in place
        u = w * 1.0
        u += x  # __iadd__
        v = w * 2.0
        v[0] = x[0]  # __setitem__
        assert vma_of(y) == {"a"} and vma_of(z) == {"a"} and vma_of(u) == {"a"} and vma_of(v) == {"a"}
        return psum(y.sum() + z.sum() + (u * u).sum() + (v * v).sum(), "a")

    out = shard_map(f, mesh=mesh, in_specs=(P("a"), P()), out_specs=P())(x, w)
    (g,) = torch.autograd.grad(out, w)

    def ref_device(w, xl):
        v = torch.stack([xl[0], 2.0 * w[1]])
        return torch.cat([xl, w]).sum() + (w * xl).sum() + ((w + xl) ** 2).sum() + (v * v).sum()

    want = torch.func.grad(lambda w: ref_device(w, x[:2]) + ref_device(w, x[2:]))(w.detach())
    torch.testing.assert_close(g, want, rtol=0, atol=0)
    assert shardfn.vma_of(out) == frozenset()


class _Scale(torch.autograd.Function):
    """x * w with a hand-written backward: the vma mode cannot see inside the call."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, (g * x).sum(0)


def test_custom_autograd_function_operands_get_the_automatic_pvary():
    """A replicated weight passed into a custom Function gets its gradient summed over dp."""
    mesh = cached_mesh((2,), ("dp",))
    x = torch.randn(4, 3, dtype=torch.float64)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    f = shard_map(lambda x, w: psum(_Scale.apply(x, w).sum(), "dp"), mesh=mesh, in_specs=(P("dp"), None), out_specs=P())
    got = torch.autograd.grad(f(x, w), w)[0]
    want = torch.autograd.grad((x * w).sum(), w)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_gradient_that_escapes_vma_is_an_error_not_a_silent_wrong_value():
    """Calling the C-level apply directly bypasses the vma rule; the replica check catches it."""
    mesh = cached_mesh((2,), ("dp",))
    x = torch.randn(4, 3, dtype=torch.float64)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def body(x, w):
        y = super(torch.autograd.Function, _Scale).apply(x, w)  # the bare C apply, no shardfn hook
        return psum(y.sum(), "dp")

    f = shard_map(body, mesh=mesh, in_specs=(P("dp"), None), out_specs=P())
    with pytest.raises(RuntimeError, match=r"gradient of args\[1\] .*differs between devices"):
        torch.autograd.grad(f(x, w), w)
