"""Reuse-FP32-param (MindSpeed ``--reuse-fp32-param``): fp32 masters sharing storage with bf16 params.

An fp32 value's 32 bits are ``[sign | exponent 8 | mantissa 23]``: its top 16 bits are a bf16
(the value truncated) and its low 16 bits a residual. Adding ``0x8000`` to the int32 view
carries into the top half exactly when the residual is >= 0x8000, so the top half becomes the
value rounded to nearest (ties away from zero). On a little-endian host element ``i``'s halves
sit in bf16 slots ``2i`` (residual) and ``2i+1`` (bf16); de-interleaving in place gives
``[residuals (N) | bf16 params (N)]`` in the same 4N bytes. The reverse (re-interleave, subtract
``0x8000``) restores the fp32 bits exactly, since integer add and subtract are inverses mod 2**32.

Deterministic mode makes the bf16 equal ``.to(torch.bfloat16)`` (round half to even) everywhere:
elements whose low 17 bits are ``0x08000`` (even bf16, residual exactly half) must not round up,
so 1 is subtracted after the add and the fact is kept in the sign bit of the Adam second moment
(``exp_avg_sq >= 0`` always; ``signbit`` also survives ``-0.0``, so no element loses its bit).

Storage: bf16 params + fp32 masters cost 6 bytes per parameter; here 4, exactly 2 less.
Big-endian hosts are not supported (the slot order differs): ``NotImplementedError``.
``distributed(reuse_fp32_param(tx), "dp")`` shards this over a dp axis (MindSpeed's per-rank slot
overlay): each device keeps only a 16-bit residual for its flat shard, and its fp32 master shard
is rebuilt in two slots of the bf16 params buffer during the step (see ``distributed``).
"""
from __future__ import annotations

import sys
from typing import NamedTuple, Optional

import attrs
import torch

from shardfn import tree as _tree
from einops import rearrange

from shardfn.optim.adamw import AdamState
from shardfn.optim.base import GradientTransformation, PyTree, apply_step

__all__ = ["ReuseFP32State", "ReuseFP32Transformation", "pack_fp32", "reuse_fp32_param", "unpack_fp32"]

_HALF = 0x8000
_TIE_MASK = 0x1FFFF


def _check_buffer(buffer: torch.Tensor, api: str) -> None:
    if sys.byteorder != "little":
        raise NotImplementedError(f"{api}: the bf16/residual layout assumes a little-endian host; this one is {sys.byteorder}.")
    if buffer.dtype != torch.int32 or buffer.dim() != 1 or not buffer.is_contiguous():
        raise ValueError(
            f"{api}: buffer must be a contiguous 1-d int32 tensor (the fp32 masters' bits); got "
            f"dtype={buffer.dtype}, shape={tuple(buffer.shape)}, contiguous={buffer.is_contiguous()}."
        )


def pack_fp32(buffer: torch.Tensor, tie_sign: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Turn fp32 masters into ``[residuals | bf16 params]`` in place; return the bf16 view [N].

    Args:
        buffer: int32 [N], the bit patterns of N fp32 masters.
        tie_sign: Optional fp32 [N] of non-negative values (Adam's ``exp_avg_sq``); given, the
            conversion rounds half to even and records ties in its sign bit (deterministic mode).

    Returns:
        bf16 [N] view of ``buffer``'s upper 2N bytes: the rounded params.
    """
    _check_buffer(buffer, "pack_fp32")
    if tie_sign is not None:
        tie = (buffer & _TIE_MASK) == _HALF
    buffer.add_(_HALF)
    if tie_sign is not None:
        buffer.sub_(tie.to(torch.int32))
        tie_sign.copy_(torch.where(tie, tie_sign.neg(), tie_sign))
    halves = buffer.view(torch.bfloat16)  # [2N]: r0 b0 r1 b1 ...
    halves.copy_(rearrange(halves, "(n two) -> (two n)", two=2).clone())
    return halves[buffer.numel():]


def unpack_fp32(buffer: torch.Tensor, tie_sign: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Invert ``pack_fp32`` in place (bitwise); return the fp32 [N] view of the masters.

    Args:
        buffer: int32 [N] as left by ``pack_fp32``.
        tie_sign: The same tensor given to ``pack_fp32`` (deterministic mode); its sign bits are
            read and cleared (``abs``).

    Returns:
        fp32 [N] view of ``buffer``.
    """
    _check_buffer(buffer, "unpack_fp32")
    halves = buffer.view(torch.bfloat16)
    halves.copy_(rearrange(halves, "(two n) -> (n two)", two=2).clone())
    if tie_sign is not None:
        buffer.add_(torch.signbit(tie_sign).to(torch.int32))
        tie_sign.abs_()
    buffer.sub_(_HALF)
    return buffer.view(torch.float32)


class ReuseFP32State(NamedTuple):
    """State of ``reuse_fp32_param``.

    Attributes:
        buffer: int32 [N]; between steps ``[residuals | bf16 params]``, during a step the masters.
        params: The bf16 params: views into ``buffer`` (a tree like the params given to init).
        inner: The wrapped transformation's state over the flat fp32 master [N].
    """

    buffer: torch.Tensor
    params: PyTree
    inner: PyTree


def find_adam_state(tree) -> Optional[AdamState]:
    """Return the first ``AdamState`` in ``tree`` (a state, or a chain's tuple of states), else None."""
    if isinstance(tree, AdamState):
        return tree
    if isinstance(tree, (tuple, list)):
        for x in tree:
            found = find_adam_state(x)
            if found is not None:
                return found
    return None


def _find_nu(tree) -> Optional[torch.Tensor]:
    found = find_adam_state(tree)
    return found.nu if found is not None and isinstance(found.nu, torch.Tensor) else None


def no_tie_state_error(tx: GradientTransformation, api: str) -> ValueError:
    """The error for deterministic mode over a transformation with no Adam second moment."""
    return ValueError(
        f"{api}(deterministic=True): the state of {tx!r} has no AdamState.nu to hold "
        "the tie bits. Wrap an adamw(...) (or chain ending in one), or use deterministic=False."
    )


@attrs.frozen(repr=False)
class ReuseFP32Transformation(GradientTransformation):
    """A ``GradientTransformation`` from ``reuse_fp32_param``; ``distributed`` reads its fields.

    Attributes:
        inner: The wrapped transformation on the fp32 masters.
        deterministic: Whether bf16 rounding is half to even (tie bits in Adam's ``exp_avg_sq``).
    """

    inner: GradientTransformation = attrs.field(default=None, kw_only=True)
    deterministic: bool = attrs.field(default=False, kw_only=True)


def _views(buffer: torch.Tensor, shapes_tree: PyTree) -> PyTree:
    shapes, tdef = _tree.flatten(shapes_tree, is_leaf=lambda x: isinstance(x, torch.Size))
    n = buffer.numel()
    bf16 = buffer.view(torch.bfloat16)[n:]
    sizes = [s.numel() for s in shapes]
    return _tree.unflatten(tdef, [p.view(s) for p, s in zip(torch.split(bf16, sizes), shapes)])


def reuse_fp32_param(tx: GradientTransformation, *, deterministic: bool = False) -> ReuseFP32Transformation:
    """Wrap ``tx`` so its fp32 masters and the bf16 params share one 4-byte-per-element buffer.

    ``init(params)`` takes the params (any float dtype; their fp32 values become the masters)
    and returns a ``ReuseFP32State`` whose ``params`` field holds the bf16 params to train with
    (views into the buffer). ``step`` (via ``apply_step``): re-interleave to fp32 masters, run
    ``tx`` on the flat master [N] with the fp32-cast flat grads, convert back; the returned
    params are the same views, now holding the new bf16 values. ``update`` is the pure form (it
    copies the buffer, so it saves no memory) and returns fp32 updates ``new_bf16 - old_bf16``.
    Wrapped in ``distributed(..., axis_name)`` it runs ZeRO-1 style on flat dp shards.

    Args:
        tx: Elementwise transformation on fp32 masters, e.g. ``adamw(...)``.
        deterministic: Round half to even exactly like ``.to(torch.bfloat16)``; the tie bits are
            kept in the sign of ``tx``'s Adam ``exp_avg_sq``, so ``tx`` must contain an ``adamw``.

    Returns:
        The wrapping transformation (a ``ReuseFP32Transformation``).

    Raises:
        ValueError: In deterministic mode if ``tx``'s state has no Adam second moment.
    """

    def _nu(inner):
        if not deterministic:
            return None
        nu = _find_nu(inner)
        if nu is None:
            raise no_tie_state_error(tx, "reuse_fp32_param")
        return nu

    def init(params):
        leaves, tdef = _tree.flatten(params)
        master = torch.cat([x.detach().reshape(-1).float() for x in leaves]) if leaves else torch.zeros(0)
        inner = tx.init(master.clone())
        buffer = master.view(torch.int32)
        pack_fp32(buffer, _nu(inner))
        shapes = _tree.unflatten(tdef, [x.shape for x in leaves])
        return ReuseFP32State(buffer, _views(buffer, shapes), inner)

    def step(grads, state, params=None):
        g_leaves = _tree.flatten(grads)[0]
        g = torch.cat([x.detach().reshape(-1).float() for x in g_leaves]) if g_leaves else torch.zeros(0)
        with torch.no_grad():
            master = unpack_fp32(state.buffer, _nu(state.inner))
            new_master, inner = apply_step(tx, g, state.inner, master)
            if new_master is not master:
                master.copy_(new_master)
            pack_fp32(state.buffer, _nu(inner))
        return state.params, state._replace(inner=inner)

    def update(grads, state, params=None):
        inner = _tree.tree_map(lambda x: x.clone(), state.inner)
        buffer = state.buffer.clone()
        shapes = _tree.tree_map(lambda x: x.shape, state.params)
        copy = ReuseFP32State(buffer, _views(buffer, shapes), inner)
        new_params, new_state = step(grads, copy, None)
        updates = _tree.tree_map(lambda new, old: new.float() - old.float(), new_params, state.params)
        return updates, new_state

    return ReuseFP32Transformation(
        init, update, step, name=f"reuse_fp32_param({tx.name}, deterministic={deterministic})", inner=tx, deterministic=deterministic
    )
