"""Test helpers for shardfn and its users: hypothesis strategies, `assert_equivalent`, real processes.

- `meshes`, `specs`, `sharded_shapes`: hypothesis strategies that draw mesh shapes (1-8 devices over
  1-3 axes), partition specs for a mesh, and global shapes made by multiplying drawn per-device
  sizes by the axis sizes (divisible by construction, no `assume`).
- `assert_equivalent(sharded_fn, reference_fn, *args)`: outputs and input gradients of a sharded
  function equal those of its single-device reference.
- `run_distributed(fn, *args, nprocs=2)`: run `fn` in `nprocs` real processes with an initialised
  gloo process group and return each rank's result.
"""
from __future__ import annotations

import io
import math
import os
import queue as queue_mod
import socket
import traceback
from datetime import timedelta

import torch

from shardfn.mesh import Mesh, make_mesh
from shardfn.spec import P
from shardfn.tree import flatten_with_paths, format_path

__all__ = ["meshes", "specs", "sharded_shapes", "cached_mesh", "assert_equivalent", "default_tolerance", "run_distributed"]

_AXIS_NAMES = ("a", "b", "c")
_MESHES: dict = {}


def cached_mesh(axis_shapes, axis_names, *, timeout: float = 30.0) -> Mesh:
    """A sim mesh shared by all tests that ask for the same shape (its device threads are reused)."""
    key = (tuple(axis_shapes), tuple(axis_names), timeout)
    if key not in _MESHES:
        _MESHES[key] = make_mesh(axis_shapes, axis_names, backend="sim", timeout=timeout)
    return _MESHES[key]


def meshes(*, max_devices: int = 8, max_axes: int = 3, axis_names=_AXIS_NAMES):
    """Strategy: a sim Mesh of 1..max_devices devices over 1..max_axes named axes."""
    from hypothesis import strategies as st

    @st.composite
    def draw_mesh(draw):
        num_axes = draw(st.integers(1, min(max_axes, len(axis_names))))
        shapes = []
        budget = max_devices
        for _ in range(num_axes):
            size = draw(st.integers(1, max(1, budget)))
            shapes.append(size)
            budget //= size
        return cached_mesh(tuple(shapes), tuple(axis_names[:num_axes]))

    return draw_mesh()


def specs(mesh: Mesh, ndim: int):
    """Strategy: a P for a rank-`ndim` tensor on `mesh`; each axis splits at most one dim."""
    from hypothesis import strategies as st

    @st.composite
    def draw_spec(draw):
        entries = [[] for _ in range(ndim)]
        for axis in draw(st.permutations(mesh.axis_names)):
            where = draw(st.integers(-1, ndim - 1)) if ndim else -1
            if where >= 0:
                entries[where].append(axis)
        return P(*(None if not e else (e[0] if len(e) == 1 else tuple(e)) for e in entries))

    return draw_spec()


def sharded_shapes(mesh: Mesh, spec: P, ndim: int, *, max_block: int = 3):
    """Strategy: a global shape whose split dims are drawn per-device sizes times their axis sizes."""
    from hypothesis import strategies as st

    @st.composite
    def draw_shape(draw):
        shape = []
        for dim in range(ndim):
            entry = spec.entries[dim] if dim < len(spec) else None
            axes = () if entry is None else ((entry,) if isinstance(entry, str) else entry)
            shape.append(draw(st.integers(1, max_block)) * math.prod(mesh.shape[a] for a in axes))
        return tuple(shape)

    return draw_shape()


def default_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) used by assert_equivalent when none is given."""
    if dtype == torch.float64:
        return 1e-10, 1e-12
    if dtype in (torch.bfloat16, torch.float16):
        return 2e-2, 2e-2
    return 1e-5, 1e-6


def _full(x):
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def _close(name, got, want, rtol, atol):
    got = _full(got)
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != reference {tuple(want.shape)}")
    if not got.is_floating_point():
        if not torch.equal(got, want):
            raise AssertionError(f"{name}: values differ from the reference (exact comparison)")
        return
    r, a = default_tolerance(want.dtype)
    rtol = r if rtol is None else rtol
    atol = a if atol is None else atol
    if not torch.allclose(got.to(want.dtype), want, rtol=rtol, atol=atol):
        err = (got.to(want.dtype) - want).abs().max().item()
        raise AssertionError(f"{name}: max abs error {err:.3e} exceeds rtol={rtol}, atol={atol}")


def assert_equivalent(sharded_fn, reference_fn, *args, rtol=None, atol=None, grads=True, seed=0):
    """Check that `sharded_fn(*args)` equals `reference_fn(*args)` in outputs and input gradients.

    Every floating tensor in `args` is treated as an input to differentiate; the gradients of
    <outputs, c> for a fixed random cotangent c are compared leaf by leaf.

    Args:
        sharded_fn: the function under test (e.g. a shard_map'd function of global values).
        reference_fn: the single-device function on the same global values.
        *args: global inputs (pytrees of tensors; other leaves pass through).
        rtol, atol: tolerances; by default from `default_tolerance(dtype)`.
        grads: also compare gradients.
        seed: seed of the cotangents.

    Raises:
        AssertionError naming the output or argument path and the error.
    """
    def prepare():
        paths, leaves, spec = flatten_with_paths(args)
        out = []
        for x in leaves:
            if isinstance(x, torch.Tensor):
                x = x.detach().clone()
                if grads and x.is_floating_point():
                    x.requires_grad_(True)
            out.append(x)
        return paths, out, spec

    from shardfn.tree import unflatten

    paths, s_leaves, spec = prepare()
    _, r_leaves, _ = prepare()
    out_s = sharded_fn(*unflatten(spec, s_leaves))
    out_r = reference_fn(*unflatten(spec, r_leaves))
    o_paths, o_s, _ = flatten_with_paths(out_s)
    _, o_r, _ = flatten_with_paths(out_r)
    if len(o_s) != len(o_r):
        raise AssertionError(f"outputs: {len(o_s)} leaves but the reference has {len(o_r)}")
    for p, a, b in zip(o_paths, o_s, o_r):
        if isinstance(b, torch.Tensor):
            _close(format_path("out", p), a, b.detach(), rtol, atol)
    if not grads:
        return
    gen = torch.Generator().manual_seed(seed)
    pairs = [(a, b) for a, b in zip(o_s, o_r) if isinstance(b, torch.Tensor) and b.requires_grad]
    inputs = [(i, s, r) for i, (s, r) in enumerate(zip(s_leaves, r_leaves)) if isinstance(r, torch.Tensor) and r.requires_grad]
    if not pairs or not inputs:
        return
    cots = [torch.randn(b.shape, generator=gen, dtype=torch.float64).to(b.dtype) for _, b in pairs]
    loss_s = sum((_full(a) * c).sum() for (a, _), c in zip(pairs, cots))
    loss_r = sum((b * c).sum() for (_, b), c in zip(pairs, cots))
    g_s = torch.autograd.grad(loss_s, [s for _, s, _ in inputs], allow_unused=True)
    g_r = torch.autograd.grad(loss_r, [r for _, _, r in inputs], allow_unused=True)
    for (i, s, r), gs, gr in zip(inputs, g_s, g_r):
        gs = torch.zeros_like(s) if gs is None else gs
        gr = torch.zeros_like(r) if gr is None else gr
        _close("grad of " + format_path("args", paths[i]), gs, gr, rtol, atol)


# ---- real processes -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, nprocs, port, backend, timeout, fn, args, results):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(nprocs),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nprocs),
    )
    torch.set_num_threads(1)
    dist = torch.distributed
    try:
        dist.init_process_group(backend, rank=rank, world_size=nprocs, timeout=timedelta(seconds=timeout))
        out = fn(*args)
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - sent to the parent with the traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, *args, nprocs: int = 2, backend: str = "gloo", timeout: float = 120.0):
    """Run `fn(*args)` on `nprocs` real processes with an initialised process group.

    `fn` must be importable (defined at module level). Returns the list of per-rank results
    (picklable values). Raises RuntimeError with every failing rank's traceback, or after
    `timeout` seconds, killing the processes.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, nprocs, port, backend, timeout, fn, args, results), daemon=True)
        for r in range(nprocs)
    ]
    for p in procs:
        p.start()
    import time

    got, errors = {}, []
    deadline = time.monotonic() + timeout
    try:
        while len(got) + len(errors) < nprocs:
            try:
                rank, ok, value = results.get(timeout=0.5)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in got]
                if dead and results.empty():
                    # a rank exited without reporting (e.g. it failed to start): do not wait for the rest
                    time.sleep(0.5)
                    if results.empty():
                        codes = {r: procs[r].exitcode for r in dead}
                        errors.append(f"ranks {dead} exited without a result (exit codes {codes})")
                        break
                if time.monotonic() > deadline:
                    missing = sorted(set(range(nprocs)) - set(got))
                    errors.append(f"timed out after {timeout:g} s waiting for ranks {missing}")
                    break
                continue
            if ok:
                got[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("run_distributed failed:\n" + "\n".join(errors))
    return [got[r] for r in range(nprocs)]
