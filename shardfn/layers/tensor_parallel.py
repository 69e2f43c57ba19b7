"""Megatron tensor-parallel layers as pure functions of local shards (FEATURES.md 6, 8, 39, 57).

Run inside shard_map with the weights split by the specs below:

    column_parallel_linear   weight [out/t, in]  P(tp, None), bias P(tp)   input shared, output split
    row_parallel_linear      weight [out, in/t]  P(None, tp), bias P()     input split, output summed
    vocab_parallel_embedding weight [V/t, h]     P(tp, None)
    vocab_parallel_cross_entropy on logits [..., V/t]: the max, the sum of exp and the target
        logit are reduced over tp; the full logits are never gathered.

Sequence parallelism (``sequence_dim`` / ``reduce="psum_scatter"``) swaps the region's entry and
exit for an all-gather and a reduce-scatter on the sequence. The gradient of a replicated weight
applied to sequence shards (norms, the row bias) comes out summed over tp because, with
check_vma=True, shard_map lifts the weight with pvary where it meets the tp-varying activation.

SP convention (PERF.md 2.2): by default autograd keeps the gathered input of a column linear for
its weight gradient (the paper's 8(t-1)/t * bsh per layer); ``keep_gathered_input=False`` keeps
only the local block and all-gathers it again in backward (Megatron-core's 10(t-1)/t with a fused
QKV, 1/t of the input memory).

Unaligned shapes (FEATURES.md 57): a local weight may hold any number of output rows (or input
columns); `gather_output` with ``out_features`` and the SP collectives with ``sequence_length`` use
the gloo-safe pad-and-trim collectives, so 1026 features or sequence positions over 4 devices work.
Bring uneven weights in with ``pad_blocks`` outside shard_map and ``trim_block`` inside; for
attention, `unaligned_attention_layout` / `unaligned_attention_specs` / `unaligned_attention_local`
split the kv groups (with their query heads) by ``tensor_split`` sizes (25 heads over 4: 7, 6, 6, 6).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from shardfn.primitives.collectives import axis_index, axis_size, pmax, psum, pvary
from shardfn.primitives.overlap import all_gather_matmul, matmul_all_reduce, matmul_reduce_scatter
from shardfn.primitives.tensor_parallel import sp_column_linear_regather, tp_enter, tp_exit
from shardfn.primitives.uneven import pad_blocks, trim_block, uneven_all_gather, uneven_psum_scatter
from shardfn.spec import P

__all__ = [
    "column_parallel_linear",
    "row_parallel_linear",
    "vocab_parallel_embedding",
    "vocab_parallel_cross_entropy",
    "column_parallel_specs",
    "row_parallel_specs",
    "vocab_parallel_embedding_specs",
    "unaligned_attention_layout",
    "unaligned_attention_specs",
    "unaligned_attention_local",
]


def _check_linear(api, params, x):
    if not isinstance(params, dict) or "weight" not in params:
        raise TypeError(f"{api}: params must be a dict with 'weight' (and optional 'bias'); got {type(params).__name__}.")
    w = params["weight"]
    if w.dim() != 2:
        raise ValueError(f"{api}: weight must be [out, in]; got shape {tuple(w.shape)}.")
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(
            f"{api}: x's last dim {x.shape[-1]} must equal the local weight's in_features {w.shape[-1]} "
            f"(weight {tuple(w.shape)}). A row-parallel weight takes the column layer's split output."
        )
    return w, params.get("bias")


def column_parallel_linear(params: dict, x: torch.Tensor, *, axis_name="tp", gather_output: bool = False,
                           out_features: int | None = None, sequence_dim: int | None = None,
                           sequence_length: int | None = None, num_chunks: int = 1,
                           keep_gathered_input: bool = True) -> torch.Tensor:
    """Column-parallel linear ``Y_r = X W_r^T + b_r``: each device computes its block of output features.

    Args:
        params: ``{"weight": [out_r, in], "bias": [out_r]?}``, this device's output rows.
        x: TP: ``[..., in]`` shared by the tp group. SP: this device's sequence block
            ``[b, s_r, in]`` (all-gathered along ``sequence_dim`` first).
        axis_name: the tensor-parallel axis.
        gather_output: all-gather the output features (uneven when ``out_features`` is not a
            multiple of tp); the result is then ``[..., out]``.
        out_features: the global out size, needed by gather_output when the split is uneven
            (default ``out_r * tp``).
        sequence_dim: None for TP; the sequence dim of x for SP.
        sequence_length: SP with an uneven sequence split: the global s.
        num_chunks: SP only: CoC chunks of the all-gather + matmul (FEATURES.md 39); 1 = no chunking.
        keep_gathered_input: SP only. True (default): autograd keeps the gathered input for dW
            (PERF.md 2.2's paper convention, 8(t-1)/t * bsh per layer). False: keep only the local
            block and all-gather it again in backward (Megatron-core, 10(t-1)/t with fused QKV).

    Returns:
        ``[..., out_r]`` (``[b, s, out_r]`` under SP), varying over ``axis_name``; ``[..., out]``
        with gather_output. Transpose of the entry: psum of dX (TP) or its reduce-scatter (SP).

    Example:
        >>> f = shard_map(lambda p, x: column_parallel_linear(p, x), mesh=mesh,
        ...               in_specs=(column_parallel_specs(params), P()), out_specs=P(None, 'tp'))
    """
    api = "column_parallel_linear"
    w, b = _check_linear(api, params, x)
    if not keep_gathered_input:
        if sequence_dim is None or sequence_length is not None or num_chunks != 1:
            raise ValueError(
                f"{api}: keep_gathered_input=False re-gathers the SP input in backward; it needs sequence_dim, an "
                f"even sequence split (sequence_length=None) and num_chunks=1."
            )
        y = sp_column_linear_regather(x, w, b, axis_name, sequence_dim=sequence_dim)
    elif num_chunks != 1:
        if sequence_dim is None or sequence_length is not None:
            raise ValueError(
                f"{api}: num_chunks={num_chunks} chunks the sequence all-gather, so it needs sequence_dim (SP) "
                f"and an even sequence split (CoC is incompatible with unaligned linear, FEATURES.md 39)."
            )
        y = all_gather_matmul(x, w, axis_name, dim=sequence_dim, num_chunks=num_chunks)
        y = y if b is None else y + b
    else:
        y = F.linear(tp_enter(x, axis_name, sequence_dim=sequence_dim, sequence_length=sequence_length), w, b)
    if gather_output:
        total = w.shape[0] * axis_size(axis_name) if out_features is None else out_features
        y = uneven_all_gather(y, axis_name, dim=y.dim() - 1, total=total, invariant=True)
    return y


def row_parallel_linear(params: dict, x: torch.Tensor, *, axis_name="tp", reduce: str = "psum",
                        sequence_dim: int = 1, num_chunks: int = 1) -> torch.Tensor:
    """Row-parallel linear ``Y = sum_r X_r W_r^T + b``: partial products summed over the tp group.

    Args:
        params: ``{"weight": [out, in_r], "bias": [out]?}``; the bias is added once, after the sum.
        x: ``[..., in_r]``, this device's input features (a column layer's output).
        axis_name: the tensor-parallel axis.
        reduce: "psum" (TP: all-reduce, Megatron's g) or "psum_scatter" (SP: reduce-scatter on
            ``sequence_dim``; an uneven sequence keeps `split_sizes` blocks).
        sequence_dim: the sequence dim for reduce="psum_scatter" (and the chunked dim for CoC).
        num_chunks: CoC chunks of the matmul + collective (FEATURES.md 39); 1 = no chunking.

    Returns:
        ``[..., out]`` invariant over tp (psum), or ``[b, s_r, out]`` varying over tp (psum_scatter).
    """
    api = "row_parallel_linear"
    w, b = _check_linear(api, params, x)
    if reduce not in ("psum", "psum_scatter"):
        raise ValueError(f"{api}: reduce={reduce!r} must be 'psum' or 'psum_scatter'.")
    if num_chunks != 1:
        if reduce == "psum":
            y = matmul_all_reduce(x, w, axis_name, dim=sequence_dim, num_chunks=num_chunks)
        else:
            y = matmul_reduce_scatter(x, w, axis_name, dim=sequence_dim, num_chunks=num_chunks)
    else:
        y = tp_exit(F.linear(x, w), axis_name, reduce=reduce, sequence_dim=sequence_dim)
    if b is not None and reduce == "psum_scatter":
        b = pvary(b, axis_name)  # the bias meets sequence shards: its gradient sums over tp (also with check_vma=False)
    return y if b is None else y + b


def vocab_parallel_embedding(params: dict, tokens: torch.Tensor, *, axis_name="tp", reduce: str = "psum",
                             sequence_dim: int = 1) -> torch.Tensor:
    """Look up token ids in a vocab-split embedding: own range looked up, others zero, summed over tp.

    Args:
        params: ``{"weight": [V/t, h]}``, this device's vocab rows ``[r*V/t, (r+1)*V/t)``.
        tokens: int ``[b, s]``, the same on every device of the tp group.
        axis_name: the tensor-parallel axis.
        reduce: "psum" (output ``[b, s, h]`` shared) or "psum_scatter" (SP: output
            ``[b, s_r, h]``, the sequence block of this device).
        sequence_dim: the sequence dim for reduce="psum_scatter".

    Returns:
        ``[b, s, h]`` or ``[b, s_r, h]``. The weight gradient lands only on the owning device's rows.
    """
    w = params["weight"]
    if tokens.dtype.is_floating_point:
        raise TypeError(f"vocab_parallel_embedding: tokens must be integer ids; got dtype {tokens.dtype}.")
    v_local = w.shape[0]
    start = axis_index(axis_name) * v_local
    local = tokens - start
    inside = (local >= 0) & (local < v_local)
    out = F.embedding(torch.where(inside, local, torch.zeros_like(local)), w)
    out = out * inside.unsqueeze(-1).to(out.dtype)
    if reduce == "psum":
        return psum(out, axis_name)
    if reduce == "psum_scatter":
        return uneven_psum_scatter(out, axis_name, dim=sequence_dim)
    raise ValueError(f"vocab_parallel_embedding: reduce={reduce!r} must be 'psum' or 'psum_scatter'.")


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, axis_name="tp") -> torch.Tensor:
    """Per-token cross-entropy of vocab-split logits, without gathering them (Megatron's three reductions).

    ``loss = log(sum_v exp(l_v - m)) + m - l_target`` with the max m (pmax), the sum of exp (psum) and
    the target logit (picked on the owning device, zero elsewhere, psum) reduced over tp. The max is
    a constant for the gradient (it cancels), so its reduction carries no gradient.

    Args:
        logits: ``[..., V/t]``, this device's vocab block (the column-parallel head's output).
        targets: int ``[...]`` in ``[0, V)``, the same on every device of the group.
        axis_name: the tensor-parallel axis.

    Returns:
        ``[...]`` fp32 (float64 for float64 logits) per-token loss, invariant over ``axis_name``.
        Gradient: ``softmax - onehot`` on each device's vocab block.
    """
    if targets.dtype.is_floating_point:
        raise TypeError(f"vocab_parallel_cross_entropy: targets must be integer ids; got dtype {targets.dtype}.")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"vocab_parallel_cross_entropy: logits {tuple(logits.shape)} must be targets' shape "
            f"{tuple(targets.shape)} plus the local vocab dim."
        )
    x = logits if logits.dtype == torch.float64 else logits.float()
    v_local = x.shape[-1]
    m = pmax(x.detach().amax(dim=-1), axis_name)  # [...]
    sum_exp = psum(torch.exp(x - m.unsqueeze(-1)).sum(dim=-1), axis_name)
    local = targets - axis_index(axis_name) * v_local
    inside = (local >= 0) & (local < v_local)
    picked = torch.gather(x, -1, torch.where(inside, local, torch.zeros_like(local)).unsqueeze(-1)).squeeze(-1)
    target_logit = psum(picked * inside.to(x.dtype), axis_name)
    return torch.log(sum_exp) + m - target_logit


def _specs(params, table, api):
    if not isinstance(params, dict) or "weight" not in params:
        raise TypeError(f"{api}: params must be a dict with 'weight'; got {params!r:.80}.")
    unknown = sorted(set(params) - set(table))
    if unknown:
        raise ValueError(f"{api}: unknown parameter keys {unknown}; expected {sorted(table)}.")
    return {k: table[k] for k in params}


def column_parallel_specs(params: dict, axis_name="tp") -> dict:
    """Specs of a column-parallel linear's params: weight ``P(tp, None)``, bias ``P(tp)``."""
    return _specs(params, {"weight": P(axis_name, None), "bias": P(axis_name)}, "column_parallel_specs")


def row_parallel_specs(params: dict, axis_name="tp") -> dict:
    """Specs of a row-parallel linear's params: weight ``P(None, tp)``, bias ``P()`` (replicated)."""
    return _specs(params, {"weight": P(None, axis_name), "bias": P()}, "row_parallel_specs")


def vocab_parallel_embedding_specs(params: dict, axis_name="tp") -> dict:
    """Specs of a vocab-parallel embedding's params: weight ``P(tp, None)``."""
    return _specs(params, {"weight": P(axis_name, None)}, "vocab_parallel_embedding_specs")


# ---- unaligned heads (FEATURES.md 57): weights follow tensor_split sizes of the kv groups -----------
def _group_dims(num_heads, num_kv_heads, head_dim):
    if num_heads % num_kv_heads:
        raise ValueError(f"unaligned attention: num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}.")
    return num_heads // num_kv_heads


def unaligned_attention_layout(params: dict, *, num_heads: int, num_kv_heads: int, head_dim: int, num_parts: int) -> dict:
    """Lay the attention params (``attention_block.init``) out for a tp split of kv groups by `split_sizes`.

    The kv groups (each with its ``num_heads / num_kv_heads`` query heads, MHA: one head per group)
    are split ``tensor_split``-style over ``num_parts`` devices, e.g. 25 heads over 4 -> 7, 6, 6, 6.
    Each weight is viewed with a leading-group dim and every device's block zero-padded to the
    largest (`pad_blocks`), so ``unaligned_attention_specs`` can split it evenly; inside shard_map
    `unaligned_attention_local` trims the padding. Differentiable (the padding's gradient is dropped).

    Returns:
        ``{"q": [G, r*d, H], "k"/"v": [G, d, H], "o": [H, G, r*d]}`` (biases ``[G, r*d]``/``[G, d]``) with
        G = ``num_parts * ceil(num_kv_heads / num_parts)``.
    """
    r = _group_dims(num_heads, num_kv_heads, head_dim)
    out = {}
    for name in ("q", "k", "v"):
        width = r * head_dim if name == "q" else head_dim
        p = {"weight": pad_blocks(rearrange(params[name]["weight"], "(g e) h -> g e h", e=width), num_parts, dim=0)}
        if "bias" in params[name]:
            p["bias"] = pad_blocks(rearrange(params[name]["bias"], "(g e) -> g e", e=width), num_parts, dim=0)
        out[name] = p
    o = {"weight": pad_blocks(rearrange(params["o"]["weight"], "h (g e) -> h g e", e=r * head_dim), num_parts, dim=1)}
    if "bias" in params["o"]:
        o["bias"] = params["o"]["bias"]
    out["o"] = o
    return out


def unaligned_attention_specs(params: dict, axis_name="tp") -> dict:
    """Specs of `unaligned_attention_layout`'s output: the group dim split over ``axis_name``."""
    out = {name: {k: P(axis_name) for k in params[name]} for name in ("q", "k", "v")}
    out["o"] = {"weight": P(None, axis_name), **({"bias": P()} if "bias" in params["o"] else {})}
    return out


def unaligned_attention_local(params: dict, *, num_kv_heads: int, axis_name="tp") -> dict:
    """Inside shard_map: trim this device's padded block to its kv groups and flatten to linear params.

    Returns ``attention_block``-style params ``{"q": [g_r*r*d, H], "k"/"v": [g_r*d, H], "o": [H, g_r*r*d]}``
    for ``attention_block.apply`` with ``column_linear`` a local linear and ``row_linear``
    `row_parallel_linear` (x entered once with ``tp_enter``).
    """
    out = {}
    for name in ("q", "k", "v"):
        out[name] = {k: rearrange(trim_block(t, num_kv_heads, axis_name, dim=0), "g e ... -> (g e) ...")
                     for k, t in params[name].items()}
    o = {"weight": rearrange(trim_block(params["o"]["weight"], num_kv_heads, axis_name, dim=1), "h g e -> h (g e)")}
    if "bias" in params["o"]:
        o["bias"] = params["o"]["bias"]
    out["o"] = o
    return out
