"""Dropout drawn from an explicit generator, so recomputation can replay it bitwise."""
from __future__ import annotations

import torch

__all__ = ["dropout"]


def dropout(x: torch.Tensor, p: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero each element with probability p and scale the rest by ``1 / (1 - p)``.

    Args:
      x: any shape.
      p: drop probability in [0, 1); 0 returns x itself.
      generator: source of the mask (default: the global RNG).

    Returns:
      Like x. Saves the scaled mask (x's dtype, like torch's CPU dropout) for backward.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p={p} must be in [0, 1).")
    if p == 0.0:
        return x
    keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=generator)
    return x * (keep / (1.0 - p))
