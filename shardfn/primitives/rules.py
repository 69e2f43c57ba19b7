"""The rules behind the named collectives: argument checks, transport, and each autograd function
with its transpose stated right beside it (DESIGN.md section 3). shardfn.primitives.collectives
holds the public wrappers."""
from __future__ import annotations

import math

import torch

from shardfn import context, debug
from shardfn.tree import tree_map
from shardfn.vma import EMPTY, set_vma, vma_of


_Function = torch.autograd.Function


# ---- argument helpers ---------------------------------------------------------------------------
def _axes(axis_name, ctx, api: str) -> tuple:
    if isinstance(axis_name, str):
        axes = (axis_name,)
    elif isinstance(axis_name, (tuple, list)) and axis_name and all(isinstance(a, str) for a in axis_name):
        axes = tuple(axis_name)
    else:
        raise TypeError(
            f"shardfn.{api}: axis_name must be a mesh axis name or a non-empty tuple of names; got {axis_name!r}."
        )
    unknown = [a for a in axes if a not in ctx.mesh.shape]
    if unknown:
        raise ValueError(
            f"shardfn.{api}: axis_name={axis_name!r} names {', '.join(map(repr, unknown))}, which the mesh "
            f"does not have (mesh axes: {ctx.mesh.axis_names}). Use one of the mesh's axis names."
        )
    if len(set(axes)) != len(axes):
        raise ValueError(f"shardfn.{api}: axis_name={axis_name!r} repeats an axis; name each axis once.")
    return axes


def _size(ctx, axes) -> int:
    shape = ctx.mesh.shape
    return math.prod(shape[a] for a in axes)


def _index(ctx, axes) -> int:
    index = 0
    for a in axes:
        index = index * ctx.mesh.shape[a] + ctx.coords[a]
    return index


def _dim(dim, ndim, api, what="dim") -> int:
    if not isinstance(dim, int) or not -ndim <= dim < ndim:
        raise ValueError(f"shardfn.{api}: {what}={dim!r} is out of range for a tensor of rank {ndim}.")
    return dim % ndim


def _nbytes(x) -> int:
    return x.numel() * x.element_size()


def _live(dc):
    """The device context to communicate through: the thread's own (sim backward) or the stored one."""
    cur = context.current()
    return cur if cur is not None and cur.mesh is dc.mesh else dc


def _leafwise(api, fn, x):
    if isinstance(x, torch.Tensor):
        return fn(x)

    def one(t):
        if isinstance(t, torch.Tensor):
            return fn(t)
        raise TypeError(f"shardfn.{api}: expected tensors (or a pytree of tensors); got {type(t).__name__}.")

    return tree_map(one, x)


def _suspended(ctx, fn, *args):
    """Run `fn` with vma tracking paused (the collective sets its outputs' vma itself)."""
    prev = ctx.suspended
    ctx.suspended = True
    try:
        return fn(*args)
    finally:
        ctx.suspended = prev


def _lift(t, axes, ctx):
    """Apply the vma rule to a collective's operand: pvary over the axes it does not vary over."""
    if not ctx.check_vma:
        return t, EMPTY
    v = vma_of(t)
    missing = tuple(a for a in axes if a not in v)
    if missing and t.requires_grad:
        t = _pvary_tensor(t, missing, ctx)
    return t, v


# ---- transport (records bytes, skips trivial groups) --------------------------------------------
def _all_reduce(dc, phase, name, x, axes, op):
    ctx = _live(dc)
    n = _size(ctx, axes)
    if n == 1:
        return x.clone()
    debug.record(ctx, name, axes, 2 * (n - 1) * _nbytes(x), phase, n)
    return ctx.comm.all_reduce(x.detach(), axes, op)


def _all_gather(dc, phase, x, axes, dim):
    ctx = _live(dc)
    n = _size(ctx, axes)
    if n == 1:
        return x.clone()
    debug.record(ctx, "all_gather", axes, (n - 1) * _nbytes(x), phase)
    return ctx.comm.all_gather(x.detach(), axes, dim)


def _reduce_scatter(dc, phase, x, axes, dim):
    ctx = _live(dc)
    n = _size(ctx, axes)
    if n == 1:
        return x.clone()
    debug.record(ctx, "psum_scatter", axes, (n - 1) * _nbytes(x), phase, n)
    return ctx.comm.reduce_scatter(x.detach(), axes, dim)


def _all_to_all(dc, phase, x, axes, split_dim, concat_dim):
    ctx = _live(dc)
    n = _size(ctx, axes)
    if n == 1:
        return x.clone()
    debug.record(ctx, "all_to_all", axes, (n - 1) * _nbytes(x), phase, n)
    return ctx.comm.all_to_all(x.detach(), axes, split_dim, concat_dim)


def _permute(dc, phase, x, axes, perm):
    ctx = _live(dc)
    me = _index(ctx, axes)
    sends = any(src == me and dst != me for src, dst in perm)
    debug.record(ctx, "ppermute", axes, _nbytes(x) if sends else 0, phase)
    if _size(ctx, axes) == 1:
        return x.clone() if perm else torch.zeros_like(x)
    return ctx.comm.permute(x.detach(), axes, perm)


# ---- autograd functions: forward and its transpose side by side ---------------------------------
class _Psum(_Function):
    @staticmethod
    def forward(ctx, x, axes, dc):
        return _all_reduce(dc, "forward", "psum", x, axes, "sum")

    @staticmethod
    def backward(ctx, g):  # transpose of psum: pvary, the identity on values
        return g, None, None


class _Pvary(_Function):
    @staticmethod
    def forward(ctx, x, axes, dc):
        ctx.axes, ctx.dc = axes, dc
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # transpose of pvary: psum
        return _all_reduce(ctx.dc, "backward", "psum", g, ctx.axes, "sum"), None, None


class _Pmean(_Function):
    @staticmethod
    def forward(ctx, x, axes, dc):
        ctx.n = _size(dc, axes)
        return _all_reduce(dc, "forward", "psum", x, axes, "sum").div_(ctx.n)

    @staticmethod
    def backward(ctx, g):
        return g / ctx.n, None, None


class _Pextreme(_Function):
    @staticmethod
    def forward(ctx, x, axes, op, dc):
        y = _all_reduce(dc, "forward", "pmax" if op == "max" else "pmin", x, axes, op)
        ctx.save_for_backward(x == y)
        return y

    @staticmethod
    def backward(ctx, g):  # the gradient goes to the device(s) holding the extreme value
        (hit,) = ctx.saved_tensors
        return g * hit, None, None, None


class _AllGather(_Function):
    @staticmethod
    def forward(ctx, x, axes, dim, dc):
        ctx.axes, ctx.dim, ctx.dc = axes, dim, dc
        return _all_gather(dc, "forward", x, axes, dim)

    @staticmethod
    def backward(ctx, g):  # transpose: psum_scatter
        return _reduce_scatter(ctx.dc, "backward", g.contiguous(), ctx.axes, ctx.dim), None, None, None


class _AllGatherInvariant(_Function):
    @staticmethod
    def forward(ctx, x, axes, dim, dc):
        ctx.dim, ctx.size, ctx.index = dim, x.shape[dim], _index(dc, axes)
        return _all_gather(dc, "forward", x, axes, dim)

    @staticmethod
    def backward(ctx, g):  # transpose: this device's block of the (invariant) cotangent
        return g.narrow(ctx.dim, ctx.index * ctx.size, ctx.size), None, None, None


class _PsumScatter(_Function):
    @staticmethod
    def forward(ctx, x, axes, dim, dc):
        ctx.axes, ctx.dim, ctx.dc = axes, dim, dc
        return _reduce_scatter(dc, "forward", x.contiguous(), axes, dim)

    @staticmethod
    def backward(ctx, g):  # transpose: all_gather
        return _all_gather(ctx.dc, "backward", g.contiguous(), ctx.axes, ctx.dim), None, None, None


class _AllToAll(_Function):
    @staticmethod
    def forward(ctx, x, axes, split_dim, concat_dim, dc):
        ctx.axes, ctx.split_dim, ctx.concat_dim, ctx.dc = axes, split_dim, concat_dim, dc
        return _all_to_all(dc, "forward", x, axes, split_dim, concat_dim)

    @staticmethod
    def backward(ctx, g):  # transpose: all_to_all with split and concat swapped
        return _all_to_all(ctx.dc, "backward", g.contiguous(), ctx.axes, ctx.concat_dim, ctx.split_dim), None, None, None, None


class _Ppermute(_Function):
    @staticmethod
    def forward(ctx, x, axes, perm, dc):
        ctx.axes, ctx.perm, ctx.dc = axes, perm, dc
        return _permute(dc, "forward", x, axes, perm)

    @staticmethod
    def backward(ctx, g):  # transpose: the inverse permutation
        inverse = tuple((dst, src) for src, dst in ctx.perm)
        return _permute(ctx.dc, "backward", g.contiguous(), ctx.axes, inverse), None, None, None


class _PvaryInplace(_Function):
    @staticmethod
    def forward(ctx, x, axes, dc):
        ctx.axes, ctx.dc = axes, dc
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, g):  # transpose of pvary: psum
        return _all_reduce(ctx.dc, "backward", "psum", g, ctx.axes, "sum"), None, None


def _pvary_inplace(t, axes, ctx):
    """pvary `t` in place (before an in-place op makes an invariant tensor varying)."""
    _suspended(ctx, _PvaryInplace.apply, t, axes, ctx)
    return t


class _NoGradCtx:
    """Stands in for autograd's ctx when no gradient can flow (forward called directly)."""

    def save_for_backward(self, *tensors):
        pass


def _apply(fn, t, *args):
    """fn.apply when a gradient can flow through `t`, else the bare forward (no autograd node)."""
    if t.requires_grad and torch.is_grad_enabled():
        return fn.apply(t, *args)
    return fn.forward(_NoGradCtx(), t, *args)


def _pvary_tensor(t, axes, ctx):
    """pvary one tensor over `axes` (used by the vma mode's automatic lift)."""
    y = _suspended(ctx, _Pvary.apply, t, axes, ctx)
    return set_vma(y, vma_of(t) | frozenset(axes)) if ctx.check_vma else y
