"""Normalisation: ``rms_norm`` and ``layer_norm``, and the norm family (init/apply).

RMSNorm (FEATURES.md 34): ``y = x * rsqrt(mean(x^2) + eps) * weight`` with the statistics
and the product in fp32 for low-precision input, rounded once to the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shardfn.layers.vma_align import align_vma

__all__ = ["rms_norm", "layer_norm", "init", "apply"]

class _RMSNorm(torch.autograd.Function):
    """RMSNorm as one autograd node (the fused op's contract): saves x and rstd only.

    One node also means x receives one gradient from the norm, so recomputing the norm
    elsewhere (norm recompute) sums gradients in the same order: bitwise equal results.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        xc = x.to(cdtype)
        rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
        ctx.save_for_backward(x, weight, rstd)
        return (xc * rstd * weight.to(cdtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        cdtype = rstd.dtype
        xhat = x.to(cdtype) * rstd
        dyw = dy.to(cdtype) * weight.to(cdtype)
        dx = rstd * (dyw - xhat * (dyw * xhat).mean(-1, keepdim=True))
        dw = (dy.to(cdtype) * xhat).reshape(-1, x.shape[-1]).sum(0)
        return dx.to(x.dtype), dw.to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """RMS-normalise the last dim of x and scale by weight.

    ``rstd = rsqrt(mean(x^2) + eps)``, ``y = x * rstd * weight``, computed in fp32 for
    bf16/fp16 input (float64 for float64) and rounded once. Backward (FEATURES.md 34), with
    ``xhat = x * rstd``: ``dw = sum_rows dy * xhat``, ``dx = rstd (dy w - xhat mean(dy w xhat))``.
    Saves x and rstd for backward.

    Args:
      x: `[..., h]`.
      weight: `[h]`.
      eps: added to the mean square.

    Returns:
      `[..., h]` in x's dtype.
    """
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} must be [{x.shape[-1]}] (x's last dim).")
    return _RMSNorm.apply(*align_vma(x, weight), eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               eps: float = 1e-5) -> torch.Tensor:
    """Layer-normalise the last dim of x: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    Args:
      x: `[..., h]`.
      weight: `[h]`.
      bias: `[h]` or None.
      eps: added to the variance.

    Returns:
      `[..., h]` in x's dtype (torch's kernel keeps fp32 statistics for bf16 input).
    """
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"layer_norm: weight shape {tuple(weight.shape)} must be [{x.shape[-1]}] (x's last dim).")
    b = None if bias is None else bias.to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), weight.to(x.dtype), b, eps)


def init(generator: torch.Generator | None, hidden: int, *, kind: str = "rms", dtype=torch.float32,
         device=None) -> dict:
    """Norm parameters: ``{"weight": ones[h]}`` (+ ``"bias": zeros[h]`` for kind="layer").

    ``generator`` is accepted for the family's uniform signature; norms start deterministic.
    """
    if kind not in ("rms", "layer"):
        raise ValueError(f"norm.init: kind={kind!r} must be 'rms' or 'layer'.")
    params = {"weight": torch.ones(hidden, dtype=dtype, device=device)}
    if kind == "layer":
        params["bias"] = torch.zeros(hidden, dtype=dtype, device=device)
    return params


def apply(params: dict, x: torch.Tensor, *, kind: str = "rms", eps: float | None = None) -> torch.Tensor:
    """Apply the norm in ``params`` to x `[..., h]` (kind "rms" or "layer")."""
    if kind == "rms":
        return rms_norm(x, params["weight"], eps=1e-6 if eps is None else eps)
    if kind == "layer":
        return layer_norm(x, params["weight"], params.get("bias"), eps=1e-5 if eps is None else eps)
    raise ValueError(f"norm.apply: kind={kind!r} must be 'rms' or 'layer'.")
