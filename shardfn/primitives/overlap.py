"""Communication over computation: chunked collective + matmul pipelines (CoC, FEATURES.md 39; MC2, 56).

A tensor-parallel linear has a collective right before or after its matmul. Splitting the matmul's
rows into k chunks lets chunk j's collective run while chunk j+1 multiplies (on NPU/CUDA through side
streams; on CPU the same calls run in the same order, so order and numbers are what tests check).

    all_gather_matmul      AG -> MM   (column linear under SP; MC2's all_gather_base_mm)
    matmul_reduce_scatter  MM -> RS   (row linear under SP; MC2's mm_reduce_scatter_base)
    matmul_all_reduce      MM -> AR   (row linear under TP)
    ring_all_gather_matmul AG -> MM as t ppermute steps (TP-2D's overlap-ag-with-matmul)

Issue order for k chunks is ``C_0, M_0, C_1, M_1, ...`` for AG -> MM (each chunk's gather precedes
its matmul) and ``M_0, C_0, M_1, C_1, ...`` for MM -> RS / AR. Chunk j of an all-gather collects
rows ``(chunk j, rank 0..t-1)`` (chunk-major); a final shuffle restores the rank-major order, so
every output row is the same dot product as in the unchunked path (bitwise equal). The reduce-scatter
chunk j carries sub-block j of every rank's block, so each device still receives its own block and
every element is summed over the same devices in the same order. The backward of each chunk is the
transpose of its collective (reduce-scatter / all-gather / identity), chunk by chunk.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shardfn.primitives.collectives import all_gather, axis_index, axis_size, ppermute, psum, psum_scatter

__all__ = ["all_gather_matmul", "ring_all_gather_matmul", "matmul_reduce_scatter", "matmul_all_reduce"]


def _check(api, x, weight, dim, num_chunks, divisor):
    if not isinstance(num_chunks, int) or isinstance(num_chunks, bool) or num_chunks < 1:
        raise ValueError(f"shardfn.{api}: num_chunks={num_chunks!r} must be a positive int (1 = no chunking).")
    if not isinstance(dim, int) or isinstance(dim, bool) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"shardfn.{api}: dim={dim!r} is out of range for x of shape {tuple(x.shape)}.")
    d = dim % x.dim()
    if d == x.dim() - 1:
        raise ValueError(f"shardfn.{api}: dim={dim} is x's feature dim; pass the row (sequence) dim.")
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"shardfn.{api}: x's last dim {x.shape[-1]} must equal weight's in_features {weight.shape[-1]} "
            f"(weight {tuple(weight.shape)} is [out, in])."
        )
    rows = x.shape[d]
    if rows % divisor:
        raise ValueError(
            f"shardfn.{api}: dim {d} of x has {rows} rows, not divisible by {divisor} "
            f"(num_chunks={num_chunks}{' x axis size' if divisor != num_chunks else ''}). Choose num_chunks "
            f"dividing the rows, or pad them."
        )
    return d


def all_gather_matmul(x, weight, axis_name, *, dim: int = 1, num_chunks: int = 1, return_gathered: bool = False):
    """All-gather ``x`` along ``dim`` over ``axis_name`` and multiply by ``weight^T``, in k pipelined chunks.

    Args:
        x: this device's rows ``[..., m, ..., in]`` (m along ``dim``), divisible by ``num_chunks``.
        weight: ``[out, in]``.
        axis_name: the axis to gather over (t devices).
        dim: the row dim of x (the sequence dim).
        num_chunks: k; 1 is the plain all-gather then matmul.
        return_gathered: also return the gathered input (MC2's ``gather_output``).

    Returns:
        ``y [..., t*m, ..., out]`` (rows in rank order), and the gathered ``x [..., t*m, ..., in]``
        with return_gathered. Both vary over ``axis_name``. Equal bitwise to ``all_gather(x) @ W^T``.

    Raises:
        ValueError: k does not divide m, or dims do not fit.
    """
    d = _check("all_gather_matmul", x, weight, dim, num_chunks, num_chunks)
    t = axis_size(axis_name)
    ys, gs = [], []
    for chunk in x.chunk(num_chunks, dim=d):
        g = all_gather(chunk, axis_name, dim=d, tiled=True)  # [(rank, m/k)] rows of chunk j
        ys.append(F.linear(g, weight))
        gs.append(g)

    def shuffle(parts):  # chunk-major (j, rank) -> rank-major (rank, j)
        if len(parts) == 1:
            return parts[0]
        pieces = [p.chunk(t, dim=d) for p in parts]
        return torch.cat([pieces[j][r] for r in range(t) for j in range(len(parts))], dim=d)

    y = shuffle(ys)
    return (y, shuffle(gs)) if return_gathered else y


def ring_all_gather_matmul(x, weight, axis_name, *, dim: int = 1):
    """All-gather + matmul as a ring (MindSpeed's ``--enable-overlap-ag-with-matmul``, FEATURES.md 7).

    In t steps each device multiplies the block it holds while passing it to its ring neighbour
    (``ppermute`` by +1), so every send overlaps a matmul; the t products are placed in rank order.

    Args:
        x: this device's rows ``[..., m, ..., in]`` (m along ``dim``).
        weight: ``[out, in]``.
        axis_name: the ring axis (t devices).
        dim: the row dim of x.

    Returns:
        ``[..., t*m, ..., out]``, varying over ``axis_name``; equal bitwise to ``all_gather(x) @ W^T``
        (each block's product is the same matmul). Bytes per device: ``(t - 1)`` blocks, as the
        all-gather. Transpose: the ring in reverse (ppermute by -1), accumulating dX.
    """
    d = _check("ring_all_gather_matmul", x, weight, dim, 1, 1)
    t = axis_size(axis_name)
    r = int(axis_index(axis_name))
    ring = [(i, (i + 1) % t) for i in range(t)]
    blocks = [None] * t
    held = x
    for step in range(t):
        blocks[(r - step) % t] = F.linear(held, weight)  # the block that started on device r - step
        if step < t - 1:
            held = ppermute(held, axis_name, ring)
    return torch.cat(blocks, dim=d)


def matmul_reduce_scatter(x, weight, axis_name, *, dim: int = 1, num_chunks: int = 1):
    """Multiply ``x`` by ``weight^T`` and reduce-scatter the partial sums along ``dim``, in k chunks.

    Args:
        x: ``[..., M, ..., in_r]`` (this device's slice of the contraction dim), M divisible by
            ``t * num_chunks``.
        weight: ``[out, in_r]``.
        axis_name: the axis to reduce over (t devices).
        dim: the row dim to scatter.
        num_chunks: k; 1 is the plain matmul then psum_scatter.

    Returns:
        ``[..., M/t, ..., out]``: this device's row block of the sum, varying over ``axis_name``.
        Equal to ``psum_scatter(x @ W^T)`` element for element (same devices, same order).
    """
    t = axis_size(axis_name)
    d = _check("matmul_reduce_scatter", x, weight, dim, num_chunks, num_chunks * t)
    if num_chunks == 1:
        return psum_scatter(F.linear(x, weight), axis_name, dim=d, tiled=True)
    subs = [block.chunk(num_chunks, dim=d) for block in x.chunk(t, dim=d)]  # [rank][j]
    outs = []
    for j in range(num_chunks):
        rows = torch.cat([subs[r][j] for r in range(t)], dim=d)  # sub-block j of every rank's block
        outs.append(psum_scatter(F.linear(rows, weight), axis_name, dim=d, tiled=True))
    return torch.cat(outs, dim=d)


def matmul_all_reduce(x, weight, axis_name, *, dim: int = 1, num_chunks: int = 1):
    """Multiply ``x`` by ``weight^T`` and all-reduce the partial sums, in k row chunks.

    Args:
        x: ``[..., M, ..., in_r]``, M divisible by ``num_chunks``.
        weight: ``[out, in_r]``.
        axis_name: the axis to reduce over.
        dim: the row dim to chunk.
        num_chunks: k; 1 is the plain matmul then psum.

    Returns:
        ``[..., M, ..., out]``, invariant over ``axis_name``.
    """
    d = _check("matmul_all_reduce", x, weight, dim, num_chunks, num_chunks)
    if num_chunks == 1:
        return psum(F.linear(x, weight), axis_name)
    return torch.cat([psum(F.linear(c, weight), axis_name) for c in x.chunk(num_chunks, dim=d)], dim=d)
