"""The linear family: ``y = x W^T + b`` with W `[out, in]` (torch's layout).

Blocks call linears through small functions (``column_linear`` / ``row_linear`` arguments
defaulting to ``linear.apply``) so the tensor-parallel issue can pass its column- and
row-parallel versions without touching the blocks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["init", "apply", "normal"]


def normal(generator: torch.Generator | None, shape, *, std: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """Draw N(0, std^2) of the given shape from ``generator`` (default: the global RNG)."""
    out = torch.empty(shape, dtype=torch.float32, device=device)
    out.normal_(0.0, std, generator=generator)
    return out.to(dtype)


def init(generator: torch.Generator | None, in_features: int, out_features: int, *, bias: bool = False,
         std: float = 0.02, dtype=torch.float32, device=None) -> dict:
    """Linear parameters ``{"weight": [out, in]}`` (+ ``"bias": zeros[out]``), weight ~ N(0, std^2)."""
    params = {"weight": normal(generator, (out_features, in_features), std=std, dtype=dtype, device=device)}
    if bias:
        params["bias"] = torch.zeros(out_features, dtype=dtype, device=device)
    return params


def apply(params: dict, x: torch.Tensor) -> torch.Tensor:
    """``x [..., in] -> [..., out]`` with the weight (and bias) in ``params``."""
    w = params["weight"]
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(
            f"linear.apply: x's last dim {x.shape[-1]} must equal weight's in_features {w.shape[-1]}"
            f" (weight {tuple(w.shape)} is [out, in])."
        )
    return F.linear(x, w, params.get("bias"))
