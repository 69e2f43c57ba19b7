"""The conjugate communication points of Megatron tensor and sequence parallelism (FEATURES.md 6, 8, 0.2 M4).

A tensor-parallel region starts where a value shared by the tp group meets column-split weights and
ends where row-split weights produce partial sums:

    region entry (`tp_enter`)                      region exit (`tp_exit`)
    TP:  f = pvary      (backward: psum)           g = psum          (backward: identity)
    SP:  all_gather seq (backward: psum_scatter)   psum_scatter seq  (backward: all_gather)

With ``check_vma=True`` the TP entry is what shard_map inserts by itself where an invariant
activation meets a tp-split weight; calling `tp_enter` once per region (rather than letting every
projection lift its own copy) keeps the backward at one all-reduce per region, which is what the
volume formulas of PERF.md 2.2 count. Sequence lengths that do not divide the tp size go through the
gloo-safe uneven collectives of `shardfn.primitives.uneven`.
"""
from __future__ import annotations

import torch

from shardfn import context
from shardfn.primitives.collectives import axis_size, psum, pvary
from shardfn.primitives.rules import _all_gather, _reduce_scatter
from shardfn.vma import set_vma, vma_of
from shardfn.primitives.uneven import uneven_all_gather, uneven_psum_scatter, uneven_slice

__all__ = ["tp_enter", "tp_exit", "scatter_to_sequence", "gather_from_sequence", "sp_column_linear_regather"]

_REDUCES = ("psum", "psum_scatter")


def tp_enter(x, axis_name="tp", *, sequence_dim: int | None = None, sequence_length: int | None = None):
    """Enter a tensor-parallel region: Megatron's ``f`` (TP) or the sequence all-gather (SP).

    Args:
        x: TP: the full activation ``[b, s, h]``, the same on every device of ``axis_name``.
            SP: this device's sequence block ``[b, s_r, h]``.
        axis_name: the tensor-parallel mesh axis.
        sequence_dim: None for TP; the sequence dim for SP (1 for ``[b, s, h]``).
        sequence_length: SP only: the global sequence length s when it is not ``s_r * tp`` (uneven
            sequence split, `split_sizes`); None means every device holds ``s / tp`` rows.

    Returns:
        ``[b, s, h]``, varying over ``axis_name``. Transpose: psum (TP) or psum_scatter over the
        sequence (SP).

    Example:
        >>> def mlp(x, w1, w2):      # x [b, s/tp, h], w1 [f/tp, h], w2 [h, f/tp]
        ...     h = tp_enter(x, 'tp', sequence_dim=1) @ w1.T
        ...     return tp_exit(gelu(h) @ w2.T, 'tp', reduce='psum_scatter', sequence_dim=1)
    """
    if sequence_dim is None:
        if sequence_length is not None:
            raise ValueError("shardfn.tp_enter: sequence_length is only meaningful with sequence_dim (SP).")
        return pvary(x, axis_name)
    n = axis_size(axis_name)
    total = x.shape[sequence_dim] * n if sequence_length is None else sequence_length
    return uneven_all_gather(x, axis_name, dim=sequence_dim, total=total)


def tp_exit(x, axis_name="tp", *, reduce: str = "psum", sequence_dim: int = 1):
    """Leave a tensor-parallel region: sum the partial results of row-split weights over ``axis_name``.

    Args:
        x: partial sums ``[b, s, h]`` (each device's row-parallel matmul).
        axis_name: the tensor-parallel mesh axis.
        reduce: "psum" (TP, Megatron's ``g``: all-reduce, result invariant) or "psum_scatter" (SP:
            reduce-scatter along ``sequence_dim``, each device keeps its `split_sizes` block).
        sequence_dim: the sequence dim for reduce="psum_scatter".

    Returns:
        ``[b, s, h]`` (psum) or ``[b, s_r, h]`` (psum_scatter). Transpose: identity or all_gather.
    """
    if reduce not in _REDUCES:
        raise ValueError(f"shardfn.tp_exit: reduce={reduce!r} must be one of {_REDUCES}.")
    if reduce == "psum":
        return psum(x, axis_name)
    return uneven_psum_scatter(x, axis_name, dim=sequence_dim)


def scatter_to_sequence(x, axis_name="tp", *, sequence_dim: int = 1):
    """Take this device's sequence block of a value shared by the tp group (SP region start).

    Returns ``[b, s_r, h]`` (`split_sizes` blocks) varying over ``axis_name``; the transpose sums the
    block gradients over the axis, so the shared value gets the whole gradient.
    """
    return uneven_slice(x, axis_name, dim=sequence_dim)


def gather_from_sequence(x, axis_name="tp", *, sequence_dim: int = 1, sequence_length: int | None = None,
                         invariant: bool = True):
    """Gather the sequence blocks of an SP activation into the full sequence (SP region end).

    Args:
        x: ``[b, s_r, h]``.
        axis_name: the tensor-parallel mesh axis.
        sequence_dim: the sequence dim.
        sequence_length: the global s when the split is uneven (None: ``s_r * tp``).
        invariant: type the result invariant over ``axis_name`` (transpose: keep this device's block,
            no communication), so it can leave shard_map under a spec that does not name the axis.
            With False the result is typed varying and the transpose is a reduce-scatter.

    Returns:
        ``[b, s, h]``.
    """
    n = axis_size(axis_name)
    total = x.shape[sequence_dim] * n if sequence_length is None else sequence_length
    return uneven_all_gather(x, axis_name, dim=sequence_dim, total=total, invariant=invariant)


class _RegatherLinear(torch.autograd.Function):
    """SP column linear that saves only the local sequence block and all-gathers it again for dW.

    Forward: all-gather x over the axis, ``y = x_full W^T (+ b)``. Backward: ``dX_full = dY W`` is
    reduce-scattered to the local block; x is gathered again for ``dW = dY^T x_full`` (Megatron-core's
    sequence-parallel backward: (t-1)/t * bsh more bytes per column linear, 1/t of the input memory).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, axes, dim, dc):
        ctx.axes, ctx.dim, ctx.dc, ctx.has_bias = axes, dim, dc, bias is not None
        ctx.save_for_backward(x, weight)
        full = _all_gather(dc, "forward", x.contiguous(), axes, dim)
        return torch.nn.functional.linear(full, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        dx = _reduce_scatter(ctx.dc, "backward", (g @ weight).contiguous(), ctx.axes, ctx.dim)
        full = _all_gather(ctx.dc, "backward", x.contiguous(), ctx.axes, ctx.dim)  # the extra all-gather
        dw = g.flatten(0, -2).T @ full.flatten(0, -2)
        db = g.flatten(0, -2).sum(0) if ctx.has_bias else None
        return dx, dw, db, None, None, None


def _lift_to(t, need, axis_name):
    missing = tuple(sorted(need - vma_of(t)))
    return pvary(t, missing) if missing else t


def sp_column_linear_regather(x, weight, bias=None, axis_name="tp", *, sequence_dim: int = 1):
    """Sequence-parallel column linear that keeps only the local input for backward (Megatron-core).

    Args:
        x: ``[b, s/t, in]``, this device's sequence block (even split).
        weight: ``[out/t, in]``.
        bias: ``[out/t]`` or None.
        axis_name: the tensor-parallel axis.
        sequence_dim: the sequence dim of x.

    Returns:
        ``[b, s, out/t]``, varying over ``axis_name``; equal to
        ``F.linear(tp_enter(x, axis_name, sequence_dim=sequence_dim), weight, bias)`` with its
        gradients, trading the saved gathered input for one more all-gather in backward.
    """
    ctx = context.require("sp_column_linear_regather")
    axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    dim = sequence_dim % x.dim()
    if dim == x.dim() - 1:
        raise ValueError(f"shardfn.sp_column_linear_regather: sequence_dim={sequence_dim} is x's feature dim.")
    if ctx.check_vma:  # the vma rule by hand: replicated weights meeting the varying input are pvary'd
        need = vma_of(x) | frozenset(axes)
        weight = _lift_to(weight, need, axis_name)
        bias = None if bias is None else _lift_to(bias, need, axis_name)
    prev = ctx.suspended
    ctx.suspended = True
    try:
        y = _RegatherLinear.apply(x, weight, bias, axes, dim, ctx)
    finally:
        ctx.suspended = prev
    if ctx.check_vma:
        set_vma(y, vma_of(x) | vma_of(weight) | vma_of(bias) | frozenset(axes))
    return y
