"""Attention on one (q block, kv block) pair with its log-sum-exp, the LSE merge rule, and the block backward.

Context parallelism splits one attention over many key/value blocks. Each block gives a partial
output `o_i` and the log-sum-exp `lse_i` of its scores; the exact result is

    lse = log(sum_i exp(lse_i)),    o = sum_i exp(lse_i - lse) * o_i

which is the online-softmax rule of FEATURES.md 12 (`m = max(m1, m2)`, `l = l1 e^(m1-m) + l2 e^(m2-m)`,
`o = (o1 l1 e^(m1-m) + o2 l2 e^(m2-m)) / l`) written with `lse = m + log l`. The backward of a
block needs only the *final* output and LSE (FlashAttention-2's recomputation): with
`p = exp(s - lse)` and `D = rowsum(dO * O)` it gives the block's exact share of dq, dk, dv.

Everything here works in an accumulation dtype (float32, or float64 for float64 inputs; bf16
blocks are upcast so no partial result is rounded before the merge) on `[batch, seq, heads,
head_dim]` tensors. Two kernels, one semantics:

* unmasked and causal blocks on CPU run torch's flash kernel
  (`aten._scaled_dot_product_flash_attention_for_cpu`, which returns the LSE, and its backward,
  which takes the final output and LSE); k/v heads are repeated for it and their gradients summed;
* blocks with an explicit mask (packed documents) run the explicit formula, which views q as
  `[b, s, g, h/g, d]` for GQA and gives fully masked rows lse = -inf and output 0.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange, reduce

from shardfn import context
from shardfn.vma import set_vma, vma_of

__all__ = [
    "acc_dtype",
    "block_forward",
    "block_backward",
    "merge_attention",
    "lse_delta",
    "local_attention",
    "causal_keep",
    "document_keep",
    "lift_common",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype partial results are kept and merged in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(q, g):
    return rearrange(q, "b s (g r) d -> b s g r d", g=g)


def _scores(q, k, scale, keep):
    """Masked scores `[b, g, r, sq, sk]` in the accumulation dtype."""
    s = torch.einsum("bqgrd,bkgd->bgrqk", _grouped(q, k.shape[2]), k) * scale
    if keep is not None:
        s = s.masked_fill(~_broadcast_keep(keep), float("-inf"))
    return s


def _broadcast_keep(keep):
    # keep is [sq, sk] or [b, sq, sk]; scores are [b, g, r, sq, sk]
    return keep if keep.dim() == 2 else keep[:, None, None]


def _finite(lse):
    """lse with fully masked rows (-inf) replaced by 0, so exp(s - lse) gives 0 there, not nan."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros((), dtype=lse.dtype))


_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _use_flash(q, k, keep) -> bool:
    """torch's CPU flash kernel serves unmasked and causal blocks; explicit masks take the explicit path.

    Empty blocks (an uneven split can leave a rank 0 tokens or 0 heads) also go explicit: the kernel
    divides by those sizes.
    """
    return keep is None and q.device.type == "cpu" and q.numel() > 0 and k.numel() > 0


def _heads_first(x, h):
    """`[b, s, g, d]` -> `[b, h, s, d]`, k/v heads repeated to h for the kernel (no GQA in it)."""
    x = rearrange(x, "b s g d -> b g s d")
    return x if x.shape[1] == h else x.repeat_interleave(h // x.shape[1], dim=1)


def block_forward(q, k, v, *, scale: float, keep: torch.Tensor | None = None, causal: bool = False):
    """Attention of a q block over one k/v block, with the LSE of the scores.

    Args:
        q: `[b, sq, h, d]`.
        k, v: `[b, sk, g, d]` with h a multiple of g.
        scale: the score scale (usually d ** -0.5).
        keep: optional bool mask `[sq, sk]` or `[b, sq, sk]`, True = attend.
        causal: the top-left causal mask (key j <= query i), without materialising it.

    Returns:
        (out `[b, sq, h, d]`, lse `[b, h, sq]`), both in `acc_dtype(q.dtype)`. A row that keeps no
        key has lse = -inf and out = 0, which the merge rule treats as "no contribution".
        Inputs are cast to the accumulation dtype first (bf16 blocks run in fp32), so partial
        outputs are never rounded before the merge.
    """
    dt = acc_dtype(q.dtype)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    h = q.shape[2]
    if _use_flash(q, k, keep):
        out, lse = _flash_fwd(rearrange(q, "b s h d -> b h s d"), _heads_first(k, h), _heads_first(v, h), 0.0,
                              bool(causal), scale=scale)
        return rearrange(out, "b h s d -> b s h d"), lse
    if causal:
        keep = causal_keep(q.shape[1], k.shape[1], device=q.device) if keep is None else keep & causal_keep(
            q.shape[1], k.shape[1], device=q.device)
    s = _scores(q, k, scale, keep)  # [b, g, r, sq, sk]
    lse = torch.logsumexp(s, dim=-1)  # [b, g, r, sq]
    p = torch.exp(s - _finite(lse)[..., None])
    out = torch.einsum("bgrqk,bkgd->bqgrd", p, v)
    return rearrange(out, "b q g r d -> b q (g r) d"), rearrange(lse, "b g r q -> b (g r) q")


def lse_delta(out, dout):
    """`D = rowsum(dO * O)` `[b, h, sq]` in the accumulation dtype (FlashAttention-2's backward term)."""
    dt = acc_dtype(out.dtype)
    return rearrange((dout.to(dt) * out.to(dt)).sum(-1), "b q h -> b h q")


def block_backward(q, k, v, dout, out, lse, *, scale: float, keep: torch.Tensor | None = None,
                   causal: bool = False, delta: torch.Tensor | None = None):
    """This block's exact share of (dq, dk, dv), given the final output and LSE.

    With `p = exp(s - lse)` and `D = rowsum(dO * O)` for the *final* O and lse (merged over all
    blocks), `dv = p^T dO`, `ds = p (dO v^T - D)`, `dq = ds k scale`, `dk = ds^T q scale`
    (FlashAttention-2's backward, applied per block).

    Args:
        q: `[b, sq, h, d]`; k, v: `[b, sk, g, d]`; dout: `[b, sq, h, d]`.
        out: the final output `[b, sq, h, d]` (accumulation dtype).
        lse: the final `[b, h, sq]`.
        scale, keep, causal: as in `block_forward`.
        delta: `lse_delta(out, dout)` if already computed (explicit path only).

    Returns:
        (dq `[b, sq, h, d]`, dk `[b, sk, g, d]`, dv `[b, sk, g, d]`) in the accumulation dtype.
    """
    dt = acc_dtype(q.dtype)
    q, k, v, dout = q.to(dt), k.to(dt), v.to(dt), dout.to(dt)
    h, g = q.shape[2], k.shape[2]
    if _use_flash(q, k, keep):
        heads_first = lambda x: rearrange(x, "b s h d -> b h s d").contiguous()  # noqa: E731
        dq, dk, dv = _flash_bwd(heads_first(dout), heads_first(q), _heads_first(k, h).contiguous(),
                                _heads_first(v, h).contiguous(), heads_first(out.to(dt)), lse.to(dt).contiguous(),
                                0.0, bool(causal), scale=scale)
        dq = rearrange(dq, "b h s d -> b s h d")
        dk = reduce(dk, "b (g r) s d -> b s g d", "sum", g=g)
        dv = reduce(dv, "b (g r) s d -> b s g d", "sum", g=g)
        return dq, dk, dv
    if causal:
        keep = causal_keep(q.shape[1], k.shape[1], device=q.device) if keep is None else keep & causal_keep(
            q.shape[1], k.shape[1], device=q.device)
    if delta is None:
        delta = lse_delta(out, dout)
    s = _scores(q, k, scale, keep)
    lse_g = rearrange(_finite(lse.to(dt)), "b (g r) q -> b g r q", g=g)
    p = torch.exp(s - lse_g[..., None])  # [b, g, r, sq, sk]
    do = _grouped(dout, g)
    dv = torch.einsum("bgrqk,bqgrd->bkgd", p, do)
    dp = torch.einsum("bqgrd,bkgd->bgrqk", do, v)
    ds = p * (dp - rearrange(delta.to(dt), "b (g r) q -> b g r q", g=g)[..., None])
    dq = torch.einsum("bgrqk,bkgd->bqgrd", ds, k) * scale
    dk = torch.einsum("bgrqk,bqgrd->bkgd", ds, _grouped(q, g)) * scale
    return rearrange(dq, "b q g r d -> b q (g r) d"), dk, dv


def merge_attention(out1, lse1, out2, lse2):
    """Merge two partial attentions over disjoint key sets (the online-softmax / LSE rule).

    Args:
        out1, out2: `[b, s, h, d]` partial outputs (each normalised over its own keys).
        lse1, lse2: `[b, h, s]` their log-sum-exps; -inf marks a row with no keys.

    Returns:
        (out, lse): attention over the union of the key sets, in the dtype of the inputs. Rows with
        no keys on either side stay (0, -inf).

    Example:
        >>> o, l = merge_attention(*block_forward(q, k[:, :4], v[:, :4], scale=s),
        ...                        *block_forward(q, k[:, 4:], v[:, 4:], scale=s))
    """
    lse = torch.logaddexp(lse1, lse2)
    safe = _finite(lse)
    w1 = torch.exp(lse1 - safe)  # 0 where lse1 = -inf
    w2 = torch.exp(lse2 - safe)
    w1 = rearrange(w1, "b h s -> b s h 1")
    w2 = rearrange(w2, "b h s -> b s h 1")
    return out1 * w1 + out2 * w2, lse


def default_scale(head_dim: int, scale: float | None) -> float:
    """`scale` or `1/sqrt(head_dim)`."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def causal_keep(s_q: int, s_k: int | None = None, device=None) -> torch.Tensor:
    """Bool `[s_q, s_k]`, True where key j <= query i (top-left aligned)."""
    return torch.ones(s_q, s_q if s_k is None else s_k, dtype=torch.bool, device=device).tril()


def document_keep(cu_seqlens, seq_len: int, *, causal: bool, device=None) -> torch.Tensor:
    """Bool `[s, s]` block-diagonal mask of packed documents (EOD reset); tokens past cu_seqlens[-1] see nothing."""
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int64, device=device)
    pos = torch.arange(seq_len, device=device)
    doc = torch.searchsorted(cu, pos, right=True) - 1
    valid = pos < cu[-1]
    keep = (doc[:, None] == doc[None, :]) & valid[:, None] & valid[None, :]
    if causal:
        keep &= pos[None, :] <= pos[:, None]
    return keep


class _LocalAttention(torch.autograd.Function):
    """Exact attention with an O(s^2) score matrix rebuilt in backward from the saved LSE."""

    @staticmethod
    def forward(ctx, q, k, v, scale, keep, causal):
        out, lse = block_forward(q, k, v, scale=scale, keep=keep, causal=causal)
        ctx.scale, ctx.keep, ctx.causal = scale, keep, causal
        ctx.save_for_backward(q, k, v, out, lse)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = block_backward(q, k, v, dout, out, lse, scale=ctx.scale, keep=ctx.keep, causal=ctx.causal)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def local_attention(q, k, v, *, scale: float | None = None, keep: torch.Tensor | None = None,
                    causal: bool = False) -> torch.Tensor:
    """Single-device attention `[b, s_q, h, d]` over `[b, s_k, g, d]` keys (GQA), fp32/float64 math.

    Works inside shard_map (operands are lifted to a common vma set first) and outside it.

    Args:
        q: `[b, s_q, h, d]`; k, v: `[b, s_k, g, d]`, h a multiple of g.
        scale: default d ** -0.5.
        keep: optional bool `[s_q, s_k]` or `[b, s_q, s_k]` mask, True = attend.
        causal: top-left causal mask (combined with keep when both are given).
    """
    scale = default_scale(q.shape[-1], scale)
    ctx = context.current()
    if ctx is None or not ctx.check_vma:
        return _LocalAttention.apply(q, k, v, scale, keep, causal)
    from shardfn.primitives.rules import _suspended

    (q, k, v), union = lift_common(ctx, (q, k, v))
    out = _suspended(ctx, _LocalAttention.apply, q, k, v, scale, keep, causal)
    return set_vma(out, union)


def lift_common(ctx, tensors, axes=()):
    """Lift tensors entering one custom autograd function to a common vma set (plus `axes`).

    shard_map's automatic pvary happens at torch ops; a `torch.autograd.Function` hides its
    operands from it, so its wrapper lifts them first: an operand invariant over an axis the
    others vary over goes through `pvary` (identity forward, psum of its gradient backward).

    Returns:
        (lifted tensors, the common vma set).
    """
    from shardfn.primitives.rules import _lift

    union = frozenset(axes).union(*(vma_of(t) for t in tensors))
    if not ctx.check_vma:
        return tuple(tensors), union
    ordered = tuple(a for a in ctx.mesh.axis_names if a in union)
    return tuple(_lift(t, ordered, ctx)[0] for t in tensors), union
