"""Ulysses context parallelism (DeepSpeed-Ulysses, arXiv 2309.14509; FEATURES.md 10, 11, 14).

The sequence is split over the cp axis everywhere except inside attention. There, one all-to-all
per tensor trades the split: q, k, v go from `[b, s/c, h, d]` (sequence split) to `[b, s, h/c, d]`
(heads split), every rank runs ordinary attention on the full sequence for its heads, and one
all-to-all brings the output back. The backward of each all-to-all is the all-to-all with the two
dims swapped, so 4 forward and 4 backward all-to-alls move 8(c-1)/c^2 bsh per rank (PERF.md 2.3).

* GQA: when the k/v heads g do not split evenly over c, k and v are repeated on the head dim
  (`repeat_interleave` by lcm(g, c)/g) so every rank gets the k/v heads its q heads use; autograd
  sums the copies' gradients. `kv_comm="all_gather"` instead gathers k, v along the sequence
  (no repeat; backward is a reduce-scatter) and picks the heads each rank needs.
* Unaligned (FEATURES.md 11): with `uneven=True` the sequence length and the head count need not
  divide c; both split by `tensor_split` sizes (first ranks one larger) and the exchange is
  `uneven_all_to_all`: pad every block to the largest, one equal all-to-all, trim. That is
  gloo-safe (gloo rejects list all-to-alls of unequal sizes; FEATURES.md 0.1).
* KV cache (FEATURES.md 14): `kv_cache=True` saves the small pre-communication k, v and redoes
  their exchange in backward instead of keeping the exchanged (c-times repeated or gathered) copies.
* EOD reset (FEATURES.md 55): with `cu_seqlens` the local attention uses the block-diagonal
  document mask on the regathered (contiguous) sequence.
"""
from __future__ import annotations

import math
from fractions import Fraction

import attrs
import torch
from einops import rearrange

from shardfn import context
from shardfn.primitives.block_attention import (
    block_backward,
    block_forward,
    default_scale,
    document_keep,
    lift_common,
    local_attention,
)
from shardfn.primitives.collectives import all_gather, all_gather_invariant, all_to_all, pvary
from shardfn.primitives.ring_attention import check_qkv, check_unsupported
from shardfn.primitives.rules import _all_gather, _all_to_all, _axes, _index, _reduce_scatter, _size, _suspended
from shardfn.primitives.uneven import split_sizes
from shardfn.vma import set_vma

__all__ = [
    "ulysses_attention",
    "uneven_all_to_all",
    "split_uneven",
    "gather_uneven",
    "kv_repeat_factor",
    "ulysses_bytes",
]

_KV_COMMS = ("all_to_all", "all_gather")


def kv_repeat_factor(num_kv_heads: int, axis_size: int) -> int:
    """How many times Ulysses repeats each k/v head so the k/v heads split over the axis: lcm(g, c) / g."""
    return math.lcm(num_kv_heads, axis_size) // num_kv_heads


def _pad_dim(x, dim, size):
    extra = size - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim)


def uneven_all_to_all(x, axis_name, split_dim: int, concat_dim: int, split_sizes_, concat_sizes):
    """all_to_all with `tensor_split`-style uneven blocks, gloo-safe (pad to the largest, exchange, trim).

    Device j sends block i of `split_dim` (size split_sizes_[i]) to device i and concatenates the
    blocks it receives along `concat_dim`, where device i's block has concat_sizes[i] entries.

    Args:
        x: local tensor with `x.shape[split_dim] == sum(split_sizes_)` and
            `x.shape[concat_dim] == concat_sizes[me]`.
        axis_name: mesh axis (or tuple).
        split_dim, concat_dim: distinct dims.
        split_sizes_, concat_sizes: per-device sizes (length = axis size).

    Returns:
        `[..., split_sizes_[me] at split_dim, sum(concat_sizes) at concat_dim, ...]`. Applying it again
        with the dims and size lists swapped is the identity. Transpose: that swapped call.
    """
    ctx = context.require("uneven_all_to_all")
    axes = _axes(axis_name, ctx, "uneven_all_to_all")
    n, me = _size(ctx, axes), _index(ctx, axes)
    split_dim, concat_dim = split_dim % x.dim(), concat_dim % x.dim()
    if split_dim == concat_dim:
        raise ValueError("uneven_all_to_all: split_dim and concat_dim must differ.")
    split_sizes_, concat_sizes = [int(a) for a in split_sizes_], [int(a) for a in concat_sizes]
    if len(split_sizes_) != n or len(concat_sizes) != n:
        raise ValueError(
            f"uneven_all_to_all: split_sizes {split_sizes_} and concat_sizes {concat_sizes} need one entry per "
            f"device of {axes} (size {n})."
        )
    if x.shape[split_dim] != sum(split_sizes_) or x.shape[concat_dim] != concat_sizes[me]:
        raise ValueError(
            f"uneven_all_to_all: device {me} holds shape {tuple(x.shape)}; expected dim {split_dim} = "
            f"sum(split_sizes) = {sum(split_sizes_)} and dim {concat_dim} = concat_sizes[{me}] = {concat_sizes[me]}."
        )
    if len(set(split_sizes_)) == 1 and len(set(concat_sizes)) == 1:
        return all_to_all(x, axes, split_dim, concat_dim, tiled=True)
    smax, cmax = max(split_sizes_), max(concat_sizes)
    blocks = [_pad_dim(blk, split_dim, smax) for blk in torch.split(x, split_sizes_, dim=split_dim)]
    padded = _pad_dim(torch.cat(blocks, split_dim), concat_dim, cmax)
    y = all_to_all(padded, axes, split_dim, concat_dim, tiled=True)
    parts = [p.narrow(concat_dim, 0, concat_sizes[j]) for j, p in enumerate(torch.split(y, cmax, dim=concat_dim))]
    return torch.cat(parts, concat_dim).narrow(split_dim, 0, split_sizes_[me])


def split_uneven(x, axis_name, dim: int = 1):
    """This device's `tensor_split` block of a value every device holds in full (inside shard_map).

    The result varies over `axis_name`; the gradient of x is summed over the axis (pvary), so a
    replicated input gets the full gradient.
    """
    ctx = context.require("split_uneven")
    axes = _axes(axis_name, ctx, "split_uneven")
    n, me = _size(ctx, axes), _index(ctx, axes)
    sizes = split_sizes(x.shape[dim], n)
    return pvary(x, axes).narrow(dim, sum(sizes[:me]), sizes[me])


def gather_uneven(x, axis_name, dim: int, total: int):
    """Concatenate `tensor_split` blocks of a length-`total` dim from every device (pad, all_gather, trim).

    The result is invariant over `axis_name` (all_gather_invariant); its transpose takes this
    device's block of the cotangent.
    """
    ctx = context.require("gather_uneven")
    axes = _axes(axis_name, ctx, "gather_uneven")
    n = _size(ctx, axes)
    sizes = split_sizes(total, n)
    big = max(sizes)
    y = all_gather_invariant(_pad_dim(x, dim, big), axes, dim=dim, tiled=True)
    return torch.cat([p.narrow(dim, 0, sizes[j]) for j, p in enumerate(torch.split(y, big, dim=dim))], dim)


def _gather_seq(x, axes, seq_sizes):
    """all_gather along the sequence (dim 1), uneven blocks padded; varying result (transpose: psum_scatter)."""
    if len(set(seq_sizes)) == 1:
        return all_gather(x, axes, dim=1, tiled=True)
    big = max(seq_sizes)
    y = all_gather(_pad_dim(x, 1, big), axes, dim=1, tiled=True)
    return torch.cat([p.narrow(1, 0, seq_sizes[j]) for j, p in enumerate(torch.split(y, big, dim=1))], 1)


def _kv_head_select(h, g, q_start, q_count):
    """(start, count) of k/v heads serving q heads [q_start, q_start+q_count) with a uniform group, else indices."""
    ids = [(q * g) // h for q in range(q_start, q_start + q_count)]
    first, count = ids[0], ids[-1] - ids[0] + 1
    if q_count % count == 0 and ids == [first + i // (q_count // count) for i in range(q_count)]:
        return (first, count)
    return torch.tensor(ids, dtype=torch.int64)


@attrs.frozen
class _Layout:
    """How one Ulysses call splits heads and sequence over the axis (static per call)."""

    axes: tuple
    size: int
    index: int
    seq_sizes: tuple  # local sequence length of each device
    head_sizes: tuple  # q heads of each device after the exchange
    kv_repeat: int  # repeat_interleave factor applied to k/v before the exchange (1 = none)
    kv_head_sizes: tuple  # k/v heads of each device after the exchange (all_to_all mode)


def _plan(api, ctx, axes, q, k, seq_len, uneven, kv_comm):
    c, me = _size(ctx, axes), _index(ctx, axes)
    h, g = q.shape[2], k.shape[2]
    s_local = q.shape[1]
    if seq_len is None:
        seq_len = s_local * c
        if uneven:
            raise ValueError(f"{api}: uneven=True needs seq_len, the global sequence length (MindSpeed's gather_size).")
    seq_sizes = tuple(split_sizes(seq_len, c))
    if seq_len % c and not uneven:
        raise ValueError(
            f"{api}: the sequence length {seq_len} is not divisible by the size {c} of {axes}. Pass uneven=True "
            f"(tensor_split sizes, first ranks one longer) or pad the sequence to a multiple of {c}."
        )
    if s_local != seq_sizes[me]:
        raise ValueError(
            f"{api}: device {me} of {axes} holds {s_local} tokens, but seq_len={seq_len} split over {c} devices "
            f"gives it {seq_sizes[me]} (tensor_split sizes {list(seq_sizes)}). Split the sequence with "
            f"split_uneven(x, {axes!r}, dim=1) or pass the right seq_len."
        )
    if h % c and not uneven:
        raise ValueError(
            f"{api}: {h} query heads do not split over the size {c} of {axes} (aligned Ulysses needs heads % {c} "
            f"== 0). Use a head count divisible by {c}, pass uneven=True for tensor_split head sizes, or use "
            f"ring or hybrid attention."
        )
    if h < c:
        raise ValueError(
            f"{api}: {h} query heads over the {c} devices of {axes} leave some devices without a head; Ulysses "
            f"needs at least one head per device. Use ring or hybrid attention, or at most {h} Ulysses devices."
        )
    if h % c == 0:
        repeat = 1 if (g % c == 0 or kv_comm == "all_gather") else kv_repeat_factor(g, c)
        head_sizes = (h // c,) * c
        kv_heads = (g * repeat // c,) * c
    else:
        if kv_comm == "all_gather":
            repeat = 1
        else:
            repeat = h // g  # unaligned heads: give k/v the q head count and split both alike
        head_sizes = tuple(split_sizes(h, c))
        kv_heads = head_sizes
    return _Layout(axes, c, me, seq_sizes, head_sizes, repeat, kv_heads)


def _to_heads(x, lay, head_sizes):
    """`[b, s_loc, H, d]` -> `[b, s, H_me, d]`."""
    return uneven_all_to_all(x, lay.axes, 2, 1, head_sizes, lay.seq_sizes)


def _to_seq(x, lay, head_sizes):
    """`[b, s, H_me, d]` -> `[b, s_loc, H, d]`."""
    return uneven_all_to_all(x, lay.axes, 1, 2, lay.seq_sizes, head_sizes)


def _gathered_kv(k, v, lay, h, g):
    """kv_comm='all_gather': full-sequence k, v restricted to the heads this rank's q heads use."""
    k = _gather_seq(k, lay.axes, lay.seq_sizes)
    v = _gather_seq(v, lay.axes, lay.seq_sizes)
    q_start = sum(lay.head_sizes[: lay.index])
    sel = _kv_head_select(h, g, q_start, lay.head_sizes[lay.index])
    if isinstance(sel, tuple):
        return k.narrow(2, *sel), v.narrow(2, *sel)
    return k.index_select(2, sel), v.index_select(2, sel)


def ulysses_attention(q, k, v, *, axis_name="cp", causal: bool = False, scale=None, seq_len: int | None = None,
                      uneven: bool = False, kv_comm: str = "all_to_all", kv_cache: bool = False, cu_seqlens=None,
                      mask=None, bias=None, dropout_p: float = 0.0, generator=None):
    """Attention over a sequence split on `axis_name`, by exchanging the sequence split for a head split.

    Args:
        q: local `[b, s_loc, h, d]` (contiguous sequence split).
        k, v: local `[b, s_loc, g, d]`, h a multiple of g.
        axis_name: the cp mesh axis (or tuple), size c.
        causal: causal attention.
        scale: default d ** -0.5.
        seq_len: the global sequence length (needed with uneven=True; default s_loc * c).
        uneven: allow a sequence length and head count not divisible by c (tensor_split sizes).
        kv_comm: "all_to_all" (repeat k/v heads where g does not split over c) or "all_gather"
            (gather k/v along the sequence, no repeat; FEATURES.md 14 AllGather-KV).
        kv_cache: keep only the pre-communication k, v and redo their exchange in backward.
        cu_seqlens: global cumulative document ends (EOD reset): attention stays within documents.
        mask, bias, dropout_p, generator: for `layers.attention` signature compatibility; anything
            but the defaults raises NotImplementedError.

    Returns:
        Local output `[b, s_loc, h, d]` equal to full-sequence attention. Bytes per rank: 4
        all-to-alls forward and 4 backward of (c-1)/c of the local tensor (PERF.md 2.3).

    Raises:
        ValueError: heads or sequence not divisible by c without uneven=True, or a shard whose
            length does not match seq_len.

    Example:
        >>> f = shard_map(lambda q, k, v: ulysses_attention(q, k, v, axis_name="cp", causal=True),
        ...               mesh=make_mesh((4,), ("cp",), backend="sim"), in_specs=P(None, "cp"),
        ...               out_specs=P(None, "cp"))
    """
    api = "ulysses_attention"
    check_unsupported(api, mask, bias, dropout_p, generator)
    h, g = check_qkv(api, q, k, v)
    if kv_comm not in _KV_COMMS:
        raise ValueError(f"{api}: kv_comm={kv_comm!r} must be one of {_KV_COMMS}.")
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"{api}: q and k/v must hold the same local sequence length; got {q.shape[1]} and {k.shape[1]}."
        )
    ctx = context.require(api)
    axes = _axes(axis_name, ctx, api)
    lay = _plan(api, ctx, axes, q, k, seq_len, uneven, kv_comm)
    total = sum(lay.seq_sizes)
    keep = None if cu_seqlens is None else document_keep(cu_seqlens, total, causal=causal, device=q.device)
    causal = bool(causal) and keep is None
    scale = default_scale(q.shape[-1], scale)
    q2 = _to_heads(q, lay, lay.head_sizes)  # [b, s, h_me, d]
    if kv_cache:
        if uneven and (len(set(lay.seq_sizes)) > 1 or len(set(lay.head_sizes)) > 1):
            raise NotImplementedError(
                f"{api}: kv_cache=True supports the aligned layout only (sequence {total} and heads {h} divisible "
                f"by {lay.size}); drop kv_cache or pad to a multiple of {lay.size}."
            )
        o2 = _cached_kv_attention(ctx, lay, q2, k, v, h, g, kv_comm, scale, keep, causal)
    else:
        if kv_comm == "all_gather":
            k2, v2 = _gathered_kv(k, v, lay, h, g)
        else:
            if lay.kv_repeat > 1:
                k = k.repeat_interleave(lay.kv_repeat, dim=2)
                v = v.repeat_interleave(lay.kv_repeat, dim=2)
            k2 = _to_heads(k, lay, lay.kv_head_sizes)
            v2 = _to_heads(v, lay, lay.kv_head_sizes)
        o2 = local_attention(q2, k2, v2, scale=scale, keep=keep, causal=causal)
    return _to_seq(o2, lay, lay.head_sizes)


# ---- Ulysses + KV cache: save pre-communication k, v and redo the exchange in backward -----------
@attrs.frozen
class _CachedPlan:
    lay: _Layout
    h: int
    g: int
    kv_comm: str
    scale: float
    keep: object
    causal: bool
    dc: object = attrs.field(eq=False)

    def exchange(self, t, phase):
        """k or v `[b, s/c, g, d]` -> the heads this rank needs `[b, s, g_me, d]` (no autograd)."""
        lay = self.lay
        if self.kv_comm == "all_gather":
            full = _all_gather(self.dc, phase, t.contiguous(), lay.axes, 1)
            sel = _kv_head_select(self.h, self.g, lay.index * lay.head_sizes[0], lay.head_sizes[0])
            return full.narrow(2, *sel) if isinstance(sel, tuple) else full.index_select(2, sel)
        if lay.kv_repeat > 1:
            t = t.repeat_interleave(lay.kv_repeat, dim=2)
        return _all_to_all(self.dc, phase, t.contiguous(), lay.axes, 2, 1)

    def exchange_transpose(self, gt, like):
        """Cotangent of `exchange`: back to `[b, s/c, g, d]`, repeated copies summed."""
        lay = self.lay
        if self.kv_comm == "all_gather":
            shape = (like.shape[0], like.shape[1] * lay.size, *like.shape[2:])
            full = torch.zeros(shape, dtype=gt.dtype, device=gt.device)
            sel = _kv_head_select(self.h, self.g, lay.index * lay.head_sizes[0], lay.head_sizes[0])
            if isinstance(sel, tuple):
                full.narrow(2, *sel).copy_(gt)
            else:
                full.index_add_(2, sel, gt)
            return _reduce_scatter(self.dc, "backward", full, lay.axes, 1)
        back = _all_to_all(self.dc, "backward", gt.contiguous(), lay.axes, 1, 2)
        if lay.kv_repeat > 1:
            back = rearrange(back, "b s (g r) d -> b s g r d", r=lay.kv_repeat).sum(3)
        return back


class _CachedKVAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q2, k, v, plan):
        k2, v2 = plan.exchange(k, "forward"), plan.exchange(v, "forward")
        out, lse = block_forward(q2, k2, v2, scale=plan.scale, keep=plan.keep, causal=plan.causal)
        ctx.plan = plan
        ctx.save_for_backward(q2, k, v, out, lse)  # k, v before the exchange: c times smaller
        return out.to(q2.dtype)

    @staticmethod
    def backward(ctx, dout):
        q2, k, v, out, lse = ctx.saved_tensors
        plan = ctx.plan
        k2, v2 = plan.exchange(k, "backward"), plan.exchange(v, "backward")
        dq, dk2, dv2 = block_backward(q2, k2, v2, dout, out, lse, scale=plan.scale, keep=plan.keep, causal=plan.causal)
        dk = plan.exchange_transpose(dk2.to(k.dtype), k)
        dv = plan.exchange_transpose(dv2.to(v.dtype), v)
        return dq.to(q2.dtype), dk, dv, None


def _cached_kv_attention(ctx, lay, q2, k, v, h, g, kv_comm, scale, keep, causal):
    plan = _CachedPlan(lay, h, g, kv_comm, scale, keep, causal, dc=ctx)
    (q2, k, v), union = lift_common(ctx, (q2, k, v), lay.axes)
    out = _suspended(ctx, _CachedKVAttention.apply, q2, k, v, plan)
    return set_vma(out, union) if ctx.check_vma else out


def ulysses_bytes(batch: int, seq_len: int, heads: int, kv_heads: int, head_dim: int, axis_size: int,
                  itemsize: int) -> Fraction:
    """Bytes one rank sends for one Ulysses attention, forward + backward (PERF.md 2.3 with GQA).

    2 * (c-1)/c * (q + k + v + o local bytes), with k/v repeated by `kv_repeat_factor` first.
    """
    c = axis_size
    g = kv_heads * (1 if kv_heads % c == 0 else kv_repeat_factor(kv_heads, c))
    local = batch * (seq_len // c) * head_dim * itemsize
    return Fraction(2 * (c - 1), c) * local * (2 * heads + 2 * g)
