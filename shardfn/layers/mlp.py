"""The MLP family: ``fc2(act(fc1(x)))`` with act = SwiGLU or GeLU.

For SwiGLU, fc1's weight `[2f, h]` holds the gate rows ``[0, f)`` then the up rows ``[f, 2f)``
(so ``swiglu`` of fc1's output gates with its first half). A tensor-parallel split must give
each rank its own gate and up rows (FEATURES.md 33), not a contiguous slice of fc1.
"""
from __future__ import annotations

import torch

from shardfn.layers import linear
from shardfn.layers.activations import gelu, swiglu

__all__ = ["init", "apply", "activation"]


def activation(kind: str):
    """The activation function of an MLP kind ("swiglu" or "gelu")."""
    if kind == "swiglu":
        return swiglu
    if kind == "gelu":
        return gelu
    raise ValueError(f"mlp: kind={kind!r} must be 'swiglu' or 'gelu'.")


def init(generator: torch.Generator | None, hidden: int, ffn: int, *, kind: str = "swiglu", bias: bool = False,
         std: float = 0.02, dtype=torch.float32, device=None) -> dict:
    """MLP parameters ``{"fc1": [2f or f, h], "fc2": [h, f]}`` (linear params)."""
    activation(kind)
    up = 2 * ffn if kind == "swiglu" else ffn
    return {
        "fc1": linear.init(generator, hidden, up, bias=bias, std=std, dtype=dtype, device=device),
        "fc2": linear.init(generator, ffn, hidden, bias=bias, std=std, dtype=dtype, device=device),
    }


def apply(params: dict, x: torch.Tensor, *, kind: str = "swiglu", recompute_activation: bool = False,
          column_linear=linear.apply, row_linear=linear.apply) -> torch.Tensor:
    """Apply the MLP to x `[..., h]` -> `[..., h]`.

    Args:
      params: from ``init``.
      x: `[..., h]`.
      kind: "swiglu" or "gelu".
      recompute_activation: activation-function recompute (FEATURES.md 25): the activation's
        output is freed once fc2 saved it and rebuilt just before fc2's backward (M1).
      column_linear: the function applying fc1 (TP passes a column-parallel linear).
      row_linear: the function applying fc2 (TP passes a row-parallel linear).
    """
    act = activation(kind)
    h = column_linear(params["fc1"], x)
    if not recompute_activation:
        return row_linear(params["fc2"], act(h))
    from shardfn.memory import checkpoint_without_output

    a = checkpoint_without_output(act, h)
    y = row_linear(params["fc2"], a.value)
    a.discard(until=y)
    return y
