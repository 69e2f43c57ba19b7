"""Online-softmax merge of two partial attention results (MindSpeed's npu_ring_attention_update).

Ring attention computes attention of local queries against one KV block per step and merges the
partial results with the statistics :func:`shardfn.npu.npu_fusion_attention` returns
(FEATURES.md 12)::

    m = max(m1, m2);  l = l1 e^(m1 - m) + l2 e^(m2 - m)
    out = out1 (l1 e^(m1 - m) / l) + out2 (l2 e^(m2 - m) / l)

A row that neither block saw (both maxima -inf) stays ``out = 0, max = -inf, sum = 0``.
"""
from __future__ import annotations

import torch
from einops import repeat

from shardfn.npu._dispatch import npu_op

__all__ = ["npu_ring_attention_update"]


def _row_scale(stat: torch.Tensor, layout: str, head_dim: int) -> torch.Tensor:
    # [b, n, s, 8] (SBH) or [t, n, 8] (TND) -> a factor broadcastable to the output layout.
    first = stat[..., 0]
    if layout == "SBH":
        return repeat(first, "b n s -> s b (n d)", d=head_dim)
    return repeat(first, "t n -> t n d", d=head_dim)


@npu_op(("mindspeed.ops.npu_ring_attention_update", "npu_ring_attention_update"))
def npu_ring_attention_update(prev_attn_out, prev_softmax_max, prev_softmax_sum, cur_attn_out, cur_softmax_max,
                              cur_softmax_sum, actual_seq_qlen=None, layout="SBH"):
    """Merge two partial attention outputs over disjoint key sets into the exact joint result.

    Args:
        prev_attn_out: ``[s, b, n*d]`` (SBH) or ``[t, n, d]`` (TND).
        prev_softmax_max: ``[b, n, s, 8]`` (SBH) or ``[t, n, 8]`` (TND), fp32.
        prev_softmax_sum: like prev_softmax_max.
        cur_attn_out, cur_softmax_max, cur_softmax_sum: the second partial result.
        actual_seq_qlen: TND cumulative query lengths (rows are independent, so only checked).
        layout: "SBH" or "TND".

    Returns:
        ``(attn_out, softmax_max, softmax_sum)`` in the input layouts; ``attn_out`` in the
        output dtype of ``prev_attn_out``.
    """
    if layout not in ("SBH", "TND"):
        raise ValueError(f"npu_ring_attention_update: layout={layout!r} must be 'SBH' or 'TND'.")
    if layout == "TND" and actual_seq_qlen is None:
        raise ValueError("npu_ring_attention_update: layout='TND' needs actual_seq_qlen (cumulative lengths).")
    heads = prev_softmax_max.shape[-2] if layout == "TND" else prev_softmax_max.shape[1]
    head_dim = prev_attn_out.shape[-1] // (heads if layout == "SBH" else 1)
    wide = torch.float64 if prev_attn_out.dtype == torch.float64 else torch.float32
    m1, m2 = prev_softmax_max.to(wide), cur_softmax_max.to(wide)
    m = torch.maximum(m1, m2)
    safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    l1 = prev_softmax_sum.to(wide) * torch.exp(m1 - safe)
    l2 = cur_softmax_sum.to(wide) * torch.exp(m2 - safe)
    total = l1 + l2
    denom = torch.where(total > 0, total, torch.ones_like(total))
    w1 = _row_scale(l1 / denom, layout, head_dim)
    w2 = _row_scale(l2 / denom, layout, head_dim)
    out = prev_attn_out.to(wide) * w1 + cur_attn_out.to(wide) * w2
    return out.to(prev_attn_out.dtype), m, total
