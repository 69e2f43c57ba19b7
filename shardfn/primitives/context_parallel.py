"""Running a model with a cp axis: attention cores for `layers`' attention block, and the data layout.

Context parallelism changes only two things in a model (FEATURES.md 10-13):

* attention: the block's attention core becomes `ring_attention`, `ulysses_attention` or
  `hybrid_attention`; everything else (embeddings, norms, MLP, RoPE) is local to the sequence
  shard. Parameters are replicated over cp; the vma rule lifts them with `pvary` where they meet
  sequence-sharded activations, so their gradients come out summed over cp. The automatic lift
  happens at torch ops; a custom `torch.autograd.Function` (the layers' RMSNorm is one) hides its
  operands from it, so start the step with `params = pvary(params, cp_axes)`: one psum per
  parameter in backward, Megatron's all-reduce over the dp x cp group.
* data: tokens, targets, loss masks and position ids are permuted into the algorithm's layout
  (`cp_permute`) and split with `P(None, cp_axes)`; outputs are permuted back (`cp_unpermute`).
  RoPE tables need nothing: the model builds them from the permuted position ids.
* per-layer cores: `cp_layer_attention_fns` gives one core per layer with the KV cache only on the
  layers the cache interval selects (FEATURES.md 14); `model.apply` accepts the sequences.

Example (ring attention over 'cp' for the Llama-style model of `shardfn.layers.model`):
    >>> attn_fn, varlen_fn = cp_attention_fns("ring", axis_name="cp")
    >>> def step(params, tokens, positions):
    ...     params = pvary(params, "cp")
    ...     return model.apply(params, tokens, config=cfg, position_ids=positions[0],
    ...                        attn_fn=attn_fn, varlen_fn=varlen_fn)
    >>> logits = shard_map(step, mesh=mesh, in_specs=(None, P(None, "cp"), P(None, "cp")),
    ...                    out_specs=P(None, "cp"))(params, cp_permute(tokens, "ring", 4), ...)
"""
from __future__ import annotations

import functools

import torch

from shardfn.primitives.hybrid import hybrid_attention
from shardfn.primitives.ring_attention import kv_cache_policy_for_layer, ring_attention
from shardfn.primitives.ulysses import ulysses_attention
from shardfn.primitives.zigzag import (
    varlen_zigzag_indices,
    varlen_zigzag_shard,
    varlen_zigzag_unshard,
    zigzag_shard,
    zigzag_unshard,
)

__all__ = ["cp_attention_fns", "cp_layer_attention_fns", "cp_permute", "cp_unpermute", "cp_position_ids"]

_ALGOS = ("ring", "ulysses", "hybrid")


def cp_attention_fns(algo: str = "ring", **options):
    """(attn_fn, varlen_fn) with the signatures `layers.attention_block.apply` expects.

    Args:
        algo: "ring", "ulysses" or "hybrid".
        **options: passed to the algorithm (axis_name / ulysses_axis / ring_axis, layout,
            window_size, kv_cache, kv_comm, ...).

    Returns:
        `attn_fn(q, k, v, *, causal, mask=None, bias=None, dropout_p=0.0, generator=None)` and
        `varlen_fn(q, k, v, cu_seqlens, *, causal)` (cu_seqlens global, in original positions).
    """
    if algo not in _ALGOS:
        raise ValueError(f"cp_attention_fns: algo={algo!r} must be one of {_ALGOS}.")
    fn = {"ring": ring_attention, "ulysses": ulysses_attention, "hybrid": hybrid_attention}[algo]
    attn = functools.partial(fn, **options)

    def attn_fn(q, k, v, *, causal=True, mask=None, bias=None, dropout_p=0.0, generator=None):
        return attn(q, k, v, causal=causal, mask=mask, bias=bias, dropout_p=dropout_p, generator=generator)

    def varlen_fn(q, k, v, cu_seqlens, *, causal=True):
        return attn(q, k, v, causal=causal, cu_seqlens=cu_seqlens)

    return attn_fn, varlen_fn


def cp_layer_attention_fns(algo: str = "ring", *, num_layers: int, kv_cache: str | None,
                           cache_interval: int = 0, **options) -> tuple[tuple, tuple]:
    """Per-layer (attn_fns, varlen_fns) with the CP KV cache only on the layers the interval selects.

    FEATURES.md 14: 1-based layer l caches when `kv_cache_policy_for_layer(l, kv_cache, cache_interval)`
    says so (interval 0: every layer; interval k: l % (k + 1) == 1); the other layers run the same
    algorithm without a cache. Pass both tuples to `layers.model.apply` (attn_fn=, varlen_fn=), which
    gives block i the i-th entry.

    Args:
        algo: "ring", "ulysses" or "hybrid" (as in `cp_attention_fns`).
        num_layers: the model's layer count.
        kv_cache: the policy of the caching layers: None, "full" or "half" ("full" only for
            "ulysses", whose cache keeps the pre-communication K and V together).
        cache_interval: `--context-parallel-cache-interval`, 0 <= k < num_layers.
        **options: passed to the algorithm (axis names, layout, window_size, ...), except kv_cache.

    Returns:
        (attn_fns, varlen_fns): tuples of `num_layers` functions as `cp_attention_fns` returns.

    Example:
        >>> attn_fns, varlen_fns = cp_layer_attention_fns("ring", num_layers=4, kv_cache="full",
        ...                                               cache_interval=2, axis_name="cp")
        >>> # layers 1 and 4 (1-based) keep their K/V blocks for backward; layers 2 and 3 re-circulate them
        >>> model.apply(params, tokens, position_ids=pos, attn_fn=attn_fns, varlen_fn=varlen_fns)
    """
    api = "cp_layer_attention_fns"
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"{api}: num_layers={num_layers!r} must be an int >= 1.")
    if "kv_cache" in options:
        raise ValueError(f"{api}: pass the cache policy as kv_cache=, not inside **options.")
    if kv_cache is not None and not 0 <= cache_interval < num_layers:
        raise ValueError(
            f"{api}: cache_interval={cache_interval!r} must satisfy 0 <= k < num_layers={num_layers} "
            f"(0 caches every layer)."
        )
    if algo == "ulysses" and kv_cache == "half":
        raise ValueError(
            f"{api}: algo='ulysses' has no 'half' KV cache (it keeps the pre-communication K and V together); "
            f"use kv_cache='full' or None."
        )
    fns = {}
    for layer in range(1, num_layers + 1):
        policy = kv_cache_policy_for_layer(layer, kv_cache, cache_interval)
        if policy not in fns:
            cache = policy is not None if algo == "ulysses" else policy
            fns[policy] = cp_attention_fns(algo, kv_cache=cache, **options)
    per_layer = [fns[kv_cache_policy_for_layer(layer, kv_cache, cache_interval)] for layer in range(1, num_layers + 1)]
    return tuple(f[0] for f in per_layer), tuple(f[1] for f in per_layer)


def _ring_degree(algo, cp_size, ring_size):
    if algo == "ulysses":
        return None
    return cp_size if ring_size is None else ring_size


def cp_permute(x: torch.Tensor, algo: str, cp_size: int, *, dim: int = 1, layout: str = "zigzag",
               ring_size: int | None = None, cu_seqlens=None, pad_value=0) -> torch.Tensor:
    """Put a global sequence tensor in the layout `algo` expects before splitting it with P(None, cp).

    Args:
        x: global `[b, s, ...]` (or the sequence at `dim`).
        algo: "ring", "ulysses" (no permutation) or "hybrid".
        cp_size: the total cp degree.
        dim: the sequence dim.
        layout: "zigzag" or "contiguous" (ring and hybrid).
        ring_size: hybrid's ring degree r.
        cu_seqlens: packed documents: per-document padded zigzag (ring/hybrid with "zigzag").
        pad_value: fill of pad slots.
    """
    r = _ring_degree(algo, cp_size, ring_size)
    if r is None or layout == "contiguous":
        return x
    if cu_seqlens is not None:
        return varlen_zigzag_shard(x, cu_seqlens, r, dim=dim, pad_value=pad_value)
    return zigzag_shard(x, r, dim)


def cp_unpermute(x: torch.Tensor, algo: str, cp_size: int, *, dim: int = 1, layout: str = "zigzag",
                 ring_size: int | None = None, cu_seqlens=None) -> torch.Tensor:
    """Undo `cp_permute` (pad slots dropped)."""
    r = _ring_degree(algo, cp_size, ring_size)
    if r is None or layout == "contiguous":
        return x
    if cu_seqlens is not None:
        return varlen_zigzag_unshard(x, cu_seqlens, r, dim=dim)
    return zigzag_unshard(x, r, dim)


def cp_position_ids(seq_len: int, algo: str, cp_size: int, *, layout: str = "zigzag",
                    ring_size: int | None = None, cu_seqlens=None) -> torch.Tensor:
    """Position ids `[s']` in the permuted layout; with cu_seqlens they restart per document (EOD reset).

    Pad slots get position 0.
    """
    r = _ring_degree(algo, cp_size, ring_size)
    if cu_seqlens is None:
        return cp_permute(torch.arange(seq_len), algo, cp_size, dim=0, layout=layout, ring_size=ring_size)
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int64)
    if r is None or layout == "contiguous":
        pos = torch.arange(seq_len)
    else:
        pos = varlen_zigzag_indices(cu, r)
    doc = torch.searchsorted(cu, pos.clamp(min=0), right=True) - 1
    start = cu[doc.clamp(max=cu.numel() - 2)]
    return torch.where((pos >= 0) & (pos < cu[-1]), pos - start, torch.zeros_like(pos))
