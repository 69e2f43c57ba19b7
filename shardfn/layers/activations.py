"""Activation functions of the MLP: SwiGLU (FEATURES.md 33) and GeLU."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["swiglu", "gelu"]


def swiglu(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """SwiGLU: split x in halves ``a, b`` along dim and return ``silu(a) * b`` (a is the gate).

    Args:
      x: `[..., 2f, ...]` with an even size along dim.
      dim: the dim to split.

    Returns:
      `[..., f, ...]`.
    """
    n = x.shape[dim]
    if n % 2:
        raise ValueError(f"swiglu: x has odd size {n} along dim {dim}; it must hold the gate and up halves.")
    a, b = x.chunk(2, dim=dim)
    return F.silu(a) * b


def gelu(x: torch.Tensor, *, approximate: str = "none") -> torch.Tensor:
    """GeLU (exact erf form by default; ``approximate="tanh"`` for the tanh form)."""
    return F.gelu(x, approximate=approximate)
