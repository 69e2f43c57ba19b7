"""Element-wise and GEMM fused ops with torch_npu / MindSpeed signatures, and their references.

RMSNorm, SwiGLU, rotary embeddings, the fp32 weight-gradient accumulation and the fused
EMA-AdamW step. Each reference is plain torch, differentiable where the NPU op is, and computes
in fp32 for half-precision inputs (float64 stays float64), casting the result back, as the
kernels do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from shardfn.npu._dispatch import npu_op

__all__ = [
    "npu_rms_norm",
    "npu_rms_norm_backward",
    "npu_swiglu",
    "npu_rotary_mul",
    "npu_rotary_position_embedding",
    "npu_matmul_add_fp32",
    "npu_apply_fused_ema_adamw",
]


def _wide(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _norm_dims(op: str, x: torch.Tensor, gamma: torch.Tensor) -> tuple[int, ...]:
    nd = gamma.ndim
    if nd == 0 or nd > x.ndim or tuple(x.shape[-nd:]) != tuple(gamma.shape):
        raise ValueError(f"{op}: gamma shape {tuple(gamma.shape)} must equal the trailing dims of x "
                         f"{tuple(x.shape)} (usually gamma is [hidden]).")
    return tuple(range(-nd, 0))


@npu_op(("torch_npu", "npu_rms_norm"))
def npu_rms_norm(x, gamma, epsilon=1e-6):
    """Apply RMSNorm over gamma's dims: ``y = x * rstd * gamma``, ``rstd = 1/sqrt(mean(x^2) + eps)``.

    Args:
        x: ``[..., h]`` (or ``[..., *gamma.shape]``), fp16/bf16/fp32.
        gamma: ``[h]``, the trailing dims of x.
        epsilon: added to the mean square.

    Returns:
        ``(y, rstd)``: ``y`` like x; ``rstd`` fp32 of shape x.shape with gamma's dims set to 1.
    """
    dims = _norm_dims("npu_rms_norm", x, gamma)
    xf = x.to(_wide(x))
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    y = (xf * rstd * gamma.to(xf.dtype)).to(x.dtype)
    return y, rstd


@npu_op(("torch_npu", "npu_rms_norm_backward"))
def npu_rms_norm_backward(dy, x, gamma, rstd):
    """Backward of :func:`npu_rms_norm` from the saved ``rstd``.

    With ``xh = x * rstd``: ``dgamma = sum_rows(dy * xh)`` and
    ``dx = rstd * (dy * gamma - xh * mean(dy * gamma * xh))`` (means over gamma's dims).

    Returns:
        ``(dx, dgamma)`` with x's and gamma's dtypes; dgamma is accumulated in fp32.
    """
    dims = _norm_dims("npu_rms_norm_backward", x, gamma)
    wt = _wide(x)
    xh = x.to(wt) * rstd.to(wt)
    g = dy.to(wt) * gamma.to(wt)
    dx = rstd.to(wt) * (g - xh * (g * xh).mean(dim=dims, keepdim=True))
    row_dims = tuple(range(x.ndim - gamma.ndim))
    dgamma = (dy.to(wt) * xh).sum(dim=row_dims) if row_dims else dy.to(wt) * xh
    return dx.to(x.dtype), dgamma.to(gamma.dtype)


@npu_op(("torch_npu", "npu_swiglu"))
def npu_swiglu(x, dim=-1):
    """SwiGLU: split x in halves ``a, b`` along ``dim``; return ``silu(a) * b``.

    Args:
        x: ``[..., 2f, ...]``; ``dim`` must have even size.
        dim: the dim holding ``[gate | up]``.

    Returns:
        ``[..., f, ...]`` in x's dtype (computed in fp32).
    """
    if x.shape[dim] % 2:
        raise ValueError(f"npu_swiglu: x.shape[{dim}]={x.shape[dim]} must be even (gate and up halves).")
    a, b = x.to(_wide(x)).chunk(2, dim=dim)
    return (F.silu(a) * b).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    pairs = rearrange(x, "... (d two) -> ... d two", two=2)
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1)
    return rearrange(rotated, "... d two -> ... (d two)")


def _rope(op: str, x, cos, sin, interleaved: bool):
    if x.shape[-1] % 2:
        raise ValueError(f"{op}: the last dim of x ({x.shape[-1]}) must be even.")
    bad = [n for n, t in (("cos", cos), ("sin", sin)) if t.shape[-1] != x.shape[-1]]
    if bad:
        raise ValueError(f"{op}: {', '.join(bad)} last dim must equal x's ({x.shape[-1]}); slice x for partial "
                         "rotary and concatenate the pass-through channels afterwards.")
    try:
        torch.broadcast_shapes(x.shape, cos.shape, sin.shape)
    except RuntimeError as exc:
        raise ValueError(f"{op}: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} do not broadcast to x "
                         f"{tuple(x.shape)}.") from exc
    wt = _wide(x)
    xf = x.to(wt)
    rot = _rotate_interleaved(xf) if interleaved else _rotate_half(xf)
    return (xf * cos.to(wt) + rot * sin.to(wt)).to(x.dtype)


@npu_op(("torch_npu", "npu_rotary_mul"))
def npu_rotary_mul(x, r1, r2, rotary_mode="half"):
    """Rotary embedding ``x * cos + rot(x) * sin`` (torch_npu's older RoPE op).

    Args:
        x: ``[..., d]``.
        r1: cos, broadcastable to x.
        r2: sin, broadcastable to x.
        rotary_mode: "half" (rotate halves, NeoX) or "interleave" (even/odd pairs, GPT-J).

    Returns:
        Tensor like x.
    """
    if rotary_mode not in ("half", "interleave"):
        raise NotImplementedError(f"npu_rotary_mul: rotary_mode={rotary_mode!r} has no reference; "
                                  "supported: 'half', 'interleave'.")
    return _rope("npu_rotary_mul", x, r1, r2, rotary_mode == "interleave")


@npu_op(("torch_npu", "npu_rotary_position_embedding"),
        ("mindspeed.ops.npu_rotary_position_embedding", "npu_rotary_position_embedding"))
def npu_rotary_position_embedding(x, cos, sin, mode=0):
    """RoPE on a 4-d tensor: ``x * cos + rot(x) * sin`` (backward: the same with ``-sin``).

    Args:
        x: ``[b, n, s, d]``, ``[b, s, n, d]`` or ``[s, b, n, d]``; d even.
        cos: broadcastable to x, e.g. ``[1, s, 1, d]`` for BSND.
        sin: like cos.
        mode: 0 rotate-half (NeoX: ``[x1, x2] -> [-x2, x1]``), 1 interleaved (GPT-J pairs).

    Returns:
        Tensor like x. Differentiable in x, cos and sin.
    """
    if x.ndim != 4:
        raise ValueError(f"npu_rotary_position_embedding: x must be 4-d (BNSD, BSND or SBND), got shape "
                         f"{tuple(x.shape)}.")
    if mode not in (0, 1):
        raise ValueError(f"npu_rotary_position_embedding: mode={mode!r} must be 0 (rotate_half) or 1 (interleaved).")
    return _rope("npu_rotary_position_embedding", x, cos, sin, mode == 1)


@npu_op(("mindspeed.ops.npu_matmul_add", "npu_matmul_add_fp32"))
def npu_matmul_add_fp32(total_input, grad_output, grad):
    """Accumulate a weight gradient in place in fp32: ``grad += grad_output^T @ total_input``.

    The product is formed and added in fp32 (no round trip through bf16), as Megatron's
    gradient-accumulation fusion does. A no-op when any dim of the inputs is 0.

    Args:
        total_input: ``[m, k]`` layer input (bf16/fp16/fp32).
        grad_output: ``[m, n]`` gradient of the layer output.
        grad: ``[n, k]`` fp32 ``main_grad``, updated in place.

    Returns:
        None (the kernel works in place), like MindSpeed's op.
    """
    if total_input.ndim != 2 or grad_output.ndim != 2 or grad.ndim != 2:
        raise ValueError("npu_matmul_add_fp32: total_input [m, k], grad_output [m, n] and grad [n, k] must be 2-d; "
                         f"got {tuple(total_input.shape)}, {tuple(grad_output.shape)}, {tuple(grad.shape)}. "
                         "Flatten the leading dims first.")
    if 0 in total_input.shape or 0 in grad_output.shape:
        return None
    m, k = total_input.shape
    if grad_output.shape[0] != m or tuple(grad.shape) != (grad_output.shape[1], k):
        raise ValueError(f"npu_matmul_add_fp32: shapes total_input {tuple(total_input.shape)}, grad_output "
                         f"{tuple(grad_output.shape)}, grad {tuple(grad.shape)} do not fit [m, k], [m, n], [n, k].")
    if grad.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"npu_matmul_add_fp32: grad must be fp32 (the main_grad buffer), got {grad.dtype}.")
    grad.addmm_(grad_output.t().to(grad.dtype), total_input.to(grad.dtype))
    return None


@npu_op(("mindspeed.ops.npu_apply_fused_ema_adamw", "npu_apply_fused_ema_adamw"))
def npu_apply_fused_ema_adamw(grad, var, m, v, s, step, lr=1e-3, ema_decay=0.9999, beta1=0.9, beta2=0.999,
                              eps=1e-8, mode=1, bias_correction=True, weight_decay=0.0):
    """One AdamW (mode 1) or Adam-L2 (mode 0) step followed by the EMA update, in place.

    Per element (FEATURES.md 28; ``bc`` = 1 if bias_correction else 0)::

        g' = g + wd * var * (1 - mode)
        m  = b1 m + (1 - b1) g';   v = b2 v + (1 - b2) g'^2
        var -= lr * ( (m / (1 - b1^step bc)) / (sqrt(v / (1 - b2^step bc)) + eps) + wd * var * mode )
        s  = ema_decay * s + (1 - ema_decay) * var

    The reference runs the optimizer's elementwise math (shardfn.optim.ema), so the two agree.

    ``ema_decay`` is used as given; the optimizer applies the warm-up
    ``min(decay, (1 + n) / (10 + n))`` before calling.

    Args:
        grad, var, m, v, s: fp32 tensors of one shape (gradient, parameter, moments, EMA).
        step: int or int64 tensor of shape (1,), the step count (1 on the first step).
        lr, ema_decay, beta1, beta2, eps, weight_decay: floats.
        mode: 1 AdamW (decoupled decay) or 0 Adam (L2 added to the gradient).
        bias_correction: whether to divide the moments by ``1 - beta^step``.

    Returns:
        ``(var, m, v, s)``: the same tensor objects, updated in place (as the kernel does).
    """
    bad = [n for n, t in (("var", var), ("m", m), ("v", v), ("s", s)) if t.shape != grad.shape]
    if bad:
        raise ValueError(f"npu_apply_fused_ema_adamw: {', '.join(bad)} must have grad's shape {tuple(grad.shape)}.")
    if mode not in (0, 1):
        raise ValueError(f"npu_apply_fused_ema_adamw: mode={mode!r} must be 1 (AdamW) or 0 (Adam).")
    n = int(step.reshape(-1)[0].item()) if isinstance(step, torch.Tensor) else int(step)
    bc = 1.0 if bias_correction else 0.0
    c1 = 1.0 - beta1**n * bc
    c2 = 1.0 - beta2**n * bc
    wd_l2, wd_dec = (weight_decay, 0.0) if mode == 0 else (0.0, weight_decay)
    # one formula for both: the optimizer issue's elementwise math (shardfn.optim.ema)
    from shardfn.optim.ema import _math

    coeffs = torch.tensor(
        [1.0 - beta1, beta2, 1.0 - beta2, wd_l2, 1.0 - lr * wd_dec, lr / c1, c2**0.5, eps, 1.0 - ema_decay],
        dtype=var.dtype, device=var.device,
    )
    with torch.no_grad():
        new = _math(var, grad.to(var.dtype), m, v, s, coeffs)
        for dst, src in zip((var, m, v, s), new):
            dst.copy_(src)
    return var, m, v, s
