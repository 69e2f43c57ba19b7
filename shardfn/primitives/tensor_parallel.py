"""The conjugate communication points of Megatron tensor and sequence parallelism (FEATURES.md 6, 8, 0.2 M4).

A tensor-parallel region starts where a value shared by the tp group meets column-split weights and
ends where row-split weights produce partial sums:

    region entry (`tp_enter`)                      region exit (`tp_exit`)
    TP:  f = pvary      (backward: psum)           g = psum          (backward: identity)
    SP:  all_gather seq (backward: psum_scatter)   psum_scatter seq  (backward: all_gather)

With ``check_vma=True`` the TP entry is what shard_map inserts by itself where an invariant
activation meets a tp-split weight; calling `tp_enter` once per region (rather than letting every
projection lift its own copy) keeps the backward at one all-reduce per region, which is what the
volume formulas of PERF.md 2.2 count. Sequence lengths that do not divide the tp size go through the
gloo-safe uneven collectives of `shardfn.primitives.uneven`.
"""
from __future__ import annotations

from shardfn.primitives.collectives import axis_size, psum, pvary
from shardfn.primitives.uneven import uneven_all_gather, uneven_psum_scatter, uneven_slice

__all__ = ["tp_enter", "tp_exit", "scatter_to_sequence", "gather_from_sequence"]

_REDUCES = ("psum", "psum_scatter")


def tp_enter(x, axis_name="tp", *, sequence_dim: int | None = None, sequence_length: int | None = None):
    """Enter a tensor-parallel region: Megatron's ``f`` (TP) or the sequence all-gather (SP).

    Args:
        x: TP: the full activation ``[b, s, h]``, the same on every device of ``axis_name``.
            SP: this device's sequence block ``[b, s_r, h]``.
        axis_name: the tensor-parallel mesh axis.
        sequence_dim: None for TP; the sequence dim for SP (1 for ``[b, s, h]``).
        sequence_length: SP only: the global sequence length s when it is not ``s_r * tp`` (uneven
            sequence split, `split_sizes`); None means every device holds ``s / tp`` rows.

    Returns:
        ``[b, s, h]``, varying over ``axis_name``. Transpose: psum (TP) or psum_scatter over the
        sequence (SP).

    Example:
        >>> def mlp(x, w1, w2):      # x [b, s/tp, h], w1 [f/tp, h], w2 [h, f/tp]
        ...     h = tp_enter(x, 'tp', sequence_dim=1) @ w1.T
        ...     return tp_exit(gelu(h) @ w2.T, 'tp', reduce='psum_scatter', sequence_dim=1)
    """
    if sequence_dim is None:
        if sequence_length is not None:
            raise ValueError("shardfn.tp_enter: sequence_length is only meaningful with sequence_dim (SP).")
        return pvary(x, axis_name)
    n = axis_size(axis_name)
    total = x.shape[sequence_dim] * n if sequence_length is None else sequence_length
    return uneven_all_gather(x, axis_name, dim=sequence_dim, total=total)


def tp_exit(x, axis_name="tp", *, reduce: str = "psum", sequence_dim: int = 1):
    """Leave a tensor-parallel region: sum the partial results of row-split weights over ``axis_name``.

    Args:
        x: partial sums ``[b, s, h]`` (each device's row-parallel matmul).
        axis_name: the tensor-parallel mesh axis.
        reduce: "psum" (TP, Megatron's ``g``: all-reduce, result invariant) or "psum_scatter" (SP:
            reduce-scatter along ``sequence_dim``, each device keeps its `split_sizes` block).
        sequence_dim: the sequence dim for reduce="psum_scatter".

    Returns:
        ``[b, s, h]`` (psum) or ``[b, s_r, h]`` (psum_scatter). Transpose: identity or all_gather.
    """
    if reduce not in _REDUCES:
        raise ValueError(f"shardfn.tp_exit: reduce={reduce!r} must be one of {_REDUCES}.")
    if reduce == "psum":
        return psum(x, axis_name)
    return uneven_psum_scatter(x, axis_name, dim=sequence_dim)


def scatter_to_sequence(x, axis_name="tp", *, sequence_dim: int = 1):
    """Take this device's sequence block of a value shared by the tp group (SP region start).

    Returns ``[b, s_r, h]`` (`split_sizes` blocks) varying over ``axis_name``; the transpose sums the
    block gradients over the axis, so the shared value gets the whole gradient.
    """
    return uneven_slice(x, axis_name, dim=sequence_dim)


def gather_from_sequence(x, axis_name="tp", *, sequence_dim: int = 1, sequence_length: int | None = None,
                         invariant: bool = True):
    """Gather the sequence blocks of an SP activation into the full sequence (SP region end).

    Args:
        x: ``[b, s_r, h]``.
        axis_name: the tensor-parallel mesh axis.
        sequence_dim: the sequence dim.
        sequence_length: the global s when the split is uneven (None: ``s_r * tp``).
        invariant: type the result invariant over ``axis_name`` (transpose: keep this device's block,
            no communication), so it can leave shard_map under a spec that does not name the axis.
            With False the result is typed varying and the transpose is a reduce-scatter.

    Returns:
        ``[b, s, h]``.
    """
    n = axis_size(axis_name)
    total = x.shape[sequence_dim] * n if sequence_length is None else sequence_length
    return uneven_all_gather(x, axis_name, dim=sequence_dim, total=total, invariant=invariant)
