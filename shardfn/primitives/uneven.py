"""Uneven splits over a mesh axis, gloo-safe: pad to the largest block, use the equal-size collective, trim.

A dim of size D split over n devices follows ``torch.tensor_split`` sizes (FEATURES.md 57): device r
holds ``D // n + (1 if r < D % n else 0)`` entries starting at ``r * (D // n) + min(r, D % n)``
(1026 over 4 -> 257, 257, 256, 256; 25 heads over 4 -> 7, 6, 6, 6).

gloo cannot all-gather a list of tensors of different sizes (FEATURES.md 0.1), so every function
here pads each block to the largest size, runs the equal-size differentiable collective, and trims.
Each is a composition of differentiable pieces (pad, narrow, cat and the core collectives), so its
transpose is automatic: the transpose of the uneven all-gather is the uneven reduce-scatter and vice
versa, each with the padding's transpose (dropping the padded rows) folded in.

Outside shard_map, `pad_blocks` / `unpad_blocks` turn a global tensor into the padded layout that an
ordinary `P(axis)` split can carry into shard_map (and back); inside, `trim_block` drops the padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shardfn.primitives.collectives import all_gather, all_gather_invariant, axis_index, axis_size, psum_scatter, pvary

__all__ = [
    "split_sizes",
    "split_offsets",
    "block_range",
    "pad_blocks",
    "unpad_blocks",
    "trim_block",
    "uneven_all_gather",
    "uneven_psum_scatter",
    "uneven_slice",
]


def split_sizes(total: int, num_parts: int) -> tuple[int, ...]:
    """``torch.tensor_split`` sizes of ``total`` entries over ``num_parts`` parts (larger parts first).

    Example:
        >>> split_sizes(1026, 4)
        (257, 257, 256, 256)
    """
    if not isinstance(total, int) or total < 0:
        raise ValueError(f"split_sizes: total={total!r} must be a non-negative int.")
    if not isinstance(num_parts, int) or num_parts < 1:
        raise ValueError(f"split_sizes: num_parts={num_parts!r} must be a positive int.")
    base, extra = divmod(total, num_parts)
    return tuple(base + (1 if r < extra else 0) for r in range(num_parts))


def split_offsets(total: int, num_parts: int) -> tuple[int, ...]:
    """Start offset of each part under `split_sizes` (``r * (total // n) + min(r, total % n)``)."""
    sizes = split_sizes(total, num_parts)
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return tuple(out)


def block_range(total: int, axis_name) -> tuple[int, int]:
    """(offset, size) of this device's block of ``total`` entries split over ``axis_name``.

    Must be called inside shard_map; the values are Python ints (each device runs its own program).
    """
    n = axis_size(axis_name)
    r = int(axis_index(axis_name))
    return split_offsets(total, n)[r], split_sizes(total, n)[r]


def _check_dim(api, x, dim):
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"shardfn.{api}: dim={dim!r} is out of range for a tensor of rank {x.dim()}.")
    return dim % x.dim()


def _pad_to(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    missing = size - x.shape[dim]
    if missing == 0:
        return x
    pad = [0, 0] * (x.dim() - dim - 1) + [0, missing]
    return F.pad(x, pad)


def pad_blocks(x: torch.Tensor, num_parts: int, *, dim: int = 0) -> torch.Tensor:
    """Lay a global tensor out as ``num_parts`` equal blocks: each `split_sizes` block zero-padded to the largest.

    Use it outside shard_map so that ``P(axis)`` on ``dim`` hands device r its uneven block plus padding
    (drop the padding inside with `trim_block`). Differentiable; the gradient of the padding is dropped.

    Args:
        x: global tensor, ``x.shape[dim] = D``.
        num_parts: the axis size n.
        dim: the split dim.

    Returns:
        ``[..., n * ceil(D / n), ...]``.

    Example:
        >>> pad_blocks(torch.arange(5), 2)   # blocks [0, 1, 2] and [3, 4] + one pad
        tensor([0, 1, 2, 3, 4, 0])
    """
    dim = _check_dim("pad_blocks", x, dim)
    sizes = split_sizes(x.shape[dim], num_parts)
    if len(set(sizes)) == 1:
        return x
    blocks = torch.split(x, list(sizes), dim=dim)
    return torch.cat([_pad_to(b, dim, sizes[0]) for b in blocks], dim=dim)


def unpad_blocks(x: torch.Tensor, total: int, num_parts: int, *, dim: int = 0) -> torch.Tensor:
    """Inverse of `pad_blocks`: drop each block's padding, leaving ``total`` entries on ``dim``.

    Args:
        x: ``[..., num_parts * ceil(total / num_parts), ...]``.
        total: the unpadded size D.
        num_parts: the axis size n used by `pad_blocks`.
        dim: the split dim.
    """
    dim = _check_dim("unpad_blocks", x, dim)
    sizes = split_sizes(total, num_parts)
    if len(set(sizes)) == 1:
        return x
    step = sizes[0]
    if x.shape[dim] != num_parts * step:
        raise ValueError(
            f"shardfn.unpad_blocks: dim {dim} has size {x.shape[dim]}, but {num_parts} padded blocks of "
            f"{total} entries have {num_parts * step}. Pass the tensor made by pad_blocks(x, {num_parts})."
        )
    return torch.cat([x.narrow(dim, r * step, s) for r, s in enumerate(sizes)], dim=dim)


def trim_block(x: torch.Tensor, total: int, axis_name, *, dim: int = 0) -> torch.Tensor:
    """Drop this device's padding from its block of a `pad_blocks` layout (inside shard_map).

    Args:
        x: this device's block ``[..., ceil(total / n), ...]``.
        total: the unpadded global size D of ``dim``.
        axis_name: the axis the dim is split over.
        dim: the split dim.

    Returns:
        ``[..., split_sizes(total, n)[r], ...]`` (a view; its gradient pads with zeros).
    """
    dim = _check_dim("trim_block", x, dim)
    n = axis_size(axis_name)
    width = -(-total // n)
    if x.shape[dim] != width:
        raise ValueError(
            f"shardfn.trim_block: dim {dim} has size {x.shape[dim]} but a block of {total} entries padded over "
            f"{n} devices has {width}. Split pad_blocks(x, {n}, dim={dim}) with P({axis_name!r}) on that dim."
        )
    _, size = block_range(total, axis_name)
    return x.narrow(dim, 0, size)


def uneven_all_gather(x: torch.Tensor, axis_name, *, dim: int, total: int, invariant: bool = False) -> torch.Tensor:
    """All-gather blocks of `split_sizes(total, n)` along ``dim`` (pad to max, equal all_gather, trim).

    Args:
        x: this device's block ``[..., D_r, ...]`` with ``D_r = split_sizes(total, n)[r]``.
        axis_name: mesh axis name or tuple.
        dim: the dim to gather along.
        total: the global size D.
        invariant: gather with `all_gather_invariant` (result typed invariant; transpose is a local
            slice) instead of `all_gather` (typed varying; transpose is the uneven reduce-scatter).

    Returns:
        ``[..., D, ...]`` in axis-index order. Bytes sent per device: ``(n - 1) * ceil(D / n)`` rows.

    Example:
        >>> # 5 rows over 2 devices: device 0 holds 3, device 1 holds 2
        >>> uneven_all_gather(x_local, 'tp', dim=0, total=5)
    """
    dim = _check_dim("uneven_all_gather", x, dim)
    n = axis_size(axis_name)
    sizes = split_sizes(total, n)
    r = int(axis_index(axis_name))
    if x.shape[dim] != sizes[r]:
        raise ValueError(
            f"shardfn.uneven_all_gather: device {r} of {axis_name!r} holds {x.shape[dim]} entries on dim {dim}, "
            f"but split_sizes({total}, {n}) gives it {sizes[r]}. Split the dim with split_sizes/block_range."
        )
    gather = all_gather_invariant if invariant else all_gather
    if len(set(sizes)) == 1:
        return gather(x, axis_name, dim=dim, tiled=True)
    full = gather(_pad_to(x, dim, sizes[0]), axis_name, dim=dim, tiled=True)
    return torch.cat([full.narrow(dim, i * sizes[0], s) for i, s in enumerate(sizes)], dim=dim)


def uneven_psum_scatter(x: torch.Tensor, axis_name, *, dim: int) -> torch.Tensor:
    """Sum ``x`` over ``axis_name`` and keep this device's `split_sizes` block of ``dim``.

    The partial sums are laid out as n padded blocks, reduce-scattered with the equal-size
    collective, and trimmed (MindSpeed uses all-reduce + slice; this sends half the bytes).

    Args:
        x: ``[..., D, ...]`` partial sums, D any size.
        axis_name: mesh axis name or tuple.
        dim: the scattered dim.

    Returns:
        ``[..., split_sizes(D, n)[r], ...]``. Bytes sent per device: ``(n - 1) / n`` of the padded input.
    """
    dim = _check_dim("uneven_psum_scatter", x, dim)
    n = axis_size(axis_name)
    total = x.shape[dim]
    if total % n == 0:
        return psum_scatter(x, axis_name, dim=dim, tiled=True)
    local = psum_scatter(pad_blocks(x, n, dim=dim), axis_name, dim=dim, tiled=True)
    _, size = block_range(total, axis_name)
    return local.narrow(dim, 0, size)


def uneven_slice(x: torch.Tensor, axis_name, *, dim: int) -> torch.Tensor:
    """This device's `split_sizes` block of a value that is the same on every device of ``axis_name``.

    The value is first marked varying (`pvary`), so the transpose sums the zero-padded block
    gradients over the axis: every device gets the whole gradient (Megatron's scatter-to-sequence
    region, whose backward is a gather).

    Args:
        x: ``[..., D, ...]`` (invariant over ``axis_name``).
        axis_name: mesh axis name or tuple.
        dim: the split dim.

    Returns:
        ``[..., D_r, ...]``, varying over ``axis_name``.
    """
    dim = _check_dim("uneven_slice", x, dim)
    offset, size = block_range(x.shape[dim], axis_name)
    return pvary(x, axis_name).narrow(dim, offset, size)
