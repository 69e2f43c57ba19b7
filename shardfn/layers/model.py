"""A functional Llama-style decoder: ``init(generator, config)``, ``apply``, ``loss``.

embed -> blocks (RoPE or ALiBi, GQA, SwiGLU or GeLU, MoE with shared experts, noop layers)
-> final norm -> logits (tied or separate head). Parameters are a dict pytree:
``{"config", "embed", "layers": [block params], "final_norm", "head"?}``. The config is a static
pytree node (no leaves: shardfn.tree.register_static), so ``apply(params, tokens)`` finds it while
tree maps, shard_map and optimizers see only the tensors.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from shardfn.layers import block, embedding, linear, norm
from shardfn.layers.alibi import alibi_slopes
from shardfn.layers.config import LlamaConfig
from shardfn.layers.core_attention import attention, varlen_attention
from shardfn.layers.recompute import LayerRecompute, RecomputePolicy, checkpoint
from shardfn.layers.rotary import rope_cache

__all__ = ["init", "apply", "loss", "LlamaConfig"]


def init(generator: torch.Generator | None, config: LlamaConfig) -> dict:
    """Initialise the model's parameters (weights ~ N(0, init_std^2), norms 1, biases 0)."""
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"model.init: config must be a LlamaConfig, got {type(config).__name__}.")
    c = config
    params = {
        "config": c,
        "embed": embedding.init(generator, c.vocab_size, c.hidden, std=c.init_std, dtype=c.dtype),
        "layers": [block.init(generator, c, i) for i in range(c.num_layers)],
        "final_norm": norm.init(generator, c.hidden, kind=c.norm, dtype=c.dtype),
    }
    if not c.tie_embeddings:
        params["head"] = linear.init(generator, c.hidden, c.vocab_size, std=c.init_std, dtype=c.dtype)
    return params


def _config(params, config, api):
    config = config if config is not None else params.get("config")
    if not isinstance(config, LlamaConfig):
        raise TypeError(
            f"model.{api}: no LlamaConfig: params from model.init carry it under 'config'; pass config=... "
            f"for params built another way (got {type(config).__name__})."
        )
    return config


def _per_layer(fn, num_layers: int, name: str) -> tuple:
    """One attention core per layer: `fn` repeated, or `fn` itself when it is a list/tuple of them."""
    if not isinstance(fn, (list, tuple)):
        return (fn,) * num_layers
    if len(fn) != num_layers or not all(callable(f) for f in fn):
        raise ValueError(
            f"model.apply: {name} given as a sequence must hold one callable per layer; got {len(fn)} entries "
            f"({[type(f).__name__ for f in fn]}) for {num_layers} layers. Pass one function for all layers, or "
            f"exactly {num_layers} (e.g. from context_parallel.cp_layer_attention_fns(num_layers={num_layers}, ...))."
        )
    return tuple(fn)


def _run_blocks(layers, x, rope, slopes, cu_seqlens, generator, *, config, attn_fns, varlen_fns, column_linear,
                row_linear):
    """Blocks applied in turn (the unit one full-recompute checkpoint re-runs): ``(x, [aux or None])``."""
    aux = []
    for p, attn_fn, varlen_fn in zip(layers, attn_fns, varlen_fns):
        x, a = block.apply(p, x, config=config, rope=rope, alibi_slopes=slopes, cu_seqlens=cu_seqlens,
                           recompute=LayerRecompute(), generator=generator, attn_fn=attn_fn, varlen_fn=varlen_fn,
                           column_linear=column_linear, row_linear=row_linear, return_aux_loss=True)
        aux.append(a)
    return x, aux


def apply(params: dict, tokens: torch.Tensor, *, position_ids=None, cu_seqlens=None, config: LlamaConfig | None = None,
          recompute: RecomputePolicy = RecomputePolicy(), generator: torch.Generator | None = None,
          attn_fn=attention, varlen_fn=varlen_attention, column_linear=linear.apply,
          row_linear=linear.apply, return_aux_loss: bool = False):
    """Logits of tokens `[b, s]` -> `[b, s, V]`.

    Args:
      params: from ``init``.
      tokens: int `[b, s]`.
      config: the model config; by default the one ``init`` stored in ``params["config"]``.
      position_ids: int `[s]` or `[b, s]` for RoPE (EOD reset); default ``arange(s)``.
      cu_seqlens: packed-document boundaries (from ``eod_reset``): attention stays in documents.
      recompute: which blocks recompute what (``RecomputePolicy``; its ``full_groups`` are checkpointed
        as units, e.g. groups of N blocks for method "uniform").
      generator: RNG for dropout.
      attn_fn: attention core passed to every block, or a sequence of ``num_layers`` cores (block ``i``
        gets ``attn_fn[i]``), e.g. CP ring attention with a KV cache on some layers only
        (``context_parallel.cp_layer_attention_fns``).
      varlen_fn: attention core for packed documents; one, or a sequence of ``num_layers`` like ``attn_fn``.
      column_linear: column-side linear passed to every block.
      row_linear: row-side linear passed to every block.
      return_aux_loss: also return the sum over MoE blocks of their load-balancing losses
        (``moe.load_balancing_loss``, unscaled; a 0-d zero without MoE blocks): ``(logits, aux)``.
    """
    c = _config(params, config, "apply")
    if tokens.dim() != 2:
        raise ValueError(f"model.apply: tokens must be [batch, seq], got shape {tuple(tokens.shape)}.")
    s = tokens.shape[1]
    x = embedding.apply(params["embed"], tokens)
    rope = None
    slopes = None
    table_dtype = torch.float64 if c.dtype == torch.float64 else torch.float32
    if c.position == "rope":
        rope = rope_cache(s, c.rope_dim, base=c.rope_base, position_ids=position_ids, dtype=table_dtype,
                          device=tokens.device)
    elif c.position == "alibi":
        slopes = alibi_slopes(c.num_heads, dtype=table_dtype, device=tokens.device)
    n = len(params["layers"])
    attn_fns = _per_layer(attn_fn, n, "attn_fn")
    varlen_fns = _per_layer(varlen_fn, n, "varlen_fn")
    groups = {g[0]: g for g in recompute.full_groups(n)}
    aux, i = [], 0
    while i < n:
        group = groups.get(i)
        if group is None:
            x, a = block.apply(params["layers"][i], x, config=c, rope=rope, alibi_slopes=slopes, cu_seqlens=cu_seqlens,
                               recompute=recompute.for_layer(i, n), generator=generator, attn_fn=attn_fns[i],
                               varlen_fn=varlen_fns[i], column_linear=column_linear, row_linear=row_linear,
                               return_aux_loss=True)
            aux.append(a)
            i += 1
            continue
        run = functools.partial(_run_blocks, config=c, attn_fns=[attn_fns[j] for j in group],
                                varlen_fns=[varlen_fns[j] for j in group], column_linear=column_linear,
                                row_linear=row_linear)
        x, a = checkpoint(run, [params["layers"][j] for j in group], x, rope, slopes, cu_seqlens, generator)
        aux.extend(a)
        i += len(group)
    x = norm.apply(params["final_norm"], x, kind=c.norm, eps=c.norm_eps)
    logits = embedding.logits(params["embed"], x) if c.tie_embeddings else linear.apply(params["head"], x)
    if not return_aux_loss:
        return logits
    aux = [a for a in aux if a is not None]
    total = functools.reduce(torch.add, aux) if aux else torch.zeros((), dtype=table_dtype, device=tokens.device)
    return logits, total


def loss(params: dict, tokens: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None, *,
         config: LlamaConfig | None = None, **apply_kwargs) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) over the positions where ``loss_mask`` is 1.

    With ``config.moe_aux_loss_coeff > 0`` adds ``coeff * sum over MoE blocks of their
    load-balancing losses``; with the default 0 the loss is the cross-entropy alone.

    Args:
      params: from ``init``.
      tokens: int `[b, s]`.
      targets: int `[b, s]`.
      loss_mask: `[b, s]` of 0/1 (default all ones).
      config: the model config; by default ``params["config"]``.
      **apply_kwargs: passed to ``apply``.

    Returns:
      A 0-d fp32 tensor (float64 for a float64 model).
    """
    coeff = _config(params, config, "loss").moe_aux_loss_coeff
    out = apply(params, tokens, config=config, return_aux_loss=bool(coeff), **apply_kwargs)
    logits, aux = out if coeff else (out, None)
    cdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    ce = F.cross_entropy(logits.to(cdtype).flatten(0, 1), targets.flatten(), reduction="none")
    if loss_mask is None:
        result = ce.mean()
    else:
        m = loss_mask.flatten().to(ce.dtype)
        result = (ce * m).sum() / m.sum()
    return result + coeff * aux.to(result.dtype) if coeff else result
