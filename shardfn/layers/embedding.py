"""The embedding family: token ids `[b, s]` -> `[b, s, h]`, and tied output logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shardfn.layers.linear import normal

__all__ = ["init", "apply", "logits"]


def init(generator: torch.Generator | None, vocab_size: int, hidden: int, *, std: float = 0.02,
         dtype=torch.float32, device=None) -> dict:
    """Embedding parameters ``{"weight": [vocab, h]}`` ~ N(0, std^2)."""
    return {"weight": normal(generator, (vocab_size, hidden), std=std, dtype=dtype, device=device)}


def apply(params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Look up ``tokens`` (int `[...]`) -> `[..., h]`."""
    if tokens.dtype.is_floating_point:
        raise TypeError(f"embedding.apply: tokens must be integer ids, got dtype {tokens.dtype}.")
    return F.embedding(tokens, params["weight"])


def logits(params: dict, x: torch.Tensor) -> torch.Tensor:
    """Output logits with the embedding matrix (tied): ``x [..., h] -> [..., vocab]``."""
    return F.linear(x, params["weight"])
