"""Hybrid context parallelism, Ulysses x ring (USP, arXiv 2405.07719; FEATURES.md 13).

The cp ranks form a (ring, ulysses) grid: Ulysses groups are the u consecutive ranks of one ring
position (meant to share a node), ring groups are strided by u. The data permutation combines the
two: zigzag the sequence over the ring degree r (2r chunks; ring rank i gets chunks i and 2r-1-i),
then split contiguously over (ring, ulysses). In attention a Ulysses all-to-all regathers each
ring rank's two chunks and splits the heads by u, ring attention runs over the ring axis on that
`[2, s/(2r)]` layout, and the reverse all-to-all restores the sequence split. Double ring and the KV
cache apply inside the ring axis. Bytes per rank: [8(u-1)/u + 6(r-1)] bsh/(u r) (PERF.md 2.3).
"""
from __future__ import annotations

from fractions import Fraction

import torch

from shardfn import context
from shardfn.primitives.collectives import all_to_all
from shardfn.primitives.rules import _axes, _size
from shardfn.primitives.ring_attention import check_qkv, check_unsupported, ring_attention, ring_bytes
from shardfn.primitives.ulysses import kv_repeat_factor, ulysses_bytes
from shardfn.primitives.zigzag import zigzag_shard, zigzag_unshard

__all__ = ["hybrid_attention", "hybrid_groups", "hybrid_shard", "hybrid_unshard", "hybrid_bytes"]


def hybrid_groups(ulysses_size: int, ring_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(Ulysses groups, ring groups) as lists of cp ranks, cp rank = ring_index * u + ulysses_index.

    Example:
        >>> hybrid_groups(2, 2)
        ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    """
    u, r = ulysses_size, ring_size
    return [[i * u + j for j in range(u)] for i in range(r)], [[i * u + j for i in range(r)] for j in range(u)]


def hybrid_shard(x: torch.Tensor, ring_size: int, dim: int = 1, layout: str = "zigzag") -> torch.Tensor:
    """The combined permutation: zigzag over the ring degree; then split dim with P(..., (ring, ulysses))."""
    return zigzag_shard(x, ring_size, dim) if layout == "zigzag" else x


def hybrid_unshard(x: torch.Tensor, ring_size: int, dim: int = 1, layout: str = "zigzag") -> torch.Tensor:
    """Undo `hybrid_shard`."""
    return zigzag_unshard(x, ring_size, dim) if layout == "zigzag" else x


def hybrid_attention(q, k, v, *, ulysses_axis="ulysses", ring_axis="ring", causal: bool = True,
                     layout: str = "zigzag", scale=None, window_size: int | None = None,
                     kv_cache: str | None = None, cu_seqlens=None, mask=None, bias=None,
                     dropout_p: float = 0.0, generator=None):
    """Ulysses over `ulysses_axis` around ring attention over `ring_axis`.

    Args:
        q: local `[b, s/(u r), h, d]`, the sequence permuted by `hybrid_shard` and split over
            (ring_axis, ulysses_axis).
        k, v: local `[b, s/(u r), g, d]`.
        ulysses_axis, ring_axis: mesh axes (u and r devices).
        causal, layout, scale, window_size, kv_cache, cu_seqlens: as in `ring_attention` (on the
            ring axis). With cu_seqlens and "zigzag", permute with `varlen_zigzag_shard(x, cu, r)`.
        mask, bias, dropout_p, generator: signature compatibility; non-defaults raise NotImplementedError.

    Returns:
        Local output `[b, s/(u r), h, d]` equal to full-sequence attention.

    Raises:
        ValueError: h not divisible by u (use ring attention or fewer Ulysses ranks).
    """
    api = "hybrid_attention"
    check_unsupported(api, mask, bias, dropout_p, generator)
    h, g = check_qkv(api, q, k, v)
    ctx = context.require(api)
    uax = _axes(ulysses_axis, ctx, api)
    rax = _axes(ring_axis, ctx, api)
    if set(uax) & set(rax):
        raise ValueError(f"{api}: ulysses_axis {uax} and ring_axis {rax} must be different mesh axes.")
    u = _size(ctx, uax)
    if h % u:
        raise ValueError(
            f"{api}: {h} query heads do not split over the Ulysses axis {uax} of size {u}. Use a Ulysses degree "
            f"dividing {h}, or put more of the cp degree on the ring axis."
        )
    if g % u:
        rep = kv_repeat_factor(g, u)
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    q2, k2, v2 = (all_to_all(t, uax, 2, 1, tiled=True) for t in (q, k, v))  # [b, s/r, h/u, d]
    o2 = ring_attention(q2, k2, v2, axis_name=rax, causal=causal, layout=layout, scale=scale,
                        window_size=window_size, kv_cache=kv_cache, cu_seqlens=cu_seqlens)
    return all_to_all(o2, uax, 1, 2, tiled=True)


def hybrid_bytes(batch: int, seq_len: int, heads: int, kv_heads: int, head_dim: int, ulysses_size: int,
                 ring_size: int, itemsize: int, kv_cache: str | None = None) -> Fraction:
    """Bytes one rank sends for one hybrid attention, forward + backward: [8(u-1)/u + 6(r-1)] bsh/P for MHA."""
    u, r = ulysses_size, ring_size
    g_after = kv_heads if kv_heads % u == 0 else kv_heads * kv_repeat_factor(kv_heads, u)
    uly = ulysses_bytes(batch, seq_len // r, heads, kv_heads, head_dim, u, itemsize)
    ring = ring_bytes(batch, seq_len, g_after // u, head_dim, r, itemsize, kv_cache)
    return uly + ring
