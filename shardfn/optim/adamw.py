"""AdamW with the same arithmetic, op for op, as ``torch.optim.AdamW`` (single-tensor path)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from shardfn import tree as _tree

from shardfn.optim.base import GradientTransformation, PyTree, ScalarOrSchedule, resolve_lr

__all__ = ["AdamState", "adamw", "adam_scalars"]


class AdamState(NamedTuple):
    """State of ``adamw``.

    Attributes:
        count: 0-d int64 tensor, number of steps taken.
        mu: First moments (``exp_avg``), a tree like params.
        nu: Second moments (``exp_avg_sq``), a tree like params.
    """

    count: torch.Tensor
    mu: PyTree
    nu: PyTree


def _check_hparams(api, lr, betas, eps, weight_decay):
    errors = []
    if not callable(lr) and not float(lr) >= 0:
        errors.append(f"lr={lr} must be >= 0")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        errors.append(f"betas={betas} must be two values in [0, 1)")
    if not eps >= 0:
        errors.append(f"eps={eps} must be >= 0")
    if not weight_decay >= 0:
        errors.append(f"weight_decay={weight_decay} must be >= 0")
    if errors:
        raise ValueError(f"{api}: " + "; ".join(errors) + ". Use torch.optim.AdamW's ranges.")


def adam_scalars(lr: float, betas: tuple[float, float], step: int) -> tuple[float, float]:
    """Return ``(step_size, sqrt(bias_correction2))`` in Python float64, as torch computes them.

    ``step_size = lr / (1 - b1**step)``; ``sqrt(1 - b2**step)`` via ``** 0.5``.
    """
    b1, b2 = betas
    bc1 = 1 - b1**step
    bc2 = 1 - b2**step
    return lr / bc1, bc2**0.5


def adamw(
    lr: ScalarOrSchedule,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> GradientTransformation:
    """AdamW (decoupled weight decay, Loshchilov & Hutter 2019) matching ``torch.optim.AdamW``.

    Per element, at 1-based step t (the order torch's single-tensor path uses, so moments are
    bitwise equal and ``step`` reproduces torch's params bitwise):
    ``p1 = p * (1 - lr*wd)``; ``m = lerp(m, g, 1-b1)``; ``v = v*b2 + (1-b2)*g*g``;
    ``denom = sqrt(v) / sqrt(1-b2**t) + eps``; ``p2 = p1 - lr/(1-b1**t) * m / denom``.

    ``update`` returns ``p2 - p``; ``apply_updates`` adds it back, which equals ``p2`` bitwise
    whenever ``p2/2 <= p <= 2*p2`` (Sterbenz) and otherwise differs by at most one rounding of
    the difference (see the tests for the measured bound). ``step`` (used by ``apply_step``)
    updates params and moments in place and is bitwise torch.

    Args:
        lr: Learning rate, or a schedule ``lr(step)`` of the 1-based step.
        betas: ``(b1, b2)`` in [0, 1).
        eps: Added to the denominator.
        weight_decay: Decoupled decay factor.

    Returns:
        The transformation; state ``AdamState(count, mu, nu)`` with moments in the params' dtype.

    Raises:
        ValueError: For hyperparameters outside torch's ranges.

    Example:
        >>> tx = adamw(1e-3)
        >>> params = {"w": torch.ones(3)}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.ones(3)}, state, params)
    """
    _check_hparams("adamw", lr, betas, eps, weight_decay)
    b1, b2 = betas

    def init(params):
        zeros = lambda p: torch.zeros_like(p, memory_format=torch.preserve_format)  # noqa: E731
        return AdamState(
            torch.zeros((), dtype=torch.int64),
            _tree.tree_map(zeros, params),
            _tree.tree_map(zeros, params),
        )

    def _scalars(count):
        t = int(count.item()) + 1
        lr_t = resolve_lr(lr, t)
        step_size, bc2_sqrt = adam_scalars(lr_t, betas, t)
        return lr_t, step_size, bc2_sqrt

    def update(grads, state, params):
        if params is None:
            raise ValueError("adamw.update: params=None; AdamW's weight decay needs the params.")
        lr_t, step_size, bc2_sqrt = _scalars(state.count)
        g_leaves, tdef = _tree.flatten(grads)
        p_leaves = tdef.flatten_up_to(params)
        m_leaves = tdef.flatten_up_to(state.mu)
        v_leaves = tdef.flatten_up_to(state.nu)
        ups, ms, vs = [], [], []
        for g, p, m, v in zip(g_leaves, p_leaves, m_leaves, v_leaves):
            p1 = p.mul(1 - lr_t * weight_decay) if weight_decay != 0 else p
            m = torch.lerp(m, g, 1 - b1)
            v = v.mul(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bc2_sqrt).add_(eps)
            p2 = p1.addcdiv(m, denom, value=-step_size)
            ups.append(p2.sub_(p))
            ms.append(m)
            vs.append(v)
        unflat = lambda xs: _tree.unflatten(tdef, xs)  # noqa: E731
        return unflat(ups), AdamState(state.count + 1, unflat(ms), unflat(vs))

    def step(grads, state, params):
        lr_t, step_size, bc2_sqrt = _scalars(state.count)
        g_leaves, tdef = _tree.flatten(grads)
        p_leaves = tdef.flatten_up_to(params)
        m_leaves = tdef.flatten_up_to(state.mu)
        v_leaves = tdef.flatten_up_to(state.nu)
        with torch.no_grad():
            for g, p, m, v in zip(g_leaves, p_leaves, m_leaves, v_leaves):
                if weight_decay != 0:
                    p.mul_(1 - lr_t * weight_decay)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / bc2_sqrt).add_(eps)
                p.addcdiv_(m, denom, value=-step_size)
            state.count.add_(1)
        return params, state

    name = f"adamw(lr={lr}, betas={tuple(betas)}, eps={eps}, weight_decay={weight_decay})"
    return GradientTransformation(init, update, step, name=name)
