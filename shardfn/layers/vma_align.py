"""Give the inputs of a custom autograd Function one vma set before it runs.

shard_map's vma tracking lifts an invariant operand with ``pvary`` when an op mixes it with a
varying one, so its gradient comes out summed. Inside a custom ``autograd.Function`` the ops
run without a graph and that lift would be lost; lifting the inputs before ``apply`` keeps
the rule. Outside shard_map (no tensor has a vma) this does nothing.
"""
from __future__ import annotations

import torch

from shardfn.vma import vma_of

__all__ = ["align_vma"]


def align_vma(*tensors):
    """Return the tensors with every invariant one that requires grad pvary'd to the union."""
    sets = [vma_of(t) for t in tensors]
    union = frozenset().union(*sets)
    if not union:
        return tensors
    from shardfn.primitives.collectives import pvary

    return tuple(
        pvary(t, tuple(sorted(union - v))) if isinstance(t, torch.Tensor) and v != union and t.requires_grad else t
        for t, v in zip(tensors, sets)
    )
