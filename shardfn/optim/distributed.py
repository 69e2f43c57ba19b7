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

``distributed(reuse_fp32_param(tx), axis_name)`` combines this with reuse-fp32-param (MindSpeed's
distributed slot overlay, FEATURES.md 29). All leaves of a group become one flat bf16 params
buffer [Np] (held in the state; the params are views into it) with shard length ``n = Np/d``
rounded up to even, and device r keeps only the 16-bit residual [n] of its fp32 master shard.
For the step, the master shard is rebuilt *inside* the params buffer: the residual goes to bf16
slot ``max(r-1, 0)`` and the device's own bf16 (slot r; rank 0 first moves it to slot 1), so the
2n slots ``[max(r-1,0)*n, max(r-1,0)*n + 2n)`` read as int32 are exactly ``pack_fp32``'s layout
and ``unpack_fp32`` turns them into the fp32 masters in place. After ``tx`` updates them,
``pack_fp32`` splits them again, the residual is kept and the new bf16 shard is all-gathered.
Per device, params + optimizer state take ``2*Np + 2*n + (tx's state)`` bytes instead of the
``2*N + 4*n' + (tx's state)`` of bf16 params with fp32 master shards: 2 bytes per parameter / d
less (10/d instead of 12/d with AdamW, when nothing is padded). ``update`` is pure, so the
overlay runs on a copy of the buffer made for the step; no donating in-place ``step`` is offered,
because on the sim backend the replicated buffer is one storage shared by all simulated devices.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import attrs
import torch

from shardfn import tree as _tree

from shardfn.optim import _mesh
from shardfn.optim.base import GradientTransformation, PyTree, apply_step, apply_updates
from shardfn.optim.reuse_fp32 import ReuseFP32Transformation, find_adam_state, no_tie_state_error, pack_fp32, unpack_fp32

__all__ = ["DistributedReuseState", "DistributedState", "DistributedTransformation", "distributed", "opt_state_specs"]


class DistributedState(NamedTuple):
    """State of ``distributed``.

    Attributes:
        master: Per leaf group, the fp32 master shard [Np/d] (non-fp32 params), or an empty fp32
            tensor [0] for fp32 groups (the params are the master).
        inner: The wrapped transformation's state over the tuple of flat group shards.
    """

    master: tuple
    inner: PyTree


class DistributedReuseState(NamedTuple):
    """State of ``distributed(reuse_fp32_param(tx), axis_name)``.

    Attributes:
        buffer: Per leaf group, the flat bf16 params buffer [Np] (zero-padded; the same on every
            device of the dp axis between steps).
        residual: Per leaf group, int16 [n = Np/d]: the low 16 bits of this device's packed fp32
            master shard (its high 16 bits are the bf16 slot r of ``buffer``).
        params: The bf16 params to train with: views into ``buffer`` (a tree like init's params).
        inner: The wrapped transformation's state over the tuple of flat master shards [n].
    """

    buffer: tuple
    residual: tuple
    params: PyTree
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


def _groups(
    params_leaves: Sequence[torch.Tensor], axes_of: Sequence[frozenset], d: int, axis_name: str, *, reuse: bool = False
) -> list[_Group]:
    """Group leaves by (dtype, other varying axes); ``reuse``: all bf16, shard length even."""
    order: dict[tuple, list[int]] = {}
    bad = [i for i, a in enumerate(axes_of) if axis_name in a]
    if bad:
        raise ValueError(
            f"distributed: params leaves {bad} vary over the optimizer axis {axis_name!r}; ZeRO-1 expects "
            f"params replicated over {axis_name!r} (in_specs without {axis_name!r}). Shard them over another axis."
        )
    for i, (p, a) in enumerate(zip(params_leaves, axes_of)):
        order.setdefault((torch.bfloat16 if reuse else p.dtype, tuple(sorted(a))), []).append(i)
    align = 2 if reuse else 1  # an even shard length keeps every 2-slot overlay int32-aligned
    out = []
    for (dtype, axes), idx in order.items():
        n = sum(params_leaves[i].numel() for i in idx)
        out.append(_Group(dtype, axes, tuple(idx), n, d * align * max(1, math.ceil(n / (d * align)))))
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


def _grad_shard(grp: _Group, g_leaves: list, d: int, axis_name: str, grad_reduce: str) -> torch.Tensor:
    """This device's fp32 shard [Np/d] of the group's summed gradient (see ``distributed``)."""
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


def _overlay_master(work: torch.Tensor, residual: torch.Tensor, r: int, n: int, tie_sign=None) -> torch.Tensor:
    """Rebuild device r's fp32 master shard in place inside the bf16 params buffer ``work``.

    Args:
        work: bf16 [>= max(r+1, 2)*n], the params buffer (slot s = elements ``[s*n, (s+1)*n)``);
            slot r holds this device's bf16 shard. Slots ``max(r-1,0)`` and ``max(r-1,0)+1`` are
            overwritten.
        residual: int16 [n], the shard's residuals.
        r: This device's index on the dp axis.
        n: Shard length (even).
        tie_sign: Deterministic mode: this shard's Adam ``exp_avg_sq`` [n] (see ``unpack_fp32``).

    Returns:
        fp32 [n] view of ``work``'s slots ``[max(r-1,0)*n, max(r-1,0)*n + 2n)``: the masters.
    """
    bits = work.view(torch.int16)
    lo = max(r - 1, 0) * n
    if r == 0:
        bits[n : 2 * n].copy_(bits[:n])  # rank 0 overlays slots 0-1: its bf16 moves to the high slot
    bits[lo : lo + n].copy_(residual)
    return unpack_fp32(bits[lo : lo + 2 * n].view(torch.int32), tie_sign)


def _split_master(work: torch.Tensor, r: int, n: int, tie_sign=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert ``_overlay_master`` after the step: return (bf16 [n] new shard view, int16 [n] residual copy)."""
    lo = max(r - 1, 0) * n
    bf16 = pack_fp32(work.view(torch.int16)[lo : lo + 2 * n].view(torch.int32), tie_sign)
    return bf16, work.view(torch.int16)[lo : lo + n].clone()


def _leaf_views(buffers: Sequence[torch.Tensor], groups: Sequence[_Group], shapes: list, tdef) -> PyTree:
    out = [None] * len(shapes)
    for buf, grp in zip(buffers, groups):
        pieces = torch.split(buf[: grp.numel], [math.prod(shapes[i]) for i in grp.leaves])
        for i, piece in zip(grp.leaves, pieces):
            out[i] = piece.view(shapes[i])
    return _tree.unflatten(tdef, out)


def _distributed_reuse(rtx: ReuseFP32Transformation, axis_name: str, grad_reduce: str) -> "DistributedTransformation":
    tx, deterministic = rtx.inner, rtx.deterministic

    def _layout(params):
        leaves, tdef = _tree.flatten(params)
        d = _mesh.axis_size(axis_name)
        groups = _groups(leaves, [_mesh.vma_of(p) for p in leaves], d, axis_name, reuse=True)
        return leaves, tdef, d, groups

    def _ties(inner, k):
        if not deterministic:
            return None
        adam = find_adam_state(inner)
        if adam is None or not isinstance(adam.nu, tuple):
            raise no_tie_state_error(tx, "distributed(reuse_fp32_param(...))")
        return adam.nu[k]

    def init(params):
        leaves, tdef, d, groups = _layout(params)
        masters = [
            _my_shard(_flat([leaves[i].detach() for i in grp.leaves], grp.padded), axis_name, d).clone() for grp in groups
        ]
        inner = tx.init(tuple(m.clone() for m in masters))
        buffers, residuals = [], []
        for k, (grp, master) in enumerate(zip(groups, masters)):
            n = grp.shard_len(d)
            word = master.view(torch.int32)
            own = pack_fp32(word, _ties(inner, k))
            residuals.append(word.view(torch.int16)[:n].clone())
            buffers.append(_mesh.all_gather_invariant(own.clone(), axis_name, dim=0, tiled=True))
        shapes = [tuple(x.shape) for x in leaves]
        return DistributedReuseState(tuple(buffers), tuple(residuals), _leaf_views(buffers, groups, shapes, tdef), inner)

    def update(grads, state, params=None):
        leaves, tdef, d, groups = _layout(state.params)
        g_leaves = tdef.flatten_up_to(grads)
        r = int(_mesh.axis_index(axis_name))
        inner = _tree.tree_map(lambda x: x.clone(), state.inner)  # pure: the step below writes in place
        works, masters, g_shards = [], [], []
        with torch.no_grad():
            for k, (grp, buf, res) in enumerate(zip(groups, state.buffer, state.residual)):
                n = grp.shard_len(d)
                work = buf.new_empty(max(d, 2) * n)  # the params buffer's workspace (2 slots when d == 1)
                work[: grp.padded].copy_(buf)
                works.append(work)
                masters.append(_overlay_master(work, res, r, n, _ties(inner, k)))
                g_shards.append(_grad_shard(grp, g_leaves, d, axis_name, grad_reduce))
            new_masters, inner = apply_step(tx, tuple(g_shards), inner, tuple(masters))
            buffers, residuals = [], []
            for k, (grp, work, master, new) in enumerate(zip(groups, works, masters, new_masters)):
                if new is not master:
                    master.copy_(new)
                n = grp.shard_len(d)
                own, res = _split_master(work, r, n, _ties(inner, k))
                residuals.append(res)
                buffers.append(_mesh.all_gather_invariant(own.clone(), axis_name, dim=0, tiled=True))
        shapes = [tuple(x.shape) for x in leaves]
        new_params = _leaf_views(buffers, groups, shapes, tdef)
        updates = _tree.tree_map(lambda new, old: new.float() - old.detach().float(), new_params, state.params)
        return updates, DistributedReuseState(tuple(buffers), tuple(residuals), new_params, inner)

    return DistributedTransformation(
        init, update, name=f"distributed({rtx.name}, {axis_name!r})", inner=tx, axis_name=axis_name, reuse=rtx
    )


@attrs.frozen(repr=False)
class DistributedTransformation(GradientTransformation):
    """A ``GradientTransformation`` from ``distributed``; also carries what ``opt_state_specs`` needs."""

    inner: GradientTransformation = attrs.field(default=None, kw_only=True)
    axis_name: str = attrs.field(default="dp", kw_only=True)
    reuse: ReuseFP32Transformation | None = attrs.field(default=None, kw_only=True)


def distributed(tx: GradientTransformation, axis_name: str = "dp", *, grad_reduce: str = "auto") -> DistributedTransformation:
    """Shard ``tx``'s state (and the fp32 masters) over mesh axis ``axis_name`` (ZeRO-1).

    Call ``init`` and ``update`` inside ``shard_map`` with params replicated over ``axis_name``.
    ``tx`` must be elementwise apart from global reductions that are vma-aware (adamw, sgd,
    fused_ema_adamw, clip_by_global_norm: the shards vary over ``axis_name``, so a global norm
    psums them there).

    ``tx = reuse_fp32_param(inner, deterministic=...)`` selects the reuse-fp32-param overlay
    (module docstring): init takes the params (any float dtype; their fp32 values are the
    masters), the state's ``params`` are the bf16 params to train with, and ``update`` ignores its
    ``params`` argument (the state holds them). ``update`` is pure: it works on a copy of the
    params buffer, then the overlay happens in that copy.

    Args:
        tx: The transformation to shard, or a ``reuse_fp32_param(...)`` of it.
        axis_name: The data-parallel mesh axis.
        grad_reduce: ``"auto"``: a gradient leaf varying over ``axis_name`` holds this device's
            partial sum and is reduce-scattered (summed); an invariant one is already reduced and
            is sliced. ``"sum"`` / ``"mean"``: reduce-scatter every leaf (``mean`` divides by the
            axis size, Megatron's average), for ``check_vma=False`` programs.

    Returns:
        A ``DistributedTransformation``; state ``DistributedState(master, inner)`` whose flat
        shards vary over ``axis_name`` (see ``opt_state_specs``). Updates are fp32 for non-fp32
        params (``new_bf16 - old_bf16``, exact through ``apply_updates``), else the params' dtype.
        With ``reuse_fp32_param`` the state is a ``DistributedReuseState`` and updates are fp32
        ``new_bf16 - old_bf16`` of its params.

    Raises:
        ValueError: For an unknown grad_reduce, or params varying over ``axis_name``; with
            ``reuse_fp32_param(deterministic=True)``, if the inner state has no AdamState.

    Example:
        >>> mesh = make_mesh((2,), ("dp",), backend="sim")
        >>> dtx = distributed(adamw(1e-3), "dp")
        >>> specs = opt_state_specs(dtx, params, P(), mesh)
        >>> state = shard_map(dtx.init, mesh=mesh, in_specs=(P(),), out_specs=specs)(params)
    """
    if grad_reduce not in ("auto", "sum", "mean"):
        raise ValueError(f"distributed: grad_reduce={grad_reduce!r}; use 'auto', 'sum' or 'mean'.")
    if isinstance(tx, ReuseFP32Transformation):
        return _distributed_reuse(tx, axis_name, grad_reduce)

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

    def update(grads, state, params):
        if params is None:
            raise ValueError("distributed.update: params=None; the flat shards are cut from the params.")
        leaves, tdef, d, groups = _layout(params)
        g_leaves = tdef.flatten_up_to(grads)
        g_shards, p_shards = [], []
        for grp, master in zip(groups, state.master):
            g_shards.append(_grad_shard(grp, g_leaves, d, axis_name, grad_reduce))
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
    groups get ``P()``. With ``reuse_fp32_param``: the bf16 params buffers get ``P(group_axes)``
    (replicated over ``axis_name``), the residuals ``P((axis_name, *group_axes))`` and the
    params views ``param_specs``.

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
    groups = _groups(leaves, axes, d, tx.axis_name, reuse=tx.reuse is not None)
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
    if tx.reuse is not None:
        buffer_specs = tuple(P(g.axes) if g.axes else P() for g in groups)
        params_specs = _tree.unflatten(_tree.flatten(params)[1], specs)
        return DistributedReuseState(buffer_specs, tuple(group_spec), params_specs, inner_specs)
    master_specs = tuple(group_spec[k] if g.dtype != torch.float32 else P() for k, g in enumerate(groups))
    return DistributedState(master_specs, inner_specs)
