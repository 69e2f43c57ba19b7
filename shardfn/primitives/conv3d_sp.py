"""Conv3D sequence parallelism: the depth windows of a conv split over a mesh axis (FEATURES.md 9).

The input ``[B, C, D, H, W]`` is the same on every device of the axis. The ``D_out`` output depth
windows (no padding; window i reads input frames ``[i*s, i*s + k_eff)`` with ``k_eff = dil*(k_d-1)+1``)
are split over the axis by `split_sizes`; device r convolves only the input frames its windows read,
its own range plus a halo of ``k_eff - s`` frames shared with the next device (for any stride,
including ``k_d = 1``), and the output blocks are all-gathered along depth.

Backward: each device keeps its block of the output gradient (the gather is typed invariant, so
its transpose is a local slice), the local conv backward gives the gradient of its input slice,
and `_HaloSplit`'s transpose all-gathers those slices (pad-and-trim, gloo-safe) and overlap-adds
them into the full depth, so every device holds the whole input gradient. The weight and bias are
replicated and go through `pvary` over exactly this axis, so their gradients are summed over the
conv's own group (MindSpeed's reduction over the default world group is a bug avoided here).

Depth split note: MindSpeed assigns windows by input frame ranges ``[r*D//P, (r+1)*D//P)``; this
module balances the output windows instead (`split_sizes`), which gives every device work whenever
``D_out >= P``. With ``D_out < P`` the conv runs unsplit on every device (MindSpeed's fallback).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shardfn import context
from shardfn.primitives.collectives import axis_index, axis_size, pvary
from shardfn.primitives.rules import _all_gather
from shardfn.primitives.uneven import split_offsets, split_sizes, uneven_all_gather
from shardfn.vma import set_vma, vma_of

__all__ = ["conv3d_depth_ranges", "conv3d_sequence_parallel"]


def _triple(v, name):
    if isinstance(v, int):
        return (v, v, v)
    if isinstance(v, (tuple, list)) and len(v) == 3 and all(isinstance(i, int) for i in v):
        return tuple(v)
    raise TypeError(f"conv3d_sequence_parallel: {name}={v!r} must be an int or a triple of ints.")


def conv3d_depth_ranges(depth: int, kernel_d: int, stride_d: int, num_parts: int, *, dilation_d: int = 1):
    """Per device: ``(in_start, in_stop, out_start, out_stop)`` of the depth split (see module doc).

    Args:
        depth: input depth D.
        kernel_d: depth kernel size k_d.
        stride_d: depth stride s.
        num_parts: the axis size P.
        dilation_d: depth dilation.

    Returns:
        A tuple of P ranges; device r convolves input frames ``[in_start, in_stop)`` into output
        windows ``[out_start, out_stop)``. Consecutive input ranges overlap by ``k_eff - s`` frames.

    Example:
        >>> conv3d_depth_ranges(10, 3, 2, 2)      # D_out = 4 windows: 2 each
        ((0, 5, 0, 2), (4, 9, 2, 4))
    """
    k_eff = dilation_d * (kernel_d - 1) + 1
    if depth < k_eff:
        raise ValueError(f"conv3d_depth_ranges: depth {depth} is smaller than the dilated depth kernel {k_eff}.")
    d_out = (depth - k_eff) // stride_d + 1
    out = []
    for start, size in zip(split_offsets(d_out, num_parts), split_sizes(d_out, num_parts)):
        out.append((start * stride_d, (start + size - 1) * stride_d + k_eff, start, start + size))
    return tuple(out)


class _HaloSplit(torch.autograd.Function):
    """Forward: this device's input frames. Transpose: all-gather the frame gradients, overlap-add."""

    @staticmethod
    def forward(ctx, x, ranges, rank, axes, dc):
        ctx.ranges, ctx.axes, ctx.dc, ctx.shape = ranges, axes, dc, x.shape
        start, stop = ranges[rank][0], ranges[rank][1]
        return x.narrow(2, start, stop - start).clone()

    @staticmethod
    def backward(ctx, g):
        lengths = [stop - start for start, stop, _, _ in ctx.ranges]
        width = max(lengths)
        g = F.pad(g, (0, 0, 0, 0, 0, width - g.shape[2])).contiguous()
        full = _all_gather(ctx.dc, "backward", g, ctx.axes, 2)  # [B, C, P*width, H, W]
        out = g.new_zeros(ctx.shape)
        for r, (start, stop, _, _) in enumerate(ctx.ranges):
            out[:, :, start:stop] += full[:, :, r * width:r * width + stop - start]
        return out, None, None, None, None


def conv3d_sequence_parallel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                             axis_name, stride=1, dilation=1) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, stride, padding=0, dilation)`` with the depth windows split over ``axis_name``.

    Args:
        x: ``[B, C_in, D, H, W]``, the same on every device of ``axis_name``.
        weight: ``[C_out, C_in, k_d, k_h, k_w]``, replicated.
        bias: ``[C_out]`` or None, replicated.
        axis_name: the mesh axis (or tuple) the depth windows are split over.
        stride: int or (s_d, s_h, s_w).
        dilation: int or (dil_d, dil_h, dil_w).

    Returns:
        ``[B, C_out, D_out, H_out, W_out]``, the full output, invariant over ``axis_name``.
        Bytes per device: forward one all-gather of ``ceil(D_out/P)`` output frames; backward one
        all-gather of the largest input slice's gradient plus the all-reduce of the weight (and bias)
        gradient over ``axis_name``.

    Example:
        >>> f = shard_map(lambda x, w: conv3d_sequence_parallel(x, w, axis_name='sp', stride=(2, 1, 1)),
        ...               mesh=mesh, in_specs=(P(), P()), out_specs=P())
    """
    if x.dim() != 5 or weight.dim() != 5:
        raise ValueError(
            f"conv3d_sequence_parallel: x {tuple(x.shape)} must be [B, C, D, H, W] and weight {tuple(weight.shape)} "
            f"[C_out, C_in, k_d, k_h, k_w]."
        )
    stride, dilation = _triple(stride, "stride"), _triple(dilation, "dilation")
    n = axis_size(axis_name)
    ranges = conv3d_depth_ranges(x.shape[2], weight.shape[2], stride[0], n, dilation_d=dilation[0])
    d_out = ranges[-1][3]
    if d_out < n:
        return F.conv3d(x, weight, bias, stride=stride, dilation=dilation)
    ctx = context.require("conv3d_sequence_parallel")
    axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    rank = int(axis_index(axis_name))
    prev = ctx.suspended
    ctx.suspended = True
    try:
        xs = _HaloSplit.apply(x, ranges, rank, axes, ctx)
    finally:
        ctx.suspended = prev
    if ctx.check_vma:
        set_vma(xs, vma_of(x) | frozenset(axes))
    # pvary by hand (also under check_vma=False): the weight and bias gradients sum over this axis only
    weight = pvary(weight, axis_name)
    bias = None if bias is None else pvary(bias, axis_name)
    y = F.conv3d(xs, weight, bias, stride=stride, dilation=dilation)  # [B, C_out, D_out_r, H', W']
    return uneven_all_gather(y, axis_name, dim=2, total=d_out, invariant=True)
