"""Global-norm gradient clipping, correct inside shard_map for sharded and replicated leaves."""
from __future__ import annotations

import torch

from shardfn import tree as _tree

from shardfn.optim import _mesh
from shardfn.optim.base import EmptyState, GradientTransformation, PyTree

__all__ = ["clip_by_global_norm", "global_norm"]


def global_norm(tree: PyTree) -> torch.Tensor:
    """Return the L2 norm of all leaves of ``tree`` together (a 0-d fp32 tensor).

    Outside shard_map (every leaf invariant) this is ``torch.nn.utils.get_total_norm``'s
    value: the norm of the per-leaf norms. Inside shard_map each leaf holds one block of a
    global tensor for every mesh axis it varies over (``shardfn.vma_of``), so its sum of
    squares is ``psum``'d over exactly those axes, never over axes it is replicated on
    (that would count a replicated leaf axis_size times). Leaves are grouped by their axis
    set, so there is one psum per distinct set. This reads the vma sets, so inside shard_map it
    needs ``check_vma=True`` (with ``check_vma=False`` every leaf looks replicated).

    Args:
        tree: Pytree of tensors (local blocks inside shard_map).

    Returns:
        0-d fp32 tensor, invariant over every mesh axis.
    """
    leaves = [x for x in _tree.flatten(tree)[0] if x is not None]
    if not leaves:
        return torch.zeros(())
    groups: dict[frozenset, list[torch.Tensor]] = {}
    for x in leaves:
        groups.setdefault(_mesh.vma_of(x), []).append(x)
    if set(groups) == {frozenset()}:
        norms = [torch.linalg.vector_norm(x.float()) for x in leaves]
        return torch.linalg.vector_norm(torch.stack(norms))
    total = None
    for axes, xs in groups.items():
        sq = torch.stack([x.float().square().sum() for x in xs]).sum()
        if axes:
            sq = _mesh.psum(sq, tuple(sorted(axes)))
        total = sq if total is None else total + sq
    return total.sqrt()


def clip_by_global_norm(max_norm: float, *, eps: float = 1e-6) -> GradientTransformation:
    """Scale gradients so that their global L2 norm is at most ``max_norm`` (torch's rule).

    ``coef = min(1, max_norm / (norm + eps))``; every leaf is multiplied by ``coef``, as in
    ``torch.nn.utils.clip_grad_norm_``. The norm is ``global_norm`` (sharding-aware inside
    shard_map).

    Args:
        max_norm: Largest allowed global norm (> 0).
        eps: Added to the norm before dividing (torch uses 1e-6).

    Returns:
        A stateless transformation (state ``EmptyState()``).

    Raises:
        ValueError: If max_norm <= 0.
    """
    if not max_norm > 0:
        raise ValueError(f"clip_by_global_norm: max_norm={max_norm} must be > 0.")

    def init(params):
        return EmptyState()

    def update(grads, state, params=None):
        norm = global_norm(grads)
        coef = torch.clamp(max_norm / (norm + eps), max=1.0)
        return _tree.tree_map(lambda g: g * coef.to(g.dtype), grads), state

    return GradientTransformation(init, update, name=f"clip_by_global_norm({max_norm})")
