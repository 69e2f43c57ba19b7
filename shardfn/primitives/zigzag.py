"""Sequence layouts for context parallelism: zigzag (load-balanced causal ring), per-document zigzag, splits.

Causal ring attention does unequal work per rank when the sequence is split contiguously (rank 0
attends to one block, rank c-1 to c). The zigzag layout (FEATURES.md 12) cuts the sequence into
2c chunks and gives rank i chunks i and 2c-1-i, so every rank does the same work. These helpers
apply and undo that permutation on global tensors *before* shard_map splits them contiguously, so
`P(None, 'cp')` on a zigzagged tensor hands rank i exactly its two chunks. Position ids and RoPE
tables go through the same permutation (`zigzag_shard(cos, c, dim=0)`).

For packed documents (EOD reset, FEATURES.md 55) each document is padded to a multiple of 2c and
split in 2c pieces; rank r takes pieces r and 2c-1-r of *every* document (`varlen_zigzag_*`).
Padding slots carry position -1 and are masked out of attention.

Hybrid CP (FEATURES.md 13) uses `zigzag_shard` over the ring degree r and then splits the result
contiguously over (ring, ulysses): `P(None, ('ring', 'ulysses'))`.
"""
from __future__ import annotations

import torch
from shardfn.primitives.uneven import split_sizes

__all__ = [
    "split_sizes",
    "zigzag_indices",
    "zigzag_shard",
    "zigzag_unshard",
    "varlen_zigzag_indices",
    "varlen_zigzag_shard",
    "varlen_zigzag_unshard",
    "layout_positions",
]


def _check(api, seq_len, num_ranks):
    if not isinstance(num_ranks, int) or num_ranks < 1:
        raise ValueError(f"{api}: num_ranks={num_ranks!r} must be a positive int (the cp axis size).")
    if seq_len % (2 * num_ranks):
        raise ValueError(
            f"{api}: the zigzag layout cuts the sequence into 2 * num_ranks = {2 * num_ranks} chunks, but the "
            f"sequence length {seq_len} is not divisible by {2 * num_ranks}. Pad the sequence to a multiple of "
            f"{2 * num_ranks} (mask the padding out of the loss), or use layout='contiguous'."
        )


def zigzag_indices(seq_len: int, num_ranks: int) -> torch.Tensor:
    """Original positions in zigzag order: for rank i, chunk i then chunk 2c-1-i, ranks in order.

    Args:
        seq_len: s, divisible by 2 * num_ranks.
        num_ranks: c, the ring size.

    Returns:
        int64 `[s]`; `x.index_select(dim, idx)` puts x in zigzag order.

    Example:
        >>> zigzag_indices(8, 2)
        tensor([0, 1, 6, 7, 2, 3, 4, 5])
    """
    _check("zigzag_indices", seq_len, num_ranks)
    chunks = torch.arange(seq_len).view(2 * num_ranks, -1)
    order = [j for i in range(num_ranks) for j in (i, 2 * num_ranks - 1 - i)]
    return chunks[order].reshape(-1)


def zigzag_shard(x: torch.Tensor, num_ranks: int, dim: int = 1) -> torch.Tensor:
    """Permute dim `dim` of a global tensor into zigzag order (then split it with P(..., 'cp', ...)).

    Args:
        x: global tensor, e.g. tokens `[b, s]`, activations `[b, s, ...]`, a RoPE table `[s, d]` (dim=0).
        num_ranks: the ring size c.
        dim: the sequence dim.
    """
    idx = zigzag_indices(x.shape[dim], num_ranks).to(x.device)
    return x.index_select(dim, idx)


def zigzag_unshard(x: torch.Tensor, num_ranks: int, dim: int = 1) -> torch.Tensor:
    """Undo `zigzag_shard`: back to the original sequence order."""
    idx = zigzag_indices(x.shape[dim], num_ranks).to(x.device)
    return x.index_select(dim, torch.argsort(idx))


def _doc_lengths(cu_seqlens) -> list[int]:
    cu = [int(c) for c in torch.as_tensor(cu_seqlens).tolist()]
    if not cu or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(
            f"cu_seqlens must start at 0 and be non-decreasing (cumulative document ends); got {cu}."
        )
    return [b - a for a, b in zip(cu, cu[1:])]


def varlen_zigzag_indices(cu_seqlens, num_ranks: int) -> torch.Tensor:
    """Per-document zigzag order with padding (FEATURES.md 55): original positions, -1 for a pad slot.

    Each document of length L is padded to Lp = ceil(L / 2c) * 2c and cut into 2c pieces; rank r's
    shard is, for every document in turn, its piece r then its piece 2c-1-r.

    Args:
        cu_seqlens: int `[num_docs + 1]`, cumulative document ends starting at 0.
        num_ranks: the ring size c.

    Returns:
        int64 `[sum Lp]`: rank r's shard is the r-th of c equal contiguous parts.
    """
    if not isinstance(num_ranks, int) or num_ranks < 1:
        raise ValueError(f"varlen_zigzag_indices: num_ranks={num_ranks!r} must be a positive int.")
    lengths = _doc_lengths(cu_seqlens)
    two_c = 2 * num_ranks
    per_rank = [[] for _ in range(num_ranks)]
    start = 0
    for length in lengths:
        padded = -(-length // two_c) * two_c
        pos = torch.full((padded,), -1, dtype=torch.int64)
        pos[:length] = torch.arange(start, start + length)
        pieces = pos.view(two_c, -1)
        for r in range(num_ranks):
            per_rank[r] += [pieces[r], pieces[two_c - 1 - r]]
        start += length
    return torch.cat([torch.cat(p) if p else torch.zeros(0, dtype=torch.int64) for p in per_rank])


def varlen_zigzag_shard(x: torch.Tensor, cu_seqlens, num_ranks: int, dim: int = 1, pad_value=0) -> torch.Tensor:
    """Put packed documents in per-document zigzag order, inserting `pad_value` in pad slots."""
    idx = varlen_zigzag_indices(cu_seqlens, num_ranks).to(x.device)
    out = x.index_select(dim, idx.clamp(min=0))
    shape = [1] * x.dim()
    shape[dim] = idx.numel()
    return torch.where((idx >= 0).view(shape), out, torch.as_tensor(pad_value, dtype=x.dtype, device=x.device))


def varlen_zigzag_unshard(x: torch.Tensor, cu_seqlens, num_ranks: int, dim: int = 1) -> torch.Tensor:
    """Undo `varlen_zigzag_shard`: drop pad slots and restore the packed order (length cu_seqlens[-1])."""
    idx = varlen_zigzag_indices(cu_seqlens, num_ranks).to(x.device)
    keep = torch.nonzero(idx >= 0).flatten()
    order = keep[torch.argsort(idx[keep])]
    return x.index_select(dim, order)


def layout_positions(layout: str, seq_len: int, num_ranks: int, cu_seqlens=None) -> torch.Tensor:
    """Original token positions held by each rank, `[c, s/c]` (-1 = padding).

    Args:
        layout: "zigzag" or "contiguous".
        seq_len: the global (padded, for varlen zigzag) sequence length.
        num_ranks: c.
        cu_seqlens: packed documents; with "zigzag" the per-document layout is used.
    """
    if layout == "contiguous":
        pos = torch.arange(seq_len)
    elif cu_seqlens is not None:
        pos = varlen_zigzag_indices(cu_seqlens, num_ranks)
        if pos.numel() != seq_len:
            raise ValueError(
                f"ring_attention: with cu_seqlens and layout='zigzag' the sequence must be the per-document "
                f"padded zigzag layout of length {pos.numel()} (c={num_ranks}); got {seq_len}. Build it with "
                f"varlen_zigzag_shard(x, cu_seqlens, {num_ranks})."
            )
    else:
        pos = zigzag_indices(seq_len, num_ranks)
    return pos.view(num_ranks, -1)
