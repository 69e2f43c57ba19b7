"""Core attention: softmax(q k^T * scale + bias, masked) v on `[batch, seq, heads, head_dim]`.

Three paths, one semantics (FEATURES.md 30, 31, 36, 55):

* CPU flash kernel (``aten._scaled_dot_product_flash_attention_for_cpu``): the default on CPU.
  It returns the log-sum-exp and keeps O(s) memory for backward. Masks and biases go in as one
  additive float mask; GQA repeats k/v heads before the kernel.
* torch SDPA (``F.scaled_dot_product_attention``): the default elsewhere when no LSE is asked.
* explicit: the textbook formula in fp32 (float64 stays float64). Used for dropout (the flash
  kernel has none and SDPA takes no generator), for a bias that needs a gradient, and for the
  LSE off CPU. Public as ``explicit_attention``: it is the oracle and what the memory
  accounting of PERF.md 3.1 measures.

The LSE is differentiable on every path, so ring attention can merge partial results with
``lse = logsumexp(lse_i)``, ``out = sum_i exp(lse_i - lse) out_i`` and get exact gradients. On the
flash path the LSE gradient joins the kernel's backward: d lse_i / d s_ij = p_ij adds
``g_lse_i`` to every row of dP, which the kernel takes in by one extra zero head-dim column
(see ``_FlashCpu.backward``). For bf16 inputs that term is rounded to bf16 once.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from shardfn.layers.drop import keep_mask
from shardfn.layers.masks import CompressedCausal, causal_mask
from shardfn.layers.vma_align import align_vma

__all__ = ["attention", "explicit_attention", "varlen_attention"]

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _check_qkv(api: str, q, k, v) -> tuple[int, int]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{api}: {name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != 4:
            raise ValueError(
                f"{api}: {name} has shape {tuple(t.shape)}; expected 4 dims [batch, seq, heads, head_dim]."
                " Add a batch dim with x[None], or use varlen_attention for packed [tokens, heads, head_dim]."
            )
    if k.shape != v.shape:
        raise ValueError(f"{api}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape.")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"{api}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch (dim 0) and head_dim (dim 3)."
        )
    h, g = q.shape[2], k.shape[2]
    if g == 0 or h % g:
        raise ValueError(
            f"{api}: q has {h} heads and k/v have {g}; grouped-query attention needs q heads to be a"
            f" multiple of k/v heads. Use {h} k/v heads or a divisor of {h}."
        )
    return h, g


def _as_float_mask(api, mask, bias, causal, s_q, s_k, dtype, device):
    """Combine causal/mask/bias into one additive mask `[.., s_q, s_k]` (or None)."""
    add = None
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape[-2:] != (s_q, s_k):
            raise ValueError(
                f"{api}: bias must be a tensor ending in [s_q, s_k] = [{s_q}, {s_k}],"
                f" got {getattr(bias, 'shape', bias)}."
            )
        add = bias.to(dtype)
    keep = None
    if causal:
        keep = causal_mask(s_q, s_k, device=device)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                f"{api}: mask must be a bool tensor (True = keep) or CompressedCausal, got"
                f" {getattr(mask, 'dtype', type(mask).__name__)}. Convert a float mask to a bias= instead."
            )
        if mask.shape[-2:] != (s_q, s_k):
            raise ValueError(f"{api}: mask shape {tuple(mask.shape)} must end in [s_q, s_k] = [{s_q}, {s_k}].")
        keep = mask if keep is None else keep & mask
    if keep is not None:
        m = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, float("-inf"))
        add = m if add is None else add + m
    return add


def _split_mask(mask, causal):
    """A CompressedCausal mask means 'causal, kernel-generated'."""
    if isinstance(mask, CompressedCausal):
        return None, True
    return mask, causal


def explicit_attention(q, k, v, *, causal=False, mask=None, bias=None, scale=None, dropout_p=0.0,
                       generator=None, return_lse=False):
    """Attention written out op by op (QK^T, softmax, dropout, PV), computed in fp32.

    Same arguments and results as ``attention``. Saves the `[b, h, s_q, s_k]` probabilities for
    backward (no recomputation), which is what Korthikanti's activation formula counts.
    Rows that keep no key give output 0 and LSE -inf.
    """
    api = "explicit_attention"
    h, g = _check_qkv(api, q, k, v)
    mask, causal = _split_mask(mask, causal)
    s_q, s_k, d = q.shape[1], k.shape[1], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh = rearrange(q, "b s h d -> b h s d").to(cdtype)
    kh = repeat(k, "b s g d -> b (g r) s d", r=h // g).to(cdtype)
    vh = repeat(v, "b s g d -> b (g r) s d", r=h // g).to(cdtype)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [b, h, s_q, s_k]
    add = _as_float_mask(api, mask, bias, causal, s_q, s_k, cdtype, q.device)
    if add is not None:
        scores = scores + add
    if return_lse:
        lse = torch.logsumexp(scores, dim=-1)  # [b, h, s_q]
        safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
        probs = torch.exp(scores - safe[..., None])
    else:
        probs = torch.softmax(scores, dim=-1)
        if add is not None and bool(torch.isneginf(add).all(-1).any()):
            probs = torch.nan_to_num(probs, nan=0.0)  # rows that keep no key
    if dropout_p > 0.0:
        keep = keep_mask(probs, dropout_p, generator)
        probs = probs * (keep / (1.0 - dropout_p))
    out = torch.matmul(probs, vh)
    out = rearrange(out, "b h s d -> b s h d").to(q.dtype)
    if return_lse:
        return out, lse
    return out


class _FlashCpu(torch.autograd.Function):
    """CPU flash kernel with a differentiable log-sum-exp. Inputs `[b, h, s, d]`, equal heads."""

    @staticmethod
    def forward(ctx, q, k, v, add_mask, causal, scale):
        out, lse = _flash_fwd(q, k, v, 0.0, causal, attn_mask=add_mask, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, add_mask)
        ctx.causal, ctx.scale = causal, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, g_out, g_lse):
        q, k, v, out, lse, add_mask = ctx.saved_tensors
        if g_out is None:
            g_out = torch.zeros_like(out)
        if g_lse is None:
            dq, dk, dv = _flash_bwd(g_out.contiguous(), q, k, v, out, lse, 0.0, ctx.causal,
                                    attn_mask=add_mask, scale=ctx.scale)
            return dq, dk, dv, None, None, None
        # The kernel forms dS = P * (dO v^T - D) with D_i = <dO_i, out_i>. The LSE gradient adds
        # g_lse_i to dS/P. Append one head-dim column: q, k, v get 0 (scores and P unchanged),
        # dO gets 1 and out gets -g_lse, so D_i becomes D_i - g_lse_i and dO v^T is unchanged.
        pad = lambda t: F.pad(t, (0, 1))  # noqa: E731
        g_out2 = torch.cat([g_out, torch.ones_like(g_out[..., :1])], dim=-1).contiguous()
        out2 = torch.cat([out, -g_lse[..., None].to(out.dtype)], dim=-1)
        dq, dk, dv = _flash_bwd(g_out2, pad(q), pad(k), pad(v), out2, lse, 0.0, ctx.causal,
                                attn_mask=add_mask, scale=ctx.scale)
        return dq[..., :-1], dk[..., :-1], dv[..., :-1], None, None, None


def attention(q, k, v, *, causal=False, mask=None, bias=None, scale=None, dropout_p=0.0,
              generator=None, return_lse=False):
    """Scaled dot-product attention on `[batch, seq, heads, head_dim]` (flash-style on CPU).

    ``out = softmax(q k^T * scale + bias + mask) v`` with grouped-query attention when k/v have
    fewer heads (query head i uses k/v head ``i // (h / g)``, Megatron/Llama grouping).

    Args:
      q: `[b, s_q, h, d]`.
      k: `[b, s_k, g, d]`, with h a multiple of g.
      v: `[b, s_k, g, d]`.
      causal: query i sees keys j <= i (top-left aligned, torch's ``is_causal``).
      mask: bool, broadcastable to `[b, h, s_q, s_k]`, True = keep (torch's convention; the
        NPU's True = masked lives in ``shardfn.npu``), or a ``CompressedCausal`` (same as causal).
      bias: float additive bias broadcastable to `[b, h, s_q, s_k]` (e.g. ``alibi_bias``), added
        after the scale (FA v2 pse_type 0 ordering).
      scale: score scale, default ``1 / sqrt(d)``.
      dropout_p: dropout on the attention probabilities (explicit path).
      generator: torch.Generator for the dropout mask (default: the global RNG), or a ``MaskFeed``
        of given keep masks `[b, h, s_q, s_k]`.
      return_lse: also return the log-sum-exp of the scaled, biased, masked scores.

    Returns:
      ``out`` `[b, s_q, h, d]` in q's dtype, and with ``return_lse`` also ``lse`` `[b, h, s_q]`
      in fp32 (float64 for float64 inputs). Both are differentiable w.r.t. q, k, v. A row that
      keeps no key gives output 0 and LSE -inf (weight 0 in a ring merge).

    Raises:
      TypeError / ValueError: on wrong kinds or shapes, naming the argument.

    Example:
      >>> q = k = v = torch.randn(2, 8, 4, 16)
      >>> out, lse = attention(q, k, v, causal=True, return_lse=True)
      >>> out.shape, lse.shape
      (torch.Size([2, 8, 4, 16]), torch.Size([2, 4, 8]))
    """
    api = "attention"
    h, g = _check_qkv(api, q, k, v)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{api}: dropout_p={dropout_p} must be in [0, 1).")
    mask, causal = _split_mask(mask, causal)
    s_q, s_k, d = q.shape[1], k.shape[1], q.shape[3]
    scale_ = 1.0 / math.sqrt(d) if scale is None else float(scale)
    needs_explicit = (
        dropout_p > 0.0
        or (bias is not None and bias.requires_grad)
        or (q.device.type != "cpu" and return_lse)
        or q.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    )
    if needs_explicit:
        return explicit_attention(q, k, v, causal=causal, mask=mask, bias=bias, scale=scale_,
                                  dropout_p=dropout_p, generator=generator, return_lse=return_lse)
    qh = rearrange(q, "b s h d -> b h s d")
    kh = repeat(k, "b s g d -> b (g r) s d", r=h // g) if g != h else rearrange(k, "b s h d -> b h s d")
    vh = repeat(v, "b s g d -> b (g r) s d", r=h // g) if g != h else rearrange(v, "b s h d -> b h s d")
    b = q.shape[0]
    # The kernels run their own causal path only when causal is the whole mask; otherwise causal
    # joins the additive mask (bitwise the same result on CPU, checked in the tests).
    add = _as_float_mask(api, mask, bias, causal and (mask is not None or bias is not None),
                         s_q, s_k, q.dtype, q.device)
    kernel_causal = causal and add is None
    if q.device.type != "cpu":
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=add, is_causal=kernel_causal, scale=scale_)
        return rearrange(out, "b h s d -> b s h d")
    if add is not None and add.dim() != 2:
        add = add.reshape((1,) * (4 - add.dim()) + tuple(add.shape)).expand(b, h, s_q, s_k)
    qh, kh, vh = align_vma(qh, kh, vh)
    out, lse = _FlashCpu.apply(qh, kh, vh, add, kernel_causal, scale_)
    if return_lse and add is not None:
        # The kernel reports lse 0 for a row that keeps no key; -inf is what a merge needs.
        empty = torch.isneginf(add).all(-1)  # [s_q] or [b, h, s_q]
        if bool(empty.any()):
            lse = lse.masked_fill(empty, float("-inf"))
    out = rearrange(out, "b h s d -> b s h d")
    return (out, lse) if return_lse else out


def varlen_attention(q, k, v, cu_seqlens, *, causal=True, scale=None, return_lse=False):
    """Attention within each packed document (block-diagonal), flash-attn's varlen convention.

    Each document ``[cu_seqlens[i], cu_seqlens[i+1])`` of the sequence dim attends only to
    itself; documents run one by one, so no `[s, s]` mask is built (EOD reset, FEATURES.md 55).

    Args:
      q: `[b, s, h, d]` (the same boundaries for every batch row) or packed `[t, h, d]`.
      k: like q, with g k/v heads dividing h.
      v: like k.
      cu_seqlens: int tensor `[n + 1]`, 0 = cu_seqlens[0] < ... < cu_seqlens[n] = s.
      causal: causal within each document.
      scale: score scale, default ``1 / sqrt(d)``.
      return_lse: also return the LSE `[b, h, s]` (or `[h, t]` for packed input).

    Returns:
      ``out`` shaped like q (and ``lse``).
    """
    api = "varlen_attention"
    packed = q.dim() == 3
    if packed:
        q, k, v = q[None], k[None], v[None]
    _check_qkv(api, q, k, v)
    s = q.shape[1]
    if k.shape[1] != s:
        raise ValueError(f"{api}: q has {s} tokens and k has {k.shape[1]}; packed documents need equal lengths.")
    bounds = [int(x) for x in torch.as_tensor(cu_seqlens).tolist()]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != s or any(a >= c for a, c in zip(bounds, bounds[1:])):
        raise ValueError(
            f"{api}: cu_seqlens={bounds} must start at 0, increase strictly and end at the sequence"
            f" length {s}. Build it with eod_reset(tokens, eod_id)."
        )
    outs, lses = [], []
    for a, c in zip(bounds, bounds[1:]):
        r = attention(q[:, a:c], k[:, a:c], v[:, a:c], causal=causal, scale=scale, return_lse=return_lse)
        if return_lse:
            outs.append(r[0])
            lses.append(r[1])
        else:
            outs.append(r)
    out = torch.cat(outs, dim=1)
    if packed:
        out = out[0]
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=-1)
    return out, (lse[0] if packed else lse)
