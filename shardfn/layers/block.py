"""The transformer block family: pre-norm attention and MLP (or MoE) with residuals.

``x = x + drop(attn(norm(x)));  x = x + drop(mlp(norm(x)))``. A block listed in
``config.noop_layers`` has no parameters and returns a copy of its input. Recompute per block
follows a ``LayerRecompute`` (full, selective, norm, activation).
"""
from __future__ import annotations

import functools

import torch

from shardfn.layers import attention_block, linear, mlp, moe, noop, norm
from shardfn.layers.config import LlamaConfig
from shardfn.layers.core_attention import attention, varlen_attention
from shardfn.layers.drop import dropout
from shardfn.layers.recompute import LayerRecompute, checkpoint, selective

__all__ = ["init", "apply"]


def init(generator: torch.Generator | None, config: LlamaConfig, layer_index: int = 0) -> dict:
    """Parameters of block ``layer_index``: ``{"attn_norm", "attn", "mlp_norm", "mlp" | "moe"}``, or ``{}``."""
    c = config
    if layer_index in c.noop_layers:
        return noop.init(generator)
    kw = dict(std=c.init_std, dtype=c.dtype)
    params = {
        "attn_norm": norm.init(generator, c.hidden, kind=c.norm, dtype=c.dtype),
        "attn": attention_block.init(generator, c.hidden, c.num_heads, c.kv_heads, c.dim_per_head, bias=c.bias, **kw),
        "mlp_norm": norm.init(generator, c.hidden, kind=c.norm, dtype=c.dtype),
    }
    if c.num_experts:
        params["moe"] = moe.init(generator, c.hidden, c.num_experts, c.moe_ffn_hidden or c.ffn,
                                 num_shared_experts=c.num_shared_experts, kind=c.mlp, bias=c.bias, **kw)
    else:
        params["mlp"] = mlp.init(generator, c.hidden, c.ffn, kind=c.mlp, bias=c.bias, **kw)
    return params


def _norm_fn(keys, kind, eps):
    def fn(x, *p):
        return norm.apply(dict(zip(keys, p)), x, kind=kind, eps=eps)

    return fn


def _normed(params, x, config, recompute_norm):
    """``norm(x)`` directly, or as a RecomputedOutput to discard after its consumer."""
    keys = sorted(params)
    fn = _norm_fn(keys, config.norm, config.norm_eps)
    if not recompute_norm:
        return fn(x, *[params[k] for k in keys]), None
    from shardfn.memory import checkpoint_without_output

    handle = checkpoint_without_output(fn, x, *[params[k] for k in keys])
    return handle.value, handle


def _forward(params, x, rope, alibi_slopes, cu_seqlens, generator, *, config, recompute, attn_fn, varlen_fn,
             column_linear, row_linear, return_aux_loss=False):
    c = config
    core = selective(attn_fn) if recompute.selective else attn_fn
    h, handle = _normed(params["attn_norm"], x, c, recompute.norm)
    a = attention_block.apply(params["attn"], h, head_dim=c.dim_per_head, rope=rope,
                              rotary_interleaved=c.rotary_interleaved, alibi_slopes=alibi_slopes,
                              cu_seqlens=cu_seqlens, dropout_p=c.attention_dropout, generator=generator,
                              attn_fn=core, varlen_fn=varlen_fn, column_linear=column_linear, row_linear=row_linear)
    if handle is not None:
        handle.discard(until=a)
    x = x + dropout(a, c.hidden_dropout, generator=generator)
    h, handle = _normed(params["mlp_norm"], x, c, recompute.norm)
    aux = None
    if "moe" in params:
        m = moe.apply(params["moe"], h, top_k=c.moe_top_k, kind=c.mlp, column_linear=column_linear,
                      row_linear=row_linear, return_aux_loss=return_aux_loss)
        if return_aux_loss:
            m, aux = m
    else:
        m = mlp.apply(params["mlp"], h, kind=c.mlp, recompute_activation=recompute.activation,
                      column_linear=column_linear, row_linear=row_linear)
    if handle is not None:
        handle.discard(until=m)
    out = x + dropout(m, c.hidden_dropout, generator=generator)
    return (out, aux) if return_aux_loss else out


def apply(params: dict, x: torch.Tensor, *, config: LlamaConfig, rope=None, alibi_slopes=None, cu_seqlens=None,
          recompute: LayerRecompute = LayerRecompute(), generator: torch.Generator | None = None,
          attn_fn=attention, varlen_fn=varlen_attention, column_linear=linear.apply,
          row_linear=linear.apply, return_aux_loss: bool = False):
    """Apply one block to x `[b, s, H]` -> `[b, s, H]`.

    Args:
      params: from ``init`` (``{}`` for a noop block).
      x: `[b, s, H]`.
      config: the model config.
      rope: ``(cos, sin)`` or None.
      alibi_slopes: `[h_local]` or None.
      cu_seqlens: packed-document boundaries or None.
      recompute: this block's ``LayerRecompute``.
      generator: RNG for dropout (replayed by recomputation).
      attn_fn: the attention core (CP passes ring/Ulysses attention).
      varlen_fn: the attention core for packed documents.
      column_linear: q/k/v and fc1 linear (TP passes column-parallel).
      row_linear: o and fc2 linear (TP passes row-parallel).
      return_aux_loss: also return the MoE load-balancing loss (``moe.load_balancing_loss``; None for
        a dense or noop block): ``(y, aux)``.
    """
    if not params:
        y = noop.apply(params, x)
        return (y, None) if return_aux_loss else y
    fwd = functools.partial(_forward, config=config, attn_fn=attn_fn, varlen_fn=varlen_fn,
                            column_linear=column_linear, row_linear=row_linear, return_aux_loss=return_aux_loss)
    if recompute.full:
        return checkpoint(functools.partial(fwd, recompute=LayerRecompute()), params, x, rope, alibi_slopes,
                          cu_seqlens, generator)
    return fwd(params, x, rope, alibi_slopes, cu_seqlens, generator, recompute=recompute)
