"""The attention block family: QKV projections, RoPE or ALiBi, GQA, core attention, output.

The number of heads is read off the q/k weights (``rows / head_dim``), so the same ``apply``
runs on tensor-parallel shards of the weights. The attention core is the ``attn_fn`` argument
(context parallelism passes ring or Ulysses attention) and the projections go through
``column_linear`` / ``row_linear`` (tensor parallelism passes its parallel linears).
"""
from __future__ import annotations

import torch
from einops import rearrange

from shardfn.layers import linear
from shardfn.layers.alibi import alibi_bias
from shardfn.layers.core_attention import attention, varlen_attention
from shardfn.layers.rotary import apply_rotary

__all__ = ["init", "apply"]


def init(generator: torch.Generator | None, hidden: int, num_heads: int, num_kv_heads: int | None = None,
         head_dim: int | None = None, *, bias: bool = False, std: float = 0.02, dtype=torch.float32,
         device=None) -> dict:
    """Attention parameters ``{"q": [h*d, H], "k": [g*d, H], "v": [g*d, H], "o": [H, h*d]}``.

    Args:
      generator: RNG for the weights.
      hidden: model width H.
      num_heads: query heads h.
      num_kv_heads: key/value heads g (default h; h must be a multiple of g).
      head_dim: d (default H / h).
      bias: linear biases.
      std: weight init std.
      dtype: parameter dtype.
      device: parameter device.
    """
    g = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % g:
        raise ValueError(f"attention_block.init: num_heads={num_heads} must be a multiple of num_kv_heads={g}.")
    d = hidden // num_heads if head_dim is None else head_dim
    kw = dict(bias=bias, std=std, dtype=dtype, device=device)
    return {
        "q": linear.init(generator, hidden, num_heads * d, **kw),
        "k": linear.init(generator, hidden, g * d, **kw),
        "v": linear.init(generator, hidden, g * d, **kw),
        "o": linear.init(generator, num_heads * d, hidden, **kw),
    }


def apply(params: dict, x: torch.Tensor, *, head_dim: int, rope=None, rotary_interleaved: bool = False,
          alibi_slopes: torch.Tensor | None = None, causal: bool = True, mask=None, cu_seqlens=None,
          dropout_p: float = 0.0, generator: torch.Generator | None = None, attn_fn=attention,
          varlen_fn=varlen_attention, column_linear=linear.apply, row_linear=linear.apply) -> torch.Tensor:
    """Self-attention of x `[b, s, H]` -> `[b, s, H]`.

    Args:
      params: from ``init`` (or a TP shard of it).
      x: `[b, s, H]`.
      head_dim: d.
      rope: ``(cos, sin)`` from ``rope_cache`` (`[s, dr]` or `[b, s, dr]`), or None.
      rotary_interleaved: GPT-J pairs instead of NeoX halves.
      alibi_slopes: `[h_local]` slopes for this shard's heads, or None.
      causal: causal attention.
      mask: extra bool mask (True = keep) or ``CompressedCausal``.
      cu_seqlens: packed-document boundaries; attention runs per document through ``varlen_fn``.
      dropout_p: attention-probability dropout.
      generator: RNG for dropout.
      attn_fn: the core, ``attn_fn(q, k, v, *, causal, mask, bias, dropout_p, generator)``.
      varlen_fn: the core for packed documents, ``varlen_fn(q, k, v, cu_seqlens, *, causal)``.
      column_linear: applies q/k/v.
      row_linear: applies o.
    """
    q = rearrange(column_linear(params["q"], x), "b s (h d) -> b s h d", d=head_dim)
    k = rearrange(column_linear(params["k"], x), "b s (g d) -> b s g d", d=head_dim)
    v = rearrange(column_linear(params["v"], x), "b s (g d) -> b s g d", d=head_dim)
    if rope is not None:
        cos, sin = rope
        q = apply_rotary(q, cos, sin, interleaved=rotary_interleaved)
        k = apply_rotary(k, cos, sin, interleaved=rotary_interleaved)
    if cu_seqlens is not None:
        if alibi_slopes is not None or mask is not None or dropout_p:
            raise NotImplementedError(
                "attention_block.apply: cu_seqlens (packed documents) is supported without ALiBi,"
                " extra masks and attention dropout; drop those or unpack the documents."
            )
        out = varlen_fn(q, k, v, cu_seqlens, causal=causal)
    else:
        bias = None
        if alibi_slopes is not None:
            bias = alibi_bias(alibi_slopes, x.shape[1], dtype=alibi_slopes.dtype)
        out = attn_fn(q, k, v, causal=causal, mask=mask, bias=bias, dropout_p=dropout_p, generator=generator)
    return row_linear(params["o"], rearrange(out, "b s h d -> b s (h d)"))
