"""ZeRO-1 distributed optimizer (Megatron's ``--use-distributed-optimizer``) inside shard_map.

Each step, on every device of the ``axis_name`` (dp) group:

1. the gradients of a group of leaves (same dtype, same other varying axes) are laid end to end
   in one flat fp32 buffer of N elements, zero-padded to ``Np = ceil(N/d)*d``;
2. that buffer is reduce-scattered (``psum_scatter``, tiled): device r keeps elements
   ``[r*Np/d, (r+1)*Np/d)`` of the summed gradient. Leaves whose gradient is already invariant
   over dp (reduced before) are sliced instead, so nothing is summed twice;
3. the wrapped transformation updates only that flat shard: its moments live there, and for
   non-fp32 params so does the fp32 master shard (fp32 params are their own master);
4. the new shard is all-gathered (``all_gather_invariant``) and cut back into leaves.

A parameter may straddle a shard boundary; the padding lives only in the last shard and is
inert (zero gradient, zero update). Communication per step: ``Np*(d-1)/d`` elements each for
the reduce-scatter and the gather, i.e. the ``2*Psi`` of plain DP (ZeRO paper); optimizer-state
bytes per device are ``1/d`` of the total plus padding.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import attrs
import torch

from shardfn import tree as _tree

from shardfn.optim import _mesh
from shardfn.optim.base import GradientTransformation, PyTree, apply_updates

__all__ = ["DistributedState", "DistributedTransformation", "distributed", "opt_state_specs"]


class DistributedState(NamedTuple):
    """State of ``distributed``.

    Attributes:
        master: Per leaf group, the fp32 master shard [Np/d] (non-fp32 params), or an empty fp32
            tensor [0] for fp32 groups (the params are the master).
        inner: The wrapped transformation's state over the tuple of flat group shards.
    """

    master: tuple
    inner: PyTree


@attrs.frozen
class _Group:
    dtype: torch.dtype
    axes: tuple  # mesh axes other than dp that the group's params vary over (sorted)
    leaves: tuple  # leaf indices, in params' flatten order
    numel: int
    padded: int

    def shard_len(self, d: int) -> int:
        return self.padded // d


def _groups(params_leaves: Sequence[torch.Tensor], axes_of: Sequence[frozenset], d: int, axis_name: str) -> list[_Group]:
    order: dict[tuple, list[int]] = {}
    bad = [i for i, a in enumerate(axes_of) if axis_name in a]
    if bad:
        raise ValueError(
            f"distributed: params leaves {bad} vary over the optimizer axis {axis_name!r}; ZeRO-1 expects "
            f"params replicated over {axis_name!r} (in_specs without {axis_name!r}). Shard them over another axis."
        )
    for i, (p, a) in enumerate(zip(params_leaves, axes_of)):
        order.setdefault((p.dtype, tuple(sorted(a))), []).append(i)
    out = []
    for (dtype, axes), idx in order.items():
        n = sum(params_leaves[i].numel() for i in idx)
        out.append(_Group(dtype, axes, tuple(idx), n, max(d, math.ceil(n / d) * d)))
    return out


def _flat(xs: list[torch.Tensor], padded: int) -> torch.Tensor:
    flat = torch.cat([x.reshape(-1).float() for x in xs])
    if padded > flat.numel():
        flat = torch.cat([flat, flat.new_zeros(padded - flat.numel())])
    return flat


def _my_shard(flat: torch.Tensor, axis_name: str, d: int) -> torch.Tensor:
    n = flat.numel() // d
    r = int(_mesh.axis_index(axis_name))
    return _mesh.pvary(flat, axis_name)[r * n : (r + 1) * n]


@attrs.frozen(repr=False)
class DistributedTransformation(GradientTransformation):
    """A ``GradientTransformation`` from ``distributed``; also carries what ``opt_state_specs`` needs."""

    inner: GradientTransformation = attrs.field(default=None, kw_only=True)
    axis_name: str = attrs.field(default="dp", kw_only=True)


def distributed(tx: GradientTransformation, axis_name: str = "dp", *, grad_reduce: str = "auto") -> DistributedTransformation:
    """Shard ``tx``'s state (and the fp32 masters) over mesh axis ``axis_name`` (ZeRO-1).

    Call ``init`` and ``update`` inside ``shard_map`` with params replicated over ``axis_name``.
    ``tx`` must be elementwise apart from global reductions that are vma-aware (adamw, sgd,
    fused_ema_adamw, clip_by_global_norm: the shards vary over ``axis_name``, so a global norm
    psums them there).

    Args:
        tx: The transformation to shard.
        axis_name: The data-parallel mesh axis.
        grad_reduce: ``"auto"``: a gradient leaf varying over ``axis_name`` holds this device's
            partial sum and is reduce-scattered (summed); an invariant one is already reduced and
            is sliced. ``"sum"`` / ``"mean"``: reduce-scatter every leaf (``mean`` divides by the
            axis size, Megatron's average), for ``check_vma=False`` programs.

    Returns:
        A ``DistributedTransformation``; state ``DistributedState(master, inner)`` whose flat
        shards vary over ``axis_name`` (see ``opt_state_specs``). Updates are fp32 for non-fp32
        params (``new_bf16 - old_bf16``, exact through ``apply_updates``), else the params' dtype.

    Raises:
        ValueError: For an unknown grad_reduce, or params varying over ``axis_name``.

    Example:
        >>> mesh = make_mesh((2,), ("dp",), backend="sim")
        >>> dtx = distributed(adamw(1e-3), "dp")
        >>> specs = opt_state_specs(dtx, params, P(), mesh)
        >>> state = shard_map(dtx.init, mesh=mesh, in_specs=(P(),), out_specs=specs)(params)
    """
    if grad_reduce not in ("auto", "sum", "mean"):
        raise ValueError(f"distributed: grad_reduce={grad_reduce!r}; use 'auto', 'sum' or 'mean'.")

    def _layout(params):
        leaves, tdef = _tree.flatten(params)
        d = _mesh.axis_size(axis_name)
        axes = [_mesh.vma_of(p) for p in leaves]
        return leaves, tdef, d, _groups(leaves, axes, d, axis_name)

    def init(params):
        leaves, _, d, groups = _layout(params)
        masters, shards = [], []
        for grp in groups:
            shard = _my_shard(_flat([leaves[i].detach() for i in grp.leaves], grp.padded), axis_name, d)
            shards.append(shard)
            masters.append(shard.clone() if grp.dtype != torch.float32 else torch.zeros(0))
        return DistributedState(tuple(masters), tx.init(tuple(shards)))

    def _grad_shard(grp, g_leaves, d):
        gs = [g_leaves[i] for i in grp.leaves]
        if grad_reduce == "auto":
            varying = [axis_name in _mesh.vma_of(g) for g in gs]
        else:
            varying = [True] * len(gs)
        out = None
        if any(varying):
            flat = _flat([g if v else torch.zeros_like(g) for g, v in zip(gs, varying)], grp.padded)
            out = _mesh.psum_scatter(flat, axis_name, dim=0, tiled=True)
            if grad_reduce == "mean":
                out = out / d
        if not all(varying):
            flat = _flat([torch.zeros_like(g) if v else g for g, v in zip(gs, varying)], grp.padded)
            piece = _my_shard(flat, axis_name, d)
            out = piece if out is None else out + piece
        return out

    def update(grads, state, params):
        if params is None:
            raise ValueError("distributed.update: params=None; the flat shards are cut from the params.")
        leaves, tdef, d, groups = _layout(params)
        g_leaves = tdef.flatten_up_to(grads)
        g_shards, p_shards = [], []
        for grp, master in zip(groups, state.master):
            g_shards.append(_grad_shard(grp, g_leaves, d))
            if grp.dtype == torch.float32:
                p_shards.append(_my_shard(_flat([leaves[i].detach() for i in grp.leaves], grp.padded), axis_name, d))
            else:
                p_shards.append(master)
        u_shards, inner = tx.update(tuple(g_shards), state.inner, tuple(p_shards))
        out = [None] * len(leaves)
        masters = []
        for grp, p_shard, u_shard in zip(groups, p_shards, u_shards):
            if grp.dtype == torch.float32:
                full = _mesh.all_gather_invariant(u_shard, axis_name, dim=0, tiled=True)
                masters.append(torch.zeros(0))
            else:
                new_master = apply_updates(p_shard, u_shard)
                masters.append(new_master)
                full = _mesh.all_gather_invariant(new_master.to(grp.dtype), axis_name, dim=0, tiled=True)
            pieces = torch.split(full[: grp.numel], [leaves[i].numel() for i in grp.leaves])
            for i, piece in zip(grp.leaves, pieces):
                piece = piece.view(leaves[i].shape)
                out[i] = piece if grp.dtype == torch.float32 else piece.float() - leaves[i].detach().float()
        return _tree.unflatten(tdef, out), DistributedState(tuple(masters), inner)

    return DistributedTransformation(
        init, update, name=f"distributed({tx.name}, {axis_name!r})", inner=tx, axis_name=axis_name
    )


def opt_state_specs(tx: DistributedTransformation, params: PyTree, param_specs: PyTree, mesh) -> PyTree:
    """Return the partition specs of ``tx``'s state (for shard_map out/in_specs and checkpoints).

    Each flat shard leaf gets ``P((axis_name, *group_axes))`` (its global value is the padded
    flat buffer, blocks in device order); scalars (step counters) and the empty masters of fp32
    groups get ``P()``.

    Args:
        tx: A transformation returned by ``distributed``.
        params: The global params (only shapes and dtypes are read).
        param_specs: Their specs (a pytree prefix, P or None leaves), as given to shard_map.
        mesh: The mesh.

    Returns:
        A spec tree with the structure of ``tx.init``'s result.

    Raises:
        TypeError: If tx did not come from ``distributed``.
    """
    from shardfn.spec import P, spec_axes
    from shardfn.tree import broadcast_prefix

    if not isinstance(tx, DistributedTransformation):
        raise TypeError(f"opt_state_specs: tx must come from distributed(...); got {tx!r}.")
    leaves, _ = _tree.flatten(params)
    specs = broadcast_prefix(param_specs, params, is_leaf=lambda s: isinstance(s, P) or s is None, what="opt_state_specs: param_specs")
    axes = [frozenset(spec_axes(s)) for s in specs]
    d = mesh.shape[tx.axis_name]
    groups = _groups(leaves, axes, d, tx.axis_name)
    # Abstract init on meta tensors whose lengths identify their group uniquely.
    base = 1 + max([g.shard_len(d) for g in groups] + [0])
    fake = [torch.empty(base + k, device="meta") for k in range(len(groups))]
    group_spec = [P((tx.axis_name,) + g.axes) for g in groups]

    def spec_of(x):
        if isinstance(x, torch.Tensor) and x.dim() == 1 and base <= x.numel() < base + len(groups):
            return group_spec[x.numel() - base]
        if isinstance(x, torch.Tensor) and x.dim() == 0:
            return P()
        raise ValueError(
            f"opt_state_specs: cannot place a state leaf of shape {tuple(x.shape)} of {tx.inner!r}; "
            "distributed() supports transformations whose state is per-element or scalar."
        )

    inner_specs = _tree.tree_map(spec_of, tx.inner.init(tuple(fake)))
    master_specs = tuple(group_spec[k] if g.dtype != torch.float32 else P() for k, g in enumerate(groups))
    return DistributedState(master_specs, inner_specs)
