"""Named collectives over mesh axes, each differentiable with its exact transpose.

Each public collective checks its arguments, maps over a pytree, applies the vma rule (an operand
that must vary over the axes but does not is lifted with `pvary` first) and calls one autograd
function whose backward is the transpose (DESIGN.md section 3):

    psum(x, a)                 <->  pvary (identity)          pvary(x, a)  <->  psum(g, a)
    pmean(x, a)                <->  g / size(a)               pmax / pmin  <->  g at the extreme only
    all_gather(x, a, dim)      <->  psum_scatter(g, a, dim)   psum_scatter <->  all_gather
    all_to_all(x, a, s, c)     <->  all_to_all(g, a, c, s)    ppermute(x, a, perm) <-> ppermute(g, a, perm^-1)
    all_gather_invariant       <->  this device's block of g (no communication)
"""
from __future__ import annotations

import torch

from shardfn import context, debug
from shardfn.primitives.rules import (
    _axes,
    _size,
    _index,
    _dim,
    _nbytes,
    _leafwise,
    _suspended,
    _lift,
    _Psum,
    _Pvary,
    _Pmean,
    _Pextreme,
    _AllGather,
    _AllGatherInvariant,
    _PsumScatter,
    _AllToAll,
    _Ppermute,
    _apply,
    _pvary_tensor,
)
from shardfn.vma import set_vma, vma_of

__all__ = [
    "psum",
    "pmean",
    "pmax",
    "pmin",
    "pvary",
    "all_gather",
    "all_gather_invariant",
    "psum_scatter",
    "all_to_all",
    "ppermute",
    "axis_index",
    "axis_size",
    "p2p",
]

# ---- public API ---------------------------------------------------------------------------------
def psum(x, axis_name):
    """Sum `x` over the devices of `axis_name`; the result is invariant over those axes.

    Args:
        x: a tensor or pytree of tensors (a Python number gives number * axis size, as in JAX).
        axis_name: a mesh axis name or tuple of names.

    Returns:
        The sum, the same on every device of the group. Transpose: pvary (identity on values).

    Example:
        >>> shard_map(lambda x: psum(x, 'dp'), mesh=mesh, in_specs=P('dp'), out_specs=P())(x)
    """
    ctx = context.require("psum")
    axes = _axes(axis_name, ctx, "psum")
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return x * _size(ctx, axes)

    def one(t):
        t, v = _lift(t, axes, ctx)
        y = _suspended(ctx, _apply, _Psum, t, axes, ctx)
        return set_vma(y, v - frozenset(axes)) if ctx.check_vma else y

    return _leafwise("psum", one, x)


def pmean(x, axis_name):
    """Mean of `x` over the devices of `axis_name` (invariant result). Transpose: g / size."""
    ctx = context.require("pmean")
    axes = _axes(axis_name, ctx, "pmean")

    def one(t):
        t, v = _lift(t, axes, ctx)
        y = _suspended(ctx, _apply, _Pmean, t, axes, ctx)
        return set_vma(y, v - frozenset(axes)) if ctx.check_vma else y

    return _leafwise("pmean", one, x)


def _extreme(api, op, x, axis_name):
    ctx = context.require(api)
    axes = _axes(axis_name, ctx, api)

    def one(t):
        t, v = _lift(t, axes, ctx)
        y = _suspended(ctx, _apply, _Pextreme, t, axes, op, ctx)
        return set_vma(y, v - frozenset(axes)) if ctx.check_vma else y

    return _leafwise(api, one, x)


def pmax(x, axis_name):
    """Elementwise max over the devices of `axis_name`; the gradient goes to the arg-max device(s)."""
    return _extreme("pmax", "max", x, axis_name)


def pmin(x, axis_name):
    """Elementwise min over the devices of `axis_name`; the gradient goes to the arg-min device(s)."""
    return _extreme("pmin", "min", x, axis_name)


def pvary(x, axis_name):
    """Mark `x` as varying over `axis_name`: identity forward, psum of the gradient backward.

    With check_vma=True shard_map inserts it automatically where an invariant operand meets a
    varying one; call it by hand under check_vma=False (Megatron's copy-to-region operator).
    """
    ctx = context.require("pvary")
    axes = _axes(axis_name, ctx, "pvary")

    def one(t):
        if not ctx.check_vma:
            return _suspended(ctx, _Pvary.apply, t, axes, ctx)
        v = vma_of(t)
        missing = tuple(a for a in axes if a not in v)
        if not missing:
            return t
        if t.requires_grad:
            return _pvary_tensor(t, missing, ctx)
        return set_vma(_suspended(ctx, t.view_as, t), v | frozenset(axes))

    return _leafwise("pvary", one, x)


def all_gather(x, axis_name, *, dim=0, tiled=False):
    """Gather `x` from every device of `axis_name`, in axis-index order.

    Args:
        x: local tensor(s) [..., n_dim, ...].
        axis_name: mesh axis name or tuple of names (first major).
        dim: with tiled=False, where the new axis of size axis_size is inserted in the output;
            with tiled=True, the existing dim the blocks are concatenated along.
        tiled: jax.lax.all_gather's meaning.

    Returns:
        The gathered value, typed varying over the axes (so its transpose is psum_scatter).
        Use `all_gather_invariant` when an invariant result is needed.
    """
    return _gather("all_gather", _AllGather, x, axis_name, dim, tiled)


def all_gather_invariant(x, axis_name, *, dim=0, tiled=False):
    """all_gather typed invariant over the axes; its transpose slices this device's block of g."""
    return _gather("all_gather_invariant", _AllGatherInvariant, x, axis_name, dim, tiled)


def _gather(api, fn, x, axis_name, dim, tiled):
    ctx = context.require(api)
    axes = _axes(axis_name, ctx, api)
    invariant = fn is _AllGatherInvariant

    def one(t):
        d = _dim(dim, t.dim() if tiled else t.dim() + 1, api)
        if invariant:
            # an invariant operand is still lifted: the slice transpose leaves each device only its
            # own block of g, and the pvary's psum adds the other blocks back
            t, v = _lift(t, axes, ctx)
            src = t if tiled else _suspended(ctx, t.unsqueeze, d)
            y = _suspended(ctx, _apply, fn, src, axes, d, ctx)
            return set_vma(y, v - frozenset(axes)) if ctx.check_vma else y
        # lift before unsqueezing: the unsqueezed view carries no vma of its own
        t, v = _lift(t, axes, ctx)
        src = t if tiled else _suspended(ctx, t.unsqueeze, d)
        y = _suspended(ctx, _apply, fn, src, axes, d, ctx)
        return set_vma(y, v | frozenset(axes)) if ctx.check_vma else y

    return _leafwise(api, one, x)


def psum_scatter(x, axis_name, *, dim=0, tiled=False):
    """Sum `x` over `axis_name` and leave block i of `dim` on device i (reduce-scatter).

    Args:
        x: local tensor(s); with tiled=True `x.shape[dim]` must be divisible by the axis size, with
            tiled=False it must equal it (that dim is then removed).
        axis_name: mesh axis name or tuple of names.
        dim: the scattered dim.
        tiled: jax.lax.psum_scatter's meaning.

    Returns:
        This device's block of the sum, varying over the axes. Transpose: all_gather.
    """
    ctx = context.require("psum_scatter")
    axes = _axes(axis_name, ctx, "psum_scatter")
    n = _size(ctx, axes)

    def one(t):
        d = _dim(dim, t.dim(), "psum_scatter")
        if tiled and t.shape[d] % n:
            raise ValueError(
                f"shardfn.psum_scatter: dim {d} has size {t.shape[d]}, not divisible by the size {n} of "
                f"{axes}. Pad dim {d} to a multiple of {n}."
            )
        if not tiled and t.shape[d] != n:
            raise ValueError(
                f"shardfn.psum_scatter: with tiled=False dim {d} must have the axis size {n} of {axes}; "
                f"got {t.shape[d]}. Use tiled=True to scatter blocks of a longer dim."
            )
        src, v = _lift(t, axes, ctx)
        y = _suspended(ctx, _apply, _PsumScatter, src, axes, d, ctx)
        if not tiled:
            y = _suspended(ctx, y.squeeze, d)
        return set_vma(y, v | frozenset(axes)) if ctx.check_vma else y

    return _leafwise("psum_scatter", one, x)


def all_to_all(x, axis_name, split_dim, concat_dim, *, tiled=False):
    """Send chunk j of `split_dim` to device j of `axis_name`; concatenate what arrives along `concat_dim`.

    Args:
        x: local tensor(s).
        axis_name: mesh axis name or tuple of names.
        split_dim: with tiled=True divisible by the axis size; with tiled=False equal to it (it is
            removed and a new axis of the axis size appears at `concat_dim` of the output, as in
            jax.lax.all_to_all).
        concat_dim: where received chunks are joined (tiled) or the new axis goes (untiled).
        tiled: jax.lax.all_to_all's meaning.

    Returns:
        The exchanged value, varying over the axes. Transpose: all_to_all with the dims swapped.
    """
    ctx = context.require("all_to_all")
    axes = _axes(axis_name, ctx, "all_to_all")
    n = _size(ctx, axes)

    def one(t):
        s = _dim(split_dim, t.dim(), "all_to_all", "split_dim")
        if tiled:
            c = _dim(concat_dim, t.dim(), "all_to_all", "concat_dim")
            if t.shape[s] % n:
                raise ValueError(
                    f"shardfn.all_to_all: split_dim {s} has size {t.shape[s]}, not divisible by the size {n} "
                    f"of {axes}. Pad it to a multiple of {n} (or use the uneven helpers of the feature)."
                )
            src, v = _lift(t, axes, ctx)
            y = _suspended(ctx, _apply, _AllToAll, src, axes, s, c, ctx)
        else:
            c = _dim(concat_dim, t.dim(), "all_to_all", "concat_dim")
            if t.shape[s] != n:
                raise ValueError(
                    f"shardfn.all_to_all: with tiled=False split_dim {s} must have the axis size {n} of {axes}; "
                    f"got {t.shape[s]}. Use tiled=True to split a longer dim into blocks."
                )
            src, v = _lift(t, axes, ctx)
            if s == c:
                y = _suspended(ctx, _apply, _AllToAll, src, axes, s, c, ctx)
            else:
                # as jax.lax.all_to_all: insert the new axis at concat_dim, exchange, drop split_dim
                ins = c + 1 if s < c else c
                s2 = s if s < c else s + 1
                src = _suspended(ctx, src.unsqueeze, ins)
                y = _suspended(ctx, _apply, _AllToAll, src, axes, s2, ins, ctx)
                y = _suspended(ctx, y.squeeze, s2)
        return set_vma(y, v | frozenset(axes)) if ctx.check_vma else y

    return _leafwise("all_to_all", one, x)


def ppermute(x, axis_name, perm):
    """Send `x` from device `src` to device `dst` of `axis_name` for each (src, dst) in `perm`.

    Devices that receive nothing get zeros. Transpose: ppermute with the pairs inverted.

    Example (a ring shift on a 4-device axis):
        >>> ppermute(x, 'cp', [(i, (i + 1) % 4) for i in range(4)])
    """
    ctx = context.require("ppermute")
    axes = _axes(axis_name, ctx, "ppermute")
    n = _size(ctx, axes)
    try:
        perm = tuple((int(s), int(d)) for s, d in perm)
    except (TypeError, ValueError):
        raise TypeError(f"shardfn.ppermute: perm must be (source, destination) index pairs; got {perm!r}.") from None
    bad = [p for p in perm if not (0 <= p[0] < n and 0 <= p[1] < n)]
    if bad:
        raise ValueError(f"shardfn.ppermute: perm pairs {bad} are outside the axis size {n} of {axes}.")
    srcs, dsts = [s for s, _ in perm], [d for _, d in perm]
    if len(set(srcs)) != len(srcs) or len(set(dsts)) != len(dsts):
        raise ValueError(
            f"shardfn.ppermute: perm {list(perm)} repeats a source or a destination; each device may send "
            f"once and receive once."
        )

    def one(t):
        src, v = _lift(t, axes, ctx)
        y = _suspended(ctx, _apply, _Ppermute, src, axes, perm, ctx)
        return set_vma(y, v | frozenset(axes)) if ctx.check_vma else y

    return _leafwise("ppermute", one, x)


def axis_index(axis_name) -> torch.Tensor:
    """This device's index along `axis_name` (mixed radix for a tuple), a 0-d int64 tensor varying over it."""
    ctx = context.require("axis_index")
    axes = _axes(axis_name, ctx, "axis_index")
    t = torch.tensor(_index(ctx, axes), dtype=torch.int64)
    return set_vma(t, frozenset(axes)) if ctx.check_vma else t


def axis_size(axis_name) -> int:
    """The number of devices along `axis_name` (product for a tuple)."""
    ctx = context.require("axis_size")
    return _size(ctx, _axes(axis_name, ctx, "axis_size"))


def p2p(axis_name, sends=(), recvs=(), *, wait_sends=True):
    """Point-to-point messages along `axis_name` (for pipeline executors; not differentiable).

    Args:
        axis_name: the mesh axis (or tuple) whose indices name the peers.
        sends: (destination index, tensor) pairs, posted first.
        recvs: (source index, shape, dtype) triples, received in order.
        wait_sends: with True (default) return once every send of this call, and every send an
            earlier call left in flight, has completed. With False return as soon as the receives
            have arrived and leave this call's sends in flight: a pipeline executor needs sends
            that never block (on gloo a send completes only when the peer posts its receive, so
            two ranks that first send to each other and then receive would deadlock). The dist
            communicator keeps the in-flight sends (and their tensors) until a later call with
            wait_sends=True; the sim backend buffers every message at once, so there it changes
            nothing.

    Returns:
        The received tensors, in the order of `recvs`. On the sim backend a device waiting for a
        message that never comes ends the run with a DeadlockError or MeshTimeoutError; on the
        dist backend the batch goes through torch.distributed.batch_isend_irecv.
    """
    ctx = context.require("p2p")
    axes = _axes(axis_name, ctx, "p2p")
    n = _size(ctx, axes)
    sends = [(int(d), t) for d, t in sends]
    recvs = [(int(s), tuple(shape), dtype) for s, shape, dtype in recvs]
    bad = [i for i, _ in sends] + [i for i, _, _ in recvs]
    bad = [i for i in bad if not 0 <= i < n]
    if bad:
        raise ValueError(f"shardfn.p2p: peer indices {bad} are outside the axis size {n} of {axes}.")
    for _, t in sends:
        debug.record(ctx, "p2p", axes, _nbytes(t), "forward")
    if not isinstance(wait_sends, bool):
        raise TypeError(f"shardfn.p2p: wait_sends must be a bool; got {wait_sends!r}.")
    out = _suspended(ctx, ctx.comm.p2p, axes, sends, recvs, wait_sends)
    return out
