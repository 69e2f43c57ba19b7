"""MC2 fused matmul + collective ops (FEATURES.md 56) with a mesh axis instead of an HCCL group.

torch_npu's ``npu_all_gather_base_mm``, ``npu_mm_reduce_scatter_base`` and
``npu_mm_all_reduce_base`` pipeline tiles of a GEMM with the collective of a tensor-parallel
sequence-parallel linear. Here the communicator name ``hcom`` is replaced by ``axis_name`` (a mesh
axis or tuple of axes) and the reference runs the unfused sequence, collective then matmul or
matmul then collective, through shardfn's differentiable collectives, so it is used inside
``shard_map`` and its gradients are those of the unfused Megatron sequence-parallel linear.
These ops are reference only: the NPU kernels take an HCCL communicator name that a mesh axis
does not carry, so nothing is dispatched to torch_npu here.

Formulas (Ascend's, bias and x3 included): all-gather-matmul ``out = allgather(x1) @ x2 + bias``;
matmul-reduce-scatter ``out = reducescatter(x1 @ x2 + bias)``; matmul-all-reduce
``out = allreduce(x1 @ x2 + bias + x3)``. In the last two a bias held by every device is summed
``world_size`` times, as in the kernel's formula; Megatron adds the bias after the op instead.
"""
from __future__ import annotations

import torch

from shardfn.primitives.collectives import all_gather, axis_size, psum, psum_scatter

__all__ = ["npu_all_gather_base_mm", "npu_mm_reduce_scatter_base", "npu_mm_all_reduce_base"]


def _check_world(op: str, axis_name, world_size: int) -> None:
    n = axis_size(axis_name)
    if world_size != n:
        raise ValueError(f"{op}: world_size={world_size} but axis {axis_name!r} has {n} devices. Pass "
                         f"world_size=axis_size({axis_name!r}).")


def _check_2d(op: str, **tensors: torch.Tensor) -> None:
    bad = [f"{name} {tuple(t.shape)}" for name, t in tensors.items() if t.ndim != 2]
    if bad:
        raise ValueError(f"{op}: {', '.join(bad)} must be 2-d ([m, k] and [k, n]); flatten the leading dims.")


def _check_reduce_op(op: str, reduce_op: str) -> None:
    if reduce_op != "sum":
        raise ValueError(f"{op}: reduce_op={reduce_op!r}; only 'sum' is supported (as on the NPU).")


def npu_all_gather_base_mm(input, x2, axis_name, world_size, *, bias=None, gather_index=0, gather_output=True,
                           comm_turn=0):
    """All-gather ``input`` over ``axis_name`` along dim 0, then multiply: the SP column linear.

    Use inside ``shard_map``. Transpose: the gradient of ``input`` is the reduce-scatter
    (``psum_scatter``) of ``dout @ x2^T``; ``x2``'s gradient is ``gathered^T @ dout``.

    Args:
        input: ``[m, k]`` local rows (this device's sequence shard).
        x2: ``[k, n]`` local weight (e.g. the column-parallel ``W^T`` shard).
        axis_name: mesh axis (or tuple) to gather over; replaces torch_npu's ``hcom``.
        world_size: the axis size (checked).
        bias: ``[n]``, added after the matmul.
        gather_index: 0 gathers ``input`` (the only value the NPU supports either).
        gather_output: also return the gathered input (for the weight gradient).
        comm_turn: tiling of the fused kernel; no effect on the result.

    Returns:
        ``(out [world*m, n], gathered [world*m, k])``; ``gathered`` is an empty tensor when
        ``gather_output`` is False.

    Example:
        >>> def column(x, w):                       # x: [s/tp, h], w: [h, f/tp]
        ...     return npu_all_gather_base_mm(x, w, "tp", axis_size("tp"))[0]
        >>> shard_map(column, mesh=mesh, in_specs=(P("tp"), P(None, "tp")), out_specs=P(None, "tp"))
    """
    del comm_turn
    op = "npu_all_gather_base_mm"
    _check_2d(op, input=input, x2=x2)
    _check_world(op, axis_name, world_size)
    if gather_index != 0:
        raise NotImplementedError(f"{op}: gather_index={gather_index}; only 0 (gather input) is supported, as on "
                                  "the NPU.")
    gathered = all_gather(input, axis_name, dim=0, tiled=True)  # [world*m, k]
    out = gathered @ x2
    if bias is not None:
        out = out + bias
    return out, (gathered if gather_output else input.new_empty(0))


def npu_mm_reduce_scatter_base(input, x2, axis_name, world_size, *, reduce_op="sum", bias=None, comm_turn=0):
    """Multiply, then sum over ``axis_name`` and keep this device's rows: the SP row linear.

    Use inside ``shard_map``. Transpose: all-gather of ``dout`` along dim 0, then the matmul
    gradients.

    Args:
        input: ``[m, k]`` local activations (k is this device's shard of the contraction).
        x2: ``[k, n]`` local weight shard.
        axis_name: mesh axis (or tuple) to reduce-scatter over; replaces ``hcom``.
        world_size: the axis size (checked); ``m`` must be divisible by it.
        reduce_op: "sum" only.
        bias: ``[n]``, added before the reduction (the kernel's formula).
        comm_turn: tiling of the fused kernel; no effect on the result.

    Returns:
        ``[m / world, n]``: block ``axis_index`` of the summed product.
    """
    del comm_turn
    op = "npu_mm_reduce_scatter_base"
    _check_2d(op, input=input, x2=x2)
    _check_world(op, axis_name, world_size)
    _check_reduce_op(op, reduce_op)
    if input.shape[0] % world_size:
        raise ValueError(f"{op}: input has {input.shape[0]} rows, not divisible by world_size={world_size}. Pad "
                         "the sequence to a multiple of the axis size.")
    y = input @ x2
    if bias is not None:
        y = y + bias
    return psum_scatter(y, axis_name, dim=0, tiled=True)


def npu_mm_all_reduce_base(x1, x2, axis_name, *, reduce_op="sum", bias=None, antiquant_scale=None,
                           antiquant_offset=None, x3=None, dequant_scale=None, pertoken_scale=None,
                           comm_quant_scale_1=None, comm_quant_scale_2=None, antiquant_group_size=0, comm_turn=0):
    """Multiply, then sum over ``axis_name``: the row-parallel linear without SP.

    Use inside ``shard_map``; the result is invariant over ``axis_name``. Transpose: the output
    gradient passes unchanged (pvary) into the matmul gradients.

    Args:
        x1: ``[m, k]`` or ``[s, m, k]`` local activations.
        x2: ``[k, n]`` local weight shard.
        axis_name: mesh axis (or tuple); replaces ``hcom``.
        reduce_op: "sum" only.
        bias: ``[n]``, added before the reduction (the kernel's formula).
        x3: like the output, added before the reduction.
        antiquant_scale, antiquant_offset, dequant_scale, pertoken_scale, comm_quant_scale_1,
            comm_quant_scale_2, antiquant_group_size: quantised variants; must be unset.
        comm_turn: tiling of the fused kernel; no effect on the result.

    Returns:
        ``[..., m, n]`` summed over the axis.
    """
    del comm_turn, antiquant_group_size
    op = "npu_mm_all_reduce_base"
    quant = {"antiquant_scale": antiquant_scale, "antiquant_offset": antiquant_offset,
             "dequant_scale": dequant_scale, "pertoken_scale": pertoken_scale,
             "comm_quant_scale_1": comm_quant_scale_1, "comm_quant_scale_2": comm_quant_scale_2}
    given = [name for name, value in quant.items() if value is not None]
    if given:
        raise NotImplementedError(f"{op}: quantised MC2 ({', '.join(given)}) has no reference; pass "
                                  "floating-point x1/x2 and leave the quantisation arguments unset.")
    if x1.ndim not in (2, 3) or x2.ndim != 2:
        raise ValueError(f"{op}: x1 {tuple(x1.shape)} must be 2-d or 3-d and x2 {tuple(x2.shape)} 2-d.")
    _check_reduce_op(op, reduce_op)
    y = x1 @ x2
    if bias is not None:
        y = y + bias
    if x3 is not None:
        y = y + x3
    return psum(y, axis_name)
