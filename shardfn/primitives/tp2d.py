"""2D tensor-parallel communication patterns (FEATURES.md 7, MindSpeed ``--tp-2d``).

The tp group is a (tp_x, tp_y) pair of mesh axes. Between layers an activation is ``[b, s/x, h/y]``:
the sequence split over tp_x, the hidden dim over tp_y. A 2D linear has an all-gather axis AG and a
reduce-scatter axis RS; its weight ``[out, in]`` is split ``P(AG, RS)``:

    x [b, s/|AG|, in/|RS|] --all_gather seq over AG--> [b, s, in/|RS|] --@ W^T--> [b, s, out/|AG|]
    (partial over RS) --psum_scatter seq over RS--> [b, s/|RS|, out/|AG|]

Consecutive linears swap AG and RS (fc1: AG=tp_x, RS=tp_y; fc2: AG=tp_y, RS=tp_x), so the layout
comes back after two. The backward is the transpose of each collective (reduce-scatter of dX over
AG, all-gather of dY over RS); autograd keeps the gathered input for dW, so no re-gather.

Per device, forward, one linear sends ``(|AG|-1) * b*s*in / (|AG|*|RS|)`` elements in the
all-gather and ``(|RS|-1) * b*s*out / (|AG|*|RS|)`` in the reduce-scatter; a two-linear block
(h -> E -> h) sends ``2bs[h(x-1) + E(y-1)] / (xy)``, and the backward the same again.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shardfn.primitives.collectives import all_gather, psum, psum_scatter, pvary

__all__ = ["linear_2d", "psum_stats"]


def linear_2d(params: dict, x: torch.Tensor, *, ag_axis: str, rs_axis: str, sequence_dim: int = 1) -> torch.Tensor:
    """The 2D linear: all-gather the sequence over ``ag_axis``, multiply, reduce-scatter it over ``rs_axis``.

    Args:
        params: ``{"weight": [out/|AG|, in/|RS|], "bias": [out/|AG|]?}`` (specs ``P(AG, RS)``, ``P(AG)``).
        x: ``[b, s/|AG|, in/|RS|]``.
        ag_axis: the axis the input's sequence is split over and the output features are split over.
        rs_axis: the axis the input features are split over and the output's sequence will be.
        sequence_dim: the sequence dim of x.

    Returns:
        ``[b, s/|RS|, out/|AG|]``; the bias is added after the reduce-scatter.

    Raises:
        ValueError: the local weight does not take x's features, or the gathered sequence is not
            divisible by the size of ``rs_axis``.
    """
    w, b = params["weight"], params.get("bias")
    if w.dim() != 2 or x.shape[-1] != w.shape[-1]:
        raise ValueError(
            f"shardfn.linear_2d: x's last dim {x.shape[-1]} must equal the local weight's in_features "
            f"(weight {tuple(w.shape)} is [out/|{ag_axis}|, in/|{rs_axis}|]). Split the weight P({ag_axis!r}, {rs_axis!r})."
        )
    full = all_gather(x, ag_axis, dim=sequence_dim, tiled=True)  # [b, s, in/|RS|]
    y = psum_scatter(F.linear(full, w), rs_axis, dim=sequence_dim, tiled=True)  # [b, s/|RS|, out/|AG|]
    return y if b is None else y + b


def psum_stats(stats, axis_name):
    """Sum several per-row statistics over ``axis_name`` in one all-reduce (stacked on a last dim).

    Args:
        stats: a list of tensors of one shape ``[...]`` (e.g. local sums of x and x^2).
        axis_name: the axis the hidden dim is split over.

    Returns:
        The list of summed statistics (equal on every device, typed varying so they combine with the
        local activation). Backward: one all-reduce of the statistics' gradients (pvary's transpose).
    """
    stacked = torch.stack(list(stats), dim=-1)
    # pvary the stacked sum once, so the backward sums all statistics' gradients in one all-reduce
    return list(pvary(psum(stacked, axis_name), axis_name).unbind(-1))
