"""The noop layer (FEATURES.md 38): a parameter-free block that returns a copy of its input.

The copy (not the input itself) keeps pipeline deallocation and autograd valid.
"""
from __future__ import annotations

import torch

__all__ = ["init", "apply"]


def init(generator: torch.Generator | None = None, *args, **kwargs) -> dict:
    """No parameters: ``{}``. Accepts and ignores a block's init arguments."""
    return {}


def apply(params: dict, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Return ``x.clone()``. Accepts and ignores a block's apply arguments."""
    if params:
        raise ValueError(f"noop.apply: params must be empty, got keys {sorted(params)}.")
    return x.clone()
