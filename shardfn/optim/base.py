"""GradientTransformation, chain, apply_updates and sgd: optax's functional optimizer shape.

An optimizer is a pair of pure functions over pytrees:

* ``init(params) -> state``
* ``update(grads, state, params) -> (updates, state)``; ``apply_updates(params, updates)``
  then gives the new parameters.

``update`` never writes into its arguments, so states can be sharded over a mesh axis, moved to
host memory or checkpointed like params. Transformations whose whole point is memory (one pass
over flat buffers, fp32 masters sharing storage with bf16 params) also carry an optional
``step(grads, state, params) -> (params, state)`` that *donates* ``params`` and ``state`` (writes
into their buffers, as JAX's ``donate_argnums`` allows) and is what ``apply_step`` runs.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import attrs
import torch

from shardfn import tree as _tree

PyTree = Any
Schedule = Callable[[int], float]
ScalarOrSchedule = Union[float, Schedule]

__all__ = [
    "GradientTransformation",
    "EmptyState",
    "SgdState",
    "apply_step",
    "apply_updates",
    "chain",
    "identity",
    "sgd",
]


@attrs.frozen
class GradientTransformation:
    """A pure optimizer: ``init(params) -> state``, ``update(grads, state, params) -> (updates, state)``.

    Attributes:
        init: Builds the optimizer state (a pytree of tensors) from the params pytree.
        update: Maps gradients (same structure as params) and the state to updates (same
            structure) and the next state. Never mutates its inputs.
        step: Optional in-place variant ``step(grads, state, params) -> (params, state)`` that
            may overwrite the buffers of ``params`` and ``state`` (they are donated) and
            returns the new params directly. ``apply_step`` uses it when present.
        name: Short name used in the repr, e.g. ``"adamw(lr=0.001)"``.
    """

    init: Callable[[PyTree], PyTree] = attrs.field(repr=False)
    update: Callable[..., tuple[PyTree, PyTree]] = attrs.field(repr=False)
    step: Optional[Callable[..., tuple[PyTree, PyTree]]] = attrs.field(default=None, repr=False)
    name: str = attrs.field(default="custom", kw_only=True)

    def __repr__(self) -> str:
        return f"GradientTransformation({self.name})"


class EmptyState(NamedTuple):
    """State of a transformation that keeps none."""


def identity() -> GradientTransformation:
    """Return the transformation that passes gradients through unchanged."""

    def init(params):
        return EmptyState()

    def update(grads, state, params=None):
        return grads, state

    return GradientTransformation(init, update, name="identity")


def _tree_map(fn, tree, *rest):
    return _tree.tree_map(fn, tree, *rest)


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """Add updates to params leaf by leaf: ``p + u``, computed in the wider dtype, cast back to p's.

    A transformation holding fp32 masters for bf16 params returns fp32 updates
    ``new_bf16 - old_bf16`` (exact for bf16 operands whose exponents differ by at most 16), so
    ``(p.float() + u).to(bfloat16)`` reproduces the master's rounding exactly.

    Args:
        params: Pytree of tensors.
        updates: Pytree with the same structure; a ``None`` leaf leaves the param unchanged.

    Returns:
        New params pytree (fresh tensors; the inputs are not modified).

    Raises:
        ValueError: If the two structures differ.
    """
    p_leaves, p_def = _tree.flatten(params)
    u_leaves, u_def = _tree.flatten(updates)
    if len(p_leaves) != len(u_leaves):
        raise ValueError(
            f"apply_updates: params has {len(p_leaves)} leaves ({p_def}) but updates has "
            f"{len(u_leaves)} ({u_def}). Pass the updates returned by the same transformation's update."
        )
    out = []
    for p, u in zip(p_leaves, u_leaves):
        if u is None:
            out.append(p)
        elif u.dtype == p.dtype:
            out.append(p + u)
        else:
            wide = torch.promote_types(p.dtype, u.dtype)
            out.append((p.to(wide) + u.to(wide)).to(p.dtype))
    return _tree.unflatten(p_def, out)


def apply_step(tx: GradientTransformation, grads: PyTree, state: PyTree, params: PyTree) -> tuple[PyTree, PyTree]:
    """Run one optimizer step and return ``(new_params, new_state)``.

    Uses ``tx.step`` (which donates ``params`` and ``state``: their buffers may be overwritten)
    when the transformation has one, else ``tx.update`` followed by ``apply_updates``.

    Args:
        tx: The transformation.
        grads: Gradient pytree, same structure as params.
        state: ``tx.init(params)`` or the state of the previous step.
        params: Current params.

    Returns:
        ``(new_params, new_state)``.
    """
    if tx.step is not None:
        return tx.step(grads, state, params)
    updates, state = tx.update(grads, state, params)
    return apply_updates(params, updates), state


def chain(*txs: GradientTransformation) -> GradientTransformation:
    """Compose transformations: the updates of each are the gradients of the next.

    Args:
        *txs: Transformations applied left to right, e.g. ``chain(clip_by_global_norm(1.0), adamw(1e-3))``.

    Returns:
        A transformation whose state is the tuple of the parts' states. Its ``step`` is the last
        part's ``step`` (if any) applied after the earlier parts' ``update``.

    Raises:
        TypeError: If an argument is not a GradientTransformation.
    """
    bad = [f"txs[{i}]={t!r} ({type(t).__name__})" for i, t in enumerate(txs) if not isinstance(t, GradientTransformation)]
    if bad:
        raise TypeError(f"chain: every argument must be a GradientTransformation; got {', '.join(bad)}.")

    def init(params):
        return tuple(t.init(params) for t in txs)

    def update(grads, state, params=None):
        new_state = []
        for t, s in zip(txs, state):
            grads, s = t.update(grads, s, params)
            new_state.append(s)
        return grads, tuple(new_state)

    step = None
    if txs and txs[-1].step is not None:
        last = txs[-1]

        def step(grads, state, params):
            new_state = []
            for t, s in zip(txs[:-1], state[:-1]):
                grads, s = t.update(grads, s, params)
                new_state.append(s)
            params, s = last.step(grads, state[-1], params)
            new_state.append(s)
            return params, tuple(new_state)

    name = "chain(" + ", ".join(t.name for t in txs) + ")"
    return GradientTransformation(init, update, step, name=name)


def resolve_lr(lr: ScalarOrSchedule, step: int) -> float:
    """Return the learning rate for 1-based ``step``: ``lr(step)`` for a schedule, else ``lr``."""
    return float(lr(step)) if callable(lr) else float(lr)


class SgdState(NamedTuple):
    """State of ``sgd``: momentum buffers (an empty tuple when momentum is 0)."""

    momentum: PyTree


def sgd(lr: float, momentum: float = 0.0, *, nesterov: bool = False, weight_decay: float = 0.0) -> GradientTransformation:
    """SGD with optional momentum, Nesterov and L2 weight decay, as ``torch.optim.SGD`` (dampening 0).

    Per element: ``d = g + wd*p``; ``buf = momentum*buf + d`` (buf starts at 0, so step 1 gives
    ``buf = d`` exactly, as torch's clone); ``d = d + momentum*buf`` (Nesterov) or ``d = buf``;
    update ``-lr*d``.

    Args:
        lr: Learning rate (> 0).
        momentum: Momentum factor in [0, 1).
        nesterov: Use Nesterov momentum (needs momentum > 0).
        weight_decay: L2 penalty added to the gradient.

    Returns:
        The transformation; state ``SgdState(momentum=tree like params | ())``.

    Raises:
        ValueError: For a non-positive lr, momentum outside [0, 1), or nesterov without momentum.
    """
    if not lr > 0:
        raise ValueError(f"sgd: lr={lr} must be > 0.")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"sgd: momentum={momentum} must be in [0, 1).")
    if nesterov and momentum == 0:
        raise ValueError("sgd: nesterov=True needs momentum > 0; pass momentum=0.9 or nesterov=False.")

    def init(params):
        if momentum == 0:
            return SgdState(())
        return SgdState(_tree_map(torch.zeros_like, params))

    def _direction(g, p, buf):
        d = g.add(p, alpha=weight_decay) if weight_decay != 0 else g
        if momentum == 0:
            return d, buf
        buf = buf.mul(momentum).add_(d)
        d = d.add(buf, alpha=momentum) if nesterov else buf
        return d, buf

    def update(grads, state, params):
        g_leaves, tdef = _tree.flatten(grads)
        p_leaves = tdef.flatten_up_to(params)
        bufs = tdef.flatten_up_to(state.momentum) if momentum else [None] * len(g_leaves)
        ups, new_bufs = [], []
        for g, p, b in zip(g_leaves, p_leaves, bufs):
            d, b = _direction(g, p, b)
            # torch's add_(d, alpha=-lr) may fuse the multiply-add, so form the new value the
            # same way and return the difference (exact whenever p2/2 <= p <= 2*p2).
            ups.append(p.add(d, alpha=-lr).sub_(p))
            new_bufs.append(b)
        mom = _tree.unflatten(tdef, new_bufs) if momentum else ()
        return _tree.unflatten(tdef, ups), SgdState(mom)

    def step(grads, state, params):
        g_leaves, tdef = _tree.flatten(grads)
        p_leaves = tdef.flatten_up_to(params)
        bufs = tdef.flatten_up_to(state.momentum) if momentum else [None] * len(g_leaves)
        with torch.no_grad():
            for g, p, b in zip(g_leaves, p_leaves, bufs):
                d = g.add(p, alpha=weight_decay) if weight_decay != 0 else g
                if momentum != 0:
                    b.mul_(momentum).add_(d)
                    d = d.add(b, alpha=momentum) if nesterov else b
                p.add_(d, alpha=-lr)
        return params, state

    return GradientTransformation(init, update, step, name=f"sgd(lr={lr}, momentum={momentum})")
