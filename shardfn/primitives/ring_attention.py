"""Ring attention (FEATURES.md 12), double ring (43) and the CP KV cache (14), as one autograd function.

Each rank holds a q, k, v shard of the sequence. K/V blocks travel the ring with `ppermute`; every
rank attends its q to each block as it passes and merges the partial results with the LSE rule
(`block_attention.merge_attention`, fp32 or float64). The backward uses the final output and LSE:
each rank recomputes its share of dq for every block, and the dK/dV accumulator of a block travels
the ring with it and arrives home after c-1 hops.

Causal masks:
  * layout "contiguous": rank i holds block i; block j < i is attended in full, j == i with the
    causal mask, j > i not at all.
  * layout "zigzag" (load balanced): rank i holds chunks i and 2c-1-i of 2c. Step kv_id == i is the
    causal diagonal; kv_id < i: both q chunks against the first kv chunk only; kv_id > i: only the
    second q chunk against both kv chunks -- always half a block pair, no mask.
  * packed documents (`cu_seqlens`): the mask of each block pair comes from the original positions
    and document ids of its tokens (`zigzag.layout_positions`); pads (position -1) are dropped.

Double ring (LoongTrain, arXiv 2406.18485): with `window_size=w` the ring of c ranks is cut into c/w
windows of w consecutive ranks. K/V rotate w-1 times inside the window (inner ring), then the block
that entered the window jumps one window ahead (outer ring, stride w). In backward dK/dV first go
home within the window (inner ring), then the window-partial sums travel the outer ring (stride w)
to the owner. Bytes equal the single ring: c-1 K/V hops forward, c-1 K/V and c-1 dK/dV hops back.

KV cache: `kv_cache="full"` keeps every K/V block seen in forward, so backward only moves dK/dV
(bytes 4(c-1)/c bsh instead of 6(c-1)/c); "half" keeps K and re-circulates V (5(c-1)/c). Results are
bitwise equal to the run without the cache.
"""
from __future__ import annotations

import attrs
import torch

from shardfn import context
from shardfn.primitives.block_attention import (
    acc_dtype,
    block_backward,
    block_forward,
    default_scale,
    lift_common,
    lse_delta,
    merge_attention,
)
from shardfn.primitives.rules import _axes, _index, _permute, _size, _suspended
from shardfn.primitives.zigzag import layout_positions
from shardfn.layers.core_attention import _check_qkv
from shardfn.vma import set_vma

__all__ = [
    "ring_attention",
    "double_ring_groups",
    "ring_visit_order",
    "kv_cache_policy_for_layer",
    "ring_bytes",
    "check_qkv",
]

_LAYOUTS = ("zigzag", "contiguous")
_CACHES = (None, "full", "half")


def ring_visit_order(index: int, ring_size: int, window_size: int) -> list[int]:
    """The kv block ids rank `index` attends to, in order (outer step major, inner step minor).

    Block at (outer o, inner t) = ((k - o) mod c/w) * w + (p - t) mod w for rank index = k*w + p.
    """
    c, w = ring_size, window_size
    k, p = divmod(index, w)
    nw = c // w
    return [((k - o) % nw) * w + (p - t) % w for o in range(nw) for t in range(w)]


def double_ring_groups(ring_size: int, window_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(inner rings, outer rings) as lists of ring indices (FEATURES.md 43 table).

    Inner ring k is ranks [k*w, (k+1)*w); outer ring j is ranks j, j+w, j+2w, ...
    """
    c, w = ring_size, window_size
    _check_window("double_ring_groups", c, w)
    inner = [list(range(k * w, (k + 1) * w)) for k in range(c // w)]
    outer = [list(range(j, c, w)) for j in range(w)]
    return inner, outer


def kv_cache_policy_for_layer(layer: int, policy: str | None, interval: int = 0) -> str | None:
    """The KV-cache policy of 1-based layer `layer` under `--context-parallel-cache-interval`.

    interval 0 caches every layer; interval k > 0 caches layer l only when l % (k + 1) == 1.
    """
    if policy not in _CACHES:
        raise ValueError(f"kv_cache_policy_for_layer: policy={policy!r} must be one of {_CACHES}.")
    if not isinstance(interval, int) or interval < 0:
        raise ValueError(f"kv_cache_policy_for_layer: interval={interval!r} must be an int >= 0.")
    if not isinstance(layer, int) or layer < 1:
        raise ValueError(f"kv_cache_policy_for_layer: layer={layer!r} is 1-based; pass an int >= 1.")
    if policy is None or interval == 0:
        return policy
    return policy if layer % (interval + 1) == 1 else None


def _check_window(api, c, w):
    if not isinstance(w, int) or w < 1 or c % w:
        raise ValueError(
            f"{api}: window_size={w!r} must be a positive divisor of the ring size {c} "
            f"(1 or {c} = a single ring). Pick one of {[d for d in range(1, c + 1) if c % d == 0]}."
        )


@attrs.frozen
class _Plan:
    """Static description of one ring attention call on one rank."""

    axes: tuple
    ring_size: int
    index: int
    window: int
    causal: bool
    layout: str
    scale: float
    kv_cache: str | None
    positions: torch.Tensor | None  # [c, s_local] original positions (-1 = pad), masks only
    docs: torch.Tensor | None  # [c, s_local] document ids
    dc: object = attrs.field(eq=False)

    # ---- communication: the inner ring (within a window) and the outer ring (stride w) ---------
    def _perm(self, outer):
        c, w = self.ring_size, self.window
        if outer:
            return tuple((r, (r + w) % c) for r in range(c))
        return tuple((r, (r // w) * w + (r % w + 1) % w) for r in range(c))

    def send(self, x, outer, phase):
        return _permute(self.dc, phase, x.contiguous(), self.axes, self._perm(outer))

    # ---- the block pairs of one step ----------------------------------------------------------
    def terms(self, kv_id, s_local, device):
        """[(q slice, kv slice, keep mask or None, causal)] to compute for kv block `kv_id`."""
        full = slice(None)
        i = self.index
        if self.positions is not None:
            keep = self._mask(i, kv_id, device)
            return [(full, full, keep, False)] if bool(keep.any()) else []
        if not self.causal:
            return [(full, full, None, False)]
        if self.layout == "contiguous":
            if kv_id < i:
                return [(full, full, None, False)]
            return [(full, full, None, True)] if kv_id == i else []
        half = s_local // 2
        if kv_id == i:
            return [(full, full, None, True)]
        if kv_id < i:
            return [(full, slice(0, half), None, False)]
        return [(slice(half, None), full, None, False)]

    def _mask(self, qi, ki, device):
        pq, pk = self.positions[qi].to(device), self.positions[ki].to(device)
        dq, dk = self.docs[qi].to(device), self.docs[ki].to(device)
        keep = (dq[:, None] == dk[None, :]) & (pq[:, None] >= 0) & (pk[None, :] >= 0)
        if self.causal:
            keep &= pk[None, :] <= pq[:, None]
        return keep

    def visits(self):
        """(outer step, inner step, kv block id) in visiting order."""
        order = ring_visit_order(self.index, self.ring_size, self.window)
        w = self.window
        return [(n // w, n % w, kv) for n, kv in enumerate(order)]


def _forward(plan, q, k, v):
    b, s, h, d = q.shape
    dt = acc_dtype(q.dtype)
    out = torch.zeros(b, s, h, d, dtype=dt, device=q.device)
    lse = torch.full((b, h, s), float("-inf"), dtype=dt, device=q.device)
    cached = []
    outer_k, outer_v = k, v
    cur_k, cur_v = k, v
    for o, t, kv_id in plan.visits():
        if t == 0:
            if o > 0:
                outer_k = plan.send(outer_k, True, "forward")
                outer_v = plan.send(outer_v, True, "forward")
            cur_k, cur_v = outer_k, outer_v
        else:
            cur_k = plan.send(cur_k, False, "forward")
            cur_v = plan.send(cur_v, False, "forward")
        if plan.kv_cache == "full":
            cached += [cur_k, cur_v]
        elif plan.kv_cache == "half":
            cached.append(cur_k)
        for qs, ks, keep, causal in plan.terms(kv_id, s, q.device):
            ob, lb = block_forward(q[:, qs], cur_k[:, ks], cur_v[:, ks], scale=plan.scale, keep=keep, causal=causal)
            out[:, qs], lse[:, :, qs] = merge_attention(out[:, qs], lse[:, :, qs], ob, lb)
    return out, lse, cached


def _backward(plan, q, k, v, out, lse, dout, cached):
    s = q.shape[1]
    dt = acc_dtype(q.dtype)
    delta = lse_delta(out, dout)
    dq = torch.zeros(q.shape, dtype=dt, device=q.device)
    zeros_kv = torch.zeros(k.shape, dtype=dt, device=k.device)
    w, nw = plan.window, plan.ring_size // plan.window
    cache = iter(cached)
    outer_k, outer_v = k, v
    cur_k, cur_v = k, v
    home = inner_recv = outer_recv = own = None
    for o, t, kv_id in plan.visits():
        # the K/V block of this step: from the cache, or re-circulated exactly as in forward
        if t == 0 and o > 0 and plan.kv_cache is None:
            outer_k = plan.send(outer_k, True, "backward")
        if t == 0 and o > 0 and plan.kv_cache != "full":
            outer_v = plan.send(outer_v, True, "backward")
        if t == 0:
            cur_k, cur_v = outer_k, outer_v
        else:
            if plan.kv_cache is None:
                cur_k = plan.send(cur_k, False, "backward")
            if plan.kv_cache != "full":
                cur_v = plan.send(cur_v, False, "backward")
        if plan.kv_cache == "full":
            cur_k, cur_v = next(cache), next(cache)
        elif plan.kv_cache == "half":
            cur_k = next(cache)
        dk_b, dv_b = zeros_kv.clone(), zeros_kv.clone()
        for qs, ks, keep, causal in plan.terms(kv_id, s, q.device):
            gq, gk, gv = block_backward(
                q[:, qs], cur_k[:, ks], cur_v[:, ks], dout[:, qs], out[:, qs], lse[:, :, qs],
                scale=plan.scale, keep=keep, causal=causal, delta=delta[:, :, qs],
            )
            dq[:, qs] += gq
            dk_b[:, ks] += gk
            dv_b[:, ks] += gv
        # dK/dV of this block: home within the window (inner ring) ...
        if t == 0:
            own = (dk_b, dv_b)
        else:
            acc = (dk_b, dv_b) if t == 1 else (inner_recv[0] + dk_b, inner_recv[1] + dv_b)
            inner_recv = (plan.send(acc[0], False, "backward"), plan.send(acc[1], False, "backward"))
        if t == w - 1:
            win = own if w == 1 else (own[0] + inner_recv[0], own[1] + inner_recv[1])
            # ... then the window sums travel the outer ring (stride w) to the block's owner
            if o == 0:
                home = win
            else:
                acc = win if o == 1 else (outer_recv[0] + win[0], outer_recv[1] + win[1])
                outer_recv = (plan.send(acc[0], True, "backward"), plan.send(acc[1], True, "backward"))
    dk, dv = home
    if nw > 1:
        dk, dv = dk + outer_recv[0], dv + outer_recv[1]
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan):
        out, lse, cached = _forward(plan, q, k, v)
        ctx.plan = plan
        ctx.num_cached = len(cached)
        ctx.save_for_backward(q, k, v, out, lse, *cached)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *cached = ctx.saved_tensors
        dq, dk, dv = _backward(ctx.plan, q, k, v, out, lse, dout, cached)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def check_qkv(api, q, k, v):
    """Validate `[b, s, h, d]` q and `[b, s_kv, g, d]` k, v with h a multiple of g; return (h, g)."""
    return _check_qkv(api, q, k, v)


def check_unsupported(api, mask, bias, dropout_p, generator):
    """Reject the attention options the CP functions document as unsupported."""
    if mask is not None or bias is not None or dropout_p or generator is not None:
        raise NotImplementedError(
            f"{api}: extra masks, biases (ALiBi) and attention dropout are not supported under context "
            f"parallelism (got mask={type(mask).__name__}, bias={type(bias).__name__}, dropout_p={dropout_p}). "
            f"Use causal=True/False, or cu_seqlens for packed documents."
        )


def ring_attention(q, k, v, *, axis_name="cp", causal: bool = True, layout: str = "zigzag", scale=None,
                   window_size: int | None = None, kv_cache: str | None = None, cu_seqlens=None,
                   mask=None, bias=None, dropout_p: float = 0.0, generator=None):
    """Attention over a sequence split on `axis_name`, K/V blocks passed around the ring.

    Args:
        q: local `[b, s/c, h, d]` (in `layout` order: see `zigzag_shard`).
        k, v: local `[b, s/c, g, d]`, h a multiple of g (GQA).
        axis_name: the ring's mesh axis or tuple of axes (first major), size c.
        causal: causal attention in the original token order.
        layout: "zigzag" (rank i holds chunks i and 2c-1-i; load balanced) or "contiguous".
        scale: score scale, default d ** -0.5.
        window_size: double ring window w (divides c); None or c = one ring. With a 2-axis mesh
            (outer, inner), pass axis_name=(outer, inner) and window_size=size(inner).
        kv_cache: None, "full" or "half" (FEATURES.md 14).
        cu_seqlens: int `[docs + 1]` global cumulative document ends: attention stays within
            documents (EOD reset). With "zigzag" the sequence must be in the per-document padded
            layout of `varlen_zigzag_shard`; with "contiguous" in plain packed order.
        mask, bias, dropout_p, generator: accepted for signature compatibility with
            `layers.attention`; anything but the defaults raises NotImplementedError.

    Returns:
        Local output `[b, s/c, h, d]` equal to full-sequence attention (forward and backward).
        Partial results are merged in float32 (float64 for float64 inputs).

    Raises:
        ValueError: bad shapes, layout, window, or a zigzag shard of odd length.

    Example:
        >>> mesh = make_mesh((4,), ("cp",), backend="sim")
        >>> f = shard_map(lambda q, k, v: ring_attention(q, k, v, axis_name="cp"), mesh=mesh,
        ...               in_specs=P(None, "cp"), out_specs=P(None, "cp"))
        >>> out = zigzag_unshard(f(*(zigzag_shard(t, 4) for t in (q, k, v))), 4)
    """
    api = "ring_attention"
    check_unsupported(api, mask, bias, dropout_p, generator)
    check_qkv(api, q, k, v)
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"{api}: q and k/v must hold the same local sequence length; got {q.shape[1]} and {k.shape[1]}."
        )
    if layout not in _LAYOUTS:
        raise ValueError(f"{api}: layout={layout!r} must be one of {_LAYOUTS}.")
    if kv_cache not in _CACHES:
        raise ValueError(f"{api}: kv_cache={kv_cache!r} must be one of {_CACHES}.")
    ctx = context.require(api)
    axes = _axes(axis_name, ctx, api)
    c = _size(ctx, axes)
    w = c if window_size is None else window_size
    _check_window(api, c, w)
    s_local = q.shape[1]
    positions = docs = None
    if cu_seqlens is not None:
        positions = layout_positions(layout, s_local * c, c, cu_seqlens)
        cu = torch.as_tensor(cu_seqlens, dtype=torch.int64)
        positions = torch.where(positions < int(cu[-1]), positions, torch.full_like(positions, -1))
        docs = torch.searchsorted(cu, positions.clamp(min=0), right=True) - 1
    elif causal and layout == "zigzag" and s_local % 2:
        raise ValueError(
            f"{api}: layout='zigzag' gives each of the {c} ranks two of 2*{c} = {2 * c} chunks, so the local "
            f"sequence length must be even; got {s_local} (global {s_local * c}, not divisible by {2 * c}). "
            f"Pad the sequence to a multiple of {2 * c}, or use layout='contiguous'."
        )
    plan = _Plan(axes, c, _index(ctx, axes), w, bool(causal), layout, default_scale(q.shape[3], scale),
                 kv_cache, positions, docs, dc=ctx)
    (q, k, v), union = lift_common(ctx, (q, k, v), axes)
    out = _suspended(ctx, _RingAttention.apply, q, k, v, plan)
    return set_vma(out, union) if ctx.check_vma else out


def ring_bytes(batch: int, seq_len: int, kv_heads: int, head_dim: int, ring_size: int, itemsize: int,
               kv_cache: str | None = None) -> int:
    """Bytes one rank sends for one ring attention, forward + backward (PERF.md 2.3 with GQA).

    6(c-1) blocks of `[b, s/c, g, d]` without cache, 4(c-1) with "full", 5(c-1) with "half".
    """
    blocks = {None: 6, "full": 4, "half": 5}[kv_cache] * (ring_size - 1)
    return blocks * batch * (seq_len // ring_size) * kv_heads * head_dim * itemsize

