"""Mixed precision: fp32 master weights in the optimizer state for low-precision params."""
from __future__ import annotations

from typing import NamedTuple

import torch

from shardfn import tree as _tree

from shardfn.optim.base import GradientTransformation, PyTree, apply_step, apply_updates

__all__ = ["MasterState", "mixed_precision"]


class MasterState(NamedTuple):
    """State of ``mixed_precision``: fp32 masters (a tree like params) and the inner state."""

    master: PyTree
    inner: PyTree


def mixed_precision(tx: GradientTransformation, *, master_dtype: torch.dtype = torch.float32) -> GradientTransformation:
    """Run ``tx`` on master copies of the params in ``master_dtype`` (Megatron's fp32 main params).

    Grads are cast to ``master_dtype``, ``tx`` updates the masters, and the params become the
    masters rounded to their own dtype (``.to``, round half to even). ``update`` returns
    ``new - old`` in ``master_dtype`` (exact through ``apply_updates`` for bf16 params unless a
    value shrinks by 2**15 in one step); ``step`` writes params and masters in place.

    Args:
        tx: Transformation for the masters, e.g. ``adamw(1e-3)``.
        master_dtype: Dtype of the masters.

    Returns:
        The wrapping transformation; state ``MasterState(master, inner)``.
    """

    def init(params):
        master = _tree.tree_map(lambda p: p.detach().to(master_dtype, copy=True), params)
        return MasterState(master, tx.init(master))

    def update(grads, state, params):
        g = _tree.tree_map(lambda x: x.to(master_dtype), grads)
        u, inner = tx.update(g, state.inner, state.master)
        master = apply_updates(state.master, u)
        ups = _tree.tree_map(lambda m, p: m.to(p.dtype).to(master_dtype) - p.to(master_dtype), master, params)
        return ups, MasterState(master, inner)

    def step(grads, state, params):
        g = _tree.tree_map(lambda x: x.to(master_dtype), grads)
        master, inner = apply_step(tx, g, state.inner, state.master)
        with torch.no_grad():
            for p, m in zip(_tree.flatten(params)[0], _tree.flatten(master)[0]):
                p.copy_(m)
        return params, MasterState(master, inner)

    return GradientTransformation(init, update, step, name=f"mixed_precision({tx.name})")
