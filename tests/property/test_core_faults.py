"""Sim backend faults: each ends every device with one clear error within seconds, and the same
mesh keeps working for the next call.

Meshes: detection tests use a 30 s timeout mesh and assert they end in well under it (so they
were detected, not timed out); the missing-device test uses a 1 s timeout mesh. Time bounds are
generous because the CI machine is shared; they only tell "detected" from "hung until timeout".
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from shardfn import (
    CollectiveMismatchError,
    DeadlockError,
    MeshTimeoutError,
    P,
    all_gather,
    axis_index,
    psum,
    shard_map,
)
from shardfn.primitives import p2p
from shardfn.testing import cached_mesh

DETECT_S = 10.0  # far below the 30 s mesh timeout


def _mesh(timeout=30.0):
    return cached_mesh((2, 2), ("a", "b"), timeout=timeout)


def _still_works(mesh):
    """A normal call with forward and backward collectives on the mesh that just failed."""
    x = torch.arange(8.0, dtype=torch.float64).reshape(4, 2).requires_grad_(True)
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    f = shard_map(lambda x, w: psum((x * w).sum(), ("a", "b")), mesh=mesh, in_specs=(P(("a", "b")), P()), out_specs=P())
    out = f(x, w)
    assert out.item() == (x.detach() * w.detach()).sum().item()
    gx, gw = torch.autograd.grad(out, (x, w))
    assert torch.equal(gw, x.detach().sum(0)) and torch.equal(gx, w.detach().expand(4, 2))


def _run(mesh, f, *, error, timeout_s=DETECT_S):
    start = time.monotonic()
    with pytest.raises(error) as err:
        shard_map(f, mesh=mesh, in_specs=P(("a", "b")), out_specs=P(("a", "b")))(torch.arange(4.0))
    elapsed = time.monotonic() - start
    assert elapsed < timeout_s, f"took {elapsed:.1f} s"
    _still_works(mesh)
    return str(err.value)


def test_mismatched_collectives():
    def f(x):
        if axis_index(("a", "b")).item() == 1:  # only the a=0 group disagrees
            return all_gather(x, "b", tiled=True)[:1]
        return psum(x, "b")

    msg = _run(_mesh(), f, error=CollectiveMismatchError)
    assert "psum" in msg and "all_gather" in msg
    assert "(a=0, b=0)" in msg and "(a=0, b=1)" in msg
    assert "test_core_faults.py" in msg  # the call sites


def test_mismatched_shapes():
    def f(x):
        y = x if axis_index("a").item() == 0 else torch.cat([x, x])
        return psum(y, "a")[:1]

    msg = _run(_mesh(), f, error=CollectiveMismatchError)
    assert "[1]" in msg and "[2]" in msg and "('a',)" in msg


def test_mismatched_dtypes():
    def f(x):
        y = x if axis_index(("a", "b")).item() != 3 else x.to(torch.float64)
        return psum(y, ("a", "b")).float()

    msg = _run(_mesh(), f, error=CollectiveMismatchError)
    assert "float32" in msg and "float64" in msg and "(a=1, b=1)" in msg


class CustomError(Exception):
    pass


@pytest.mark.parametrize("exc_type", [ValueError, KeyError, CustomError])
def test_device_raising_keeps_type_and_adds_coordinates(exc_type):
    def f(x):
        if axis_index(("a", "b")).item() == 2:
            raise exc_type("boom on purpose")
        return psum(x, ("a", "b"))  # the others wait in a collective and must be released

    msg = _run(_mesh(), f, error=exc_type)
    assert "boom on purpose" in msg and "a=1, b=0" in msg


def test_device_raising_in_backward():
    mesh = _mesh()

    class Fails(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            if axis_index("a").item() == 1:
                raise RuntimeError("backward failed on purpose")
            return g

    f = shard_map(lambda x: psum(Fails.apply(x).sum(), ("a", "b")), mesh=mesh, in_specs=P(("a", "b")), out_specs=P())
    out = f(torch.ones(4, requires_grad=True))
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="backward failed on purpose") as err:
        out.backward()
    assert time.monotonic() - start < DETECT_S
    assert "a=1" in str(err.value)
    _still_works(mesh)


def test_device_that_never_arrives_times_out():
    mesh = _mesh(timeout=1.0)
    release = threading.Event()

    def f(x):
        if axis_index(("a", "b")).item() == 1:
            release.wait(20.0)  # stuck in user code, never reaches the collective
        return psum(x, ("a", "b"))

    try:
        msg = _run(mesh, f, error=MeshTimeoutError, timeout_s=8.0)
    finally:
        release.set()
    assert "(a=0, b=1)" in msg  # the missing device is named
    assert "psum" in msg


def test_deadlock_p2p_waits_for_nobody():
    def f(x):
        me = axis_index("b").item()
        (y,) = p2p("b", sends=(), recvs=[(1 - me, (1,), torch.float32)])
        return y

    msg = _run(_mesh(), f, error=DeadlockError)
    assert "recv" in msg and "(a=0, b=0)" in msg


def test_deadlock_device_finishing_early():
    def f(x):
        if axis_index(("a", "b")).item() == 0:
            return x  # finishes without the collective the others issue
        return psum(x, ("a", "b"))

    msg = _run(_mesh(), f, error=DeadlockError)
    assert "finished" in msg and "(a=0, b=0)" in msg


def test_deadlock_crossed_groups():
    def f(x):
        # (0,0) and (1,1) sum over a then b, (0,1) and (1,0) over b then a: a cycle of waits
        same = axis_index("a").item() == axis_index("b").item()
        first, second = ("a", "b") if same else ("b", "a")
        return psum(psum(x, first), second)

    msg = _run(_mesh(), f, error=DeadlockError)
    assert "psum" in msg and all(d in msg for d in ("(a=0, b=0)", "(a=0, b=1)", "(a=1, b=0)", "(a=1, b=1)"))
