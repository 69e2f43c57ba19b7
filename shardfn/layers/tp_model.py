"""The layers issue's Llama-style block and model, sharded over tp (and dp, and + sequence parallel).

The math is the layers' own (``norm.apply``, ``attention_block.apply``, ``mlp.apply`` with their
``column_linear`` / ``row_linear`` hooks); this module adds the tensor-parallel communication:

    x ──norm──> tp_enter ──q,k,v (local)──> attention on h/t heads ──o (row)──> tp_exit ──(+x)──>
      ──norm──> tp_enter ──fc1 (local)──> act ──fc2 (row)──> tp_exit ──(+x)──>

with one entry per sub-block (so the backward has one all-reduce, or one reduce-scatter, per
sub-block, as PERF.md 2.2 counts), the embedding vocab-parallel, the head column-parallel and the
loss `vocab_parallel_cross_entropy` on vocab-split logits.

Layout: `tp_layout(params, config)` views each SwiGLU fc1 weight ``[2f, h]`` as ``[2, f, h]`` so
that splitting ``f`` gives every device its own gate and up rows (FEATURES.md 33); it is a view,
so gradients land on the original params. `tp_specs(params, config)` gives the specs of that view:

    embed, head   P(tp, None)         q, k, v   P(tp, None)     o     P(None, tp)
    fc1 (SwiGLU)  P(None, tp, None)   fc1 (GeLU) P(tp, None)    fc2   P(None, tp)
    norms, row biases  P()            column biases P(tp)

Dropout (``attention_dropout``, ``hidden_dropout``) follows Megatron's RNG rule with the explicit
streams of ``tp_rng.tp_rng_streams`` passed as ``rng=``: attention probabilities (this rank's
heads) draw from the rank's model-parallel stream; the hidden dropout before each residual add draws
from the stream shared by the tp group under plain TP (the activation is replicated there) and from
the model-parallel stream under SP (it is this rank's sequence block). ``tp_rng.
assemble_tp_dropout_masks`` gives the single-device masks the ranks' masks join into.

Unsupported (documented): MoE blocks; they raise NotImplementedError.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from einops import rearrange

from shardfn.layers import attention_block, mlp, noop, norm
from shardfn.layers.alibi import alibi_slopes
from shardfn.layers.config import LlamaConfig
from shardfn.layers.core_attention import attention
from shardfn.layers.drop import dropout
from shardfn.layers.rotary import rope_cache
from shardfn.layers.tensor_parallel import column_parallel_linear, row_parallel_linear, vocab_parallel_cross_entropy, vocab_parallel_embedding
from shardfn.layers.tp_rng import TPStreams
from shardfn.primitives.collectives import axis_index, axis_size, pmean, pvary
from shardfn.primitives.tensor_parallel import tp_enter
from shardfn.spec import P
from shardfn.tree import tree_map

__all__ = ["tp_layout", "tp_specs", "tp_block_specs", "tp_block_apply", "tp_model_apply", "tp_model_loss"]


def _check_config(config, tp=None, api="tp"):
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"{api}: config must be a LlamaConfig; got {type(config).__name__}.")
    c = config
    if c.num_experts:
        raise NotImplementedError(f"{api}: MoE blocks (num_experts={c.num_experts}) are not sharded by the TP model; use expert parallelism.")
    if tp is not None:
        sizes = {"num_heads": c.num_heads, "num_kv_heads": c.kv_heads, "ffn_hidden": c.ffn, "vocab_size": c.vocab_size}
        bad = [f"{k}={v}" for k, v in sizes.items() if v % tp]
        if bad:
            raise ValueError(
                f"{api}: {', '.join(bad)} not divisible by the tp size {tp}. Choose sizes divisible by {tp} "
                f"(pad the vocab), or shard those layers with the unaligned linears."
            )


def _check_rng(config, rng, api):
    c = config
    if not (c.attention_dropout or c.hidden_dropout):
        return
    if not isinstance(rng, TPStreams):
        raise ValueError(
            f"{api}: dropout inside tensor-parallel regions (attention_dropout={c.attention_dropout}, "
            f"hidden_dropout={c.hidden_dropout}) needs the tp RNG streams; got rng={type(rng).__name__}. Pass "
            f"rng=tp_rng.tp_rng_streams(seed, axis_name=...) built inside shard_map (or set both to 0)."
        )


def _table_dtype(config):
    # the unsharded model's RoPE / ALiBi tables: float64 for a float64 model, else fp32
    return torch.float64 if config.dtype == torch.float64 else torch.float32


def _block_layout(p, config):
    if not p or config.mlp != "swiglu":
        return p
    fc1 = dict(p["mlp"]["fc1"])
    fc1["weight"] = rearrange(fc1["weight"], "(two f) h -> two f h", two=2)
    if "bias" in fc1:
        fc1["bias"] = rearrange(fc1["bias"], "(two f) -> two f", two=2)
    out = dict(p)
    out["mlp"] = dict(p["mlp"], fc1=fc1)
    return out


def tp_layout(params: dict, config: LlamaConfig) -> dict:
    """View the model's params (from ``model.init``) in the TP layout: SwiGLU fc1 as ``[2, f, h]``.

    A view: gradients taken through it land on ``params``. Also accepts one block's params.
    """
    _check_config(config, api="tp_layout")
    if "layers" not in params:
        return _block_layout(params, config)
    return dict(params, layers=[_block_layout(p, config) for p in params["layers"]])


def _linear_specs(p, column, tp):
    if column:
        table = {"weight": P(tp, None), "bias": P(tp)}
    else:
        table = {"weight": P(None, tp), "bias": P()}
    return {k: table[k] for k in p}


def tp_block_specs(block_params: dict, config: LlamaConfig, *, axis_name="tp") -> dict:
    """Specs of one block's params in the TP layout (``{}`` for a noop block)."""
    if not block_params:
        return {}
    tp = axis_name
    fc1 = block_params["mlp"]["fc1"]
    if config.mlp == "swiglu":
        fc1_spec = {"weight": P(None, tp, None), **({"bias": P(None, tp)} if "bias" in fc1 else {})}
    else:
        fc1_spec = _linear_specs(fc1, True, tp)
    attn = block_params["attn"]
    return {
        "attn_norm": tree_map(lambda _: P(), block_params["attn_norm"]),
        "attn": {"q": _linear_specs(attn["q"], True, tp), "k": _linear_specs(attn["k"], True, tp),
                 "v": _linear_specs(attn["v"], True, tp), "o": _linear_specs(attn["o"], False, tp)},
        "mlp_norm": tree_map(lambda _: P(), block_params["mlp_norm"]),
        "mlp": {"fc1": fc1_spec, "fc2": _linear_specs(block_params["mlp"]["fc2"], False, tp)},
    }


def tp_specs(params: dict, config: LlamaConfig, *, axis_name="tp") -> dict:
    """The partition specs of ``tp_layout(params, config)``: one call shards the whole model over tp.

    Example:
        >>> specs = tp_specs(params, cfg)
        >>> loss = shard_map(functools.partial(tp_model_loss, config=cfg, dp_axis='dp'), mesh=mesh,
        ...                  in_specs=(specs, P('dp'), P('dp')), out_specs=P())(tp_layout(params, cfg), tokens, targets)
    """
    _check_config(config, api="tp_specs")
    out = {
        "embed": {"weight": P(axis_name, None)},
        "layers": [tp_block_specs(p, config, axis_name=axis_name) for p in params["layers"]],
        "final_norm": tree_map(lambda _: P(), params["final_norm"]),
    }
    if "head" in params:
        out["head"] = _linear_specs(params["head"], True, axis_name)
    return out


def _local_linear(p, x):
    w, b = p["weight"], p.get("bias")
    if w.dim() == 3:  # SwiGLU fc1 in the TP layout: [2, f/t, h] -> gate rows then up rows
        w = rearrange(w, "two f h -> (two f) h")
        b = None if b is None else rearrange(b, "two f -> (two f)")
    return F.linear(x, w, b)


def tp_block_apply(params: dict, x: torch.Tensor, *, config: LlamaConfig, axis_name="tp",
                   sequence_parallel: bool = False, sequence_length: int | None = None, rope=None,
                   attn_fn=attention, num_chunks: int = 1, rng: TPStreams | None = None) -> torch.Tensor:
    """One pre-norm block (attention + MLP) on this device's tp shard of the weights.

    Args:
        params: this device's block of ``tp_layout`` params (specs from `tp_block_specs`).
        x: TP: ``[b, s, h]`` shared by the tp group. SP: ``[b, s_r, h]``, this device's sequence block.
        config: the model config (heads, kv heads and ffn divisible by tp).
        axis_name: the tensor-parallel axis.
        sequence_parallel: Megatron SP: norms and residuals on sequence shards, all-gather entering
            and reduce-scatter leaving each sub-block.
        sequence_length: SP with an uneven sequence split: the global s.
        rope: ``(cos, sin)`` for the full sequence, or None.
        attn_fn: the attention core on the local heads.
        num_chunks: CoC chunks of the row linears' matmul + collective (FEATURES.md 39).
        rng: this device's ``tp_rng_streams``, needed when the config has dropout: attention
            dropout draws from ``rng.model_parallel``, hidden dropout from ``rng.shared`` (TP) or
            ``rng.model_parallel`` (SP). ``recompute.checkpoint`` around this call replays both.

    Returns:
        Like x.
    """
    c = config
    _check_config(c, api="tp_block_apply")
    _check_rng(c, rng, "tp_block_apply")
    if not params:
        return noop.apply(params, x)
    mp_gen = rng.model_parallel if rng is not None else None
    # Megatron: the residual-path dropout of plain TP runs on a replicated activation (shared
    # stream, the same mask on every rank); under SP it runs on this rank's sequence block (own stream)
    hidden_gen = None if rng is None else (rng.model_parallel if sequence_parallel else rng.shared)
    seq_dim = 1 if sequence_parallel else None
    reduce = "psum_scatter" if sequence_parallel else "psum"
    row = functools.partial(row_parallel_linear, axis_name=axis_name, reduce=reduce, sequence_dim=1,
                            num_chunks=num_chunks)
    enter = functools.partial(tp_enter, axis_name=axis_name, sequence_dim=seq_dim,
                              sequence_length=sequence_length if sequence_parallel else None)
    slopes = None
    if c.position == "alibi":
        all_slopes = alibi_slopes(c.num_heads, dtype=_table_dtype(c), device=x.device)
        slopes = rearrange(all_slopes, "(t h) -> t h", t=axis_size(axis_name))[axis_index(axis_name)]
    if sequence_parallel:  # norms run on sequence shards: their gradients sum over tp (Megatron's
        # sequence_parallel-marked params); explicit so it also holds under check_vma=False
        params = dict(params, attn_norm=pvary(params["attn_norm"], axis_name), mlp_norm=pvary(params["mlp_norm"], axis_name))
    h = enter(norm.apply(params["attn_norm"], x, kind=c.norm, eps=c.norm_eps))
    a = attention_block.apply(params["attn"], h, head_dim=c.dim_per_head, rope=rope,
                              rotary_interleaved=c.rotary_interleaved, alibi_slopes=slopes, attn_fn=attn_fn,
                              dropout_p=c.attention_dropout, generator=mp_gen,
                              column_linear=_local_linear, row_linear=row)
    x = x + dropout(a, c.hidden_dropout, generator=hidden_gen)
    h = enter(norm.apply(params["mlp_norm"], x, kind=c.norm, eps=c.norm_eps))
    m = mlp.apply(params["mlp"], h, kind=c.mlp, column_linear=_local_linear, row_linear=row)
    return x + dropout(m, c.hidden_dropout, generator=hidden_gen)


def tp_model_apply(params: dict, tokens: torch.Tensor, *, config: LlamaConfig, axis_name="tp",
                   sequence_parallel: bool = False, position_ids=None, num_chunks: int = 1,
                   rng: TPStreams | None = None) -> torch.Tensor:
    """Vocab-split logits of the layers issue's model on this device's tp shard.

    Args:
        params: this device's block of ``tp_layout(params, config)`` (specs from `tp_specs`).
        tokens: int ``[b, s]`` (this device's dp block), the same on every device of the tp group.
        config: the model config.
        axis_name: the tensor-parallel axis.
        sequence_parallel: Megatron SP between blocks (any s; uneven splits use `split_sizes`).
        position_ids: RoPE positions ``[s]`` or ``[b, s]``; default ``arange(s)``.
        num_chunks: CoC chunks for the row linears.
        rng: this device's ``tp_rng_streams`` (needed with dropout; see `tp_block_apply`).

    Returns:
        ``[b, s, V/t]`` logits, varying over ``axis_name`` (never gathered).
    """
    c = config
    _check_config(c, axis_size(axis_name), api="tp_model_apply")
    _check_rng(c, rng, "tp_model_apply")
    s = tokens.shape[1]
    sp = sequence_parallel
    x = vocab_parallel_embedding(params["embed"], tokens, axis_name=axis_name,
                                 reduce="psum_scatter" if sp else "psum", sequence_dim=1)
    rope = None
    if c.position == "rope":
        rope = rope_cache(s, c.rope_dim, base=c.rope_base, position_ids=position_ids, dtype=_table_dtype(c),
                          device=tokens.device)
    for p in params["layers"]:
        x = tp_block_apply(p, x, config=c, axis_name=axis_name, sequence_parallel=sp, sequence_length=s,
                           rope=rope, num_chunks=num_chunks, rng=rng)
    final_norm = pvary(params["final_norm"], axis_name) if sp else params["final_norm"]
    x = norm.apply(final_norm, x, kind=c.norm, eps=c.norm_eps)
    head = params["embed"] if c.tie_embeddings else params["head"]
    return column_parallel_linear(head, x, axis_name=axis_name, sequence_dim=1 if sp else None,
                                  sequence_length=s if sp else None)


def tp_model_loss(params: dict, tokens: torch.Tensor, targets: torch.Tensor, loss_mask=None, *,
                  config: LlamaConfig, axis_name="tp", dp_axis=None, sequence_parallel: bool = False,
                  num_chunks: int = 1, rng: TPStreams | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of the TP model (``model.loss`` sharded), invariant over tp and dp.

    Args:
        params: this device's block of ``tp_layout(params, config)``.
        tokens: int ``[b, s]``, this device's dp block.
        targets: int ``[b, s]``.
        loss_mask: ``[b, s]`` of 0/1, or None.
        config: the model config.
        axis_name: the tensor-parallel axis.
        dp_axis: the data-parallel axis (or tuple) the batch is split over, or None. The loss is the
            mean over the dp group (equal local batches), so replicated weights' gradients come out
            summed over dp by the vma rule and scaled by the pmean.
        sequence_parallel: Megatron SP.
        num_chunks: CoC chunks for the row linears.
        rng: this device's ``tp_rng_streams`` (needed with dropout; see `tp_block_apply`).

    Returns:
        0-d fp32 loss (float64 for float64 params).
    """
    logits = tp_model_apply(params, tokens, config=config, axis_name=axis_name, sequence_parallel=sequence_parallel,
                            num_chunks=num_chunks, rng=rng)
    ce = vocab_parallel_cross_entropy(logits, targets, axis_name=axis_name)
    if loss_mask is None:
        loss = ce.mean()
    else:
        if dp_axis is not None:
            raise NotImplementedError(
                "tp_model_loss: loss_mask with dp_axis (a token-weighted mean over dp) is not supported; "
                "normalise the mask per device or pass dp_axis=None and reduce yourself."
            )
        m = loss_mask.to(ce.dtype)
        loss = (ce * m).sum() / m.sum()
    return loss if dp_axis is None else pmean(loss, dp_axis)
