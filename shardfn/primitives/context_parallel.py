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
from shardfn.primitives.ring_attention import ring_attention
from shardfn.primitives.ulysses import ulysses_attention
from shardfn.primitives.zigzag import (
    varlen_zigzag_indices,
    varlen_zigzag_shard,
    varlen_zigzag_unshard,
    zigzag_shard,
    zigzag_unshard,
)

__all__ = ["cp_attention_fns", "cp_permute", "cp_unpermute", "cp_position_ids"]

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
