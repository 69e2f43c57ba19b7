"""ALiBi (Press et al., arXiv 2108.12409; FEATURES.md 36): per-head linear attention biases."""
from __future__ import annotations

import math

import torch

__all__ = ["alibi_slopes", "alibi_bias"]


def _power_of_two_slopes(n: int) -> list[float]:
    start = 2.0 ** (-8.0 / n)
    return [start ** (k + 1) for k in range(n)]


def alibi_slopes(num_heads: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Return the ALiBi slope of each head `[num_heads]`.

    For n a power of two: ``slope_k = 2^(-8 (k+1) / n)``. Otherwise the slopes of the nearest
    lower power of two P, then every other slope of the 2P sequence, n in total. Under TP,
    rank r takes the contiguous block ``[r n/t, (r+1) n/t)``.
    """
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads={num_heads!r} must be a positive int.")
    p = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = _power_of_two_slopes(p)
    if p < num_heads:
        slopes += _power_of_two_slopes(2 * p)[0::2][: num_heads - p]
    return torch.tensor(slopes, dtype=torch.float64, device=device).to(dtype)


def alibi_bias(slopes: torch.Tensor, s_q: int, s_k: int | None = None, *, q_start: int = 0, kv_start: int = 0,
               symmetric: bool = False, dtype=torch.float32) -> torch.Tensor:
    """Return the ALiBi bias `[heads, s_q, s_k]`: ``slope_h * (j - i)`` for query i, key j.

    The absolute positions are ``i = q_start + row``, ``j = kv_start + col``, so a ring-attention
    block's bias equals the matching slice of the full bias (FA v2's q/kv start indices).
    Under a causal mask the kept entries are <= 0. Pass it as ``attention(..., bias=...)``.

    Args:
      slopes: `[heads]` from ``alibi_slopes``.
      s_q: query block length.
      s_k: key block length (default s_q).
      q_start: absolute position of the first query.
      kv_start: absolute position of the first key.
      symmetric: use ``-|j - i|`` (MindSpeed's alibi_diagonal_opposite).
      dtype: result dtype.

    Returns:
      `[heads, s_q, s_k]`.
    """
    s_k = s_q if s_k is None else s_k
    i = torch.arange(q_start, q_start + s_q, dtype=torch.float64, device=slopes.device)[:, None]
    j = torch.arange(kv_start, kv_start + s_k, dtype=torch.float64, device=slopes.device)[None, :]
    rel = j - i
    if symmetric:
        rel = -rel.abs()
    return (slopes.to(torch.float64)[:, None, None] * rel).to(dtype)
