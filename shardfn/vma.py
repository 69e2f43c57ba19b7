"""Varying-manual-axes (vma) tracking: which mesh axes a local value may differ over.

Every local tensor inside shard_map carries the set of mesh axes its value may vary over (JAX's
vma type). An input split over axis `a` varies over `a`; `axis_index(a)` varies over `a`; an op's
output varies over the union of its operands' sets; `psum`/`pmean`/`pmax`/`pmin` over `a` remove
`a`. When an op mixes an operand invariant over `a` (and needed for gradients) with one varying
over `a`, the invariant operand first goes through `pvary(x, a)`: identity forward, `psum` over
`a` backward. That is what makes the gradient of a replicated weight used by sharded activations
come out summed, with no manual step.

Tracking is a torch function mode installed in each device's thread while its program runs; with
`shard_map(check_vma=False)` it is not installed and costs nothing.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["vma_of", "set_vma", "VmaMode", "EMPTY"]

EMPTY: frozenset = frozenset()
_ATTR = "_shardfn_vma"
_Tensor = torch.Tensor


_AUTOGRAD_ENTRIES = frozenset({torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward})


def vma_of(x) -> frozenset:
    """The mesh axes local tensor `x` may vary over (empty for invariant values and non-tensors)."""
    return getattr(x, _ATTR, EMPTY) if isinstance(x, _Tensor) else EMPTY


def set_vma(x: torch.Tensor, axes) -> torch.Tensor:
    """Record that `x` varies over `axes`; returns `x`."""
    if axes:
        setattr(x, _ATTR, frozenset(axes))
    elif _ATTR in getattr(x, "__dict__", ()):
        delattr(x, _ATTR)
    return x


def _tag(out, axes):
    if isinstance(out, _Tensor):
        setattr(out, _ATTR, axes)
    elif isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, _Tensor):
                setattr(o, _ATTR, axes)


def _is_inplace(func) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name in ("__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__")


class VmaMode(TorchFunctionMode):
    """Propagates vma sets through every torch op and inserts the automatic pvary."""

    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        if self.ctx.suspended:
            return func(*args, **kwargs)
        if func in _AUTOGRAD_ENTRIES:
            # autograd.grad / backward are not ops on values: lifting their arguments would pvary the
            # loss and sum its cotangent over the axes (gradients taken inside the program doubled).
            # A gradient has the vma type of the input it is taken with respect to (as in JAX).
            out = func(*args, **kwargs)
            if func is torch.autograd.grad:
                inputs = kwargs["inputs"] if "inputs" in kwargs else args[1]
                inputs = (inputs,) if isinstance(inputs, _Tensor) else tuple(inputs)
                for g, x in zip(out, inputs):
                    if isinstance(g, _Tensor):
                        setattr(g, _ATTR, getattr(x, _ATTR, EMPTY))
            return out
        found = []
        for a in args:
            if isinstance(a, _Tensor):
                found.append((a, getattr(a, _ATTR, EMPTY)))
            elif isinstance(a, (list, tuple)):
                for b in a:
                    if isinstance(b, _Tensor):
                        found.append((b, getattr(b, _ATTR, EMPTY)))
        for a in kwargs.values():
            if isinstance(a, _Tensor):
                found.append((a, getattr(a, _ATTR, EMPTY)))
        union = EMPTY
        for _, v in found:
            if v and v is not union:
                union = union | v
        if not union:
            return func(*args, **kwargs)
        inplace = _is_inplace(func)
        lift = {}
        for i, (t, v) in enumerate(found):
            if v != union and t.requires_grad and not (inplace and i == 0):
                lift[id(t)] = (t, union - v)
        if lift:
            args, kwargs = self._lift(args, kwargs, lift)
        if inplace and found and found[0][0] is args[0] and found[0][1] != union and args[0].requires_grad:
            # the mutated tensor itself becomes varying: pvary it in place so its earlier
            # history (e.g. a clone of a replicated weight) gets the psum in backward
            from shardfn.primitives.rules import _pvary_inplace

            _pvary_inplace(args[0], tuple(sorted(union - found[0][1])), self.ctx)
        out = func(*args, **kwargs)
        if out is None and inplace and args and isinstance(args[0], _Tensor):
            _tag(args[0], union)
        else:
            _tag(out, union)
        return out

    def _lift(self, args, kwargs, lift):
        from shardfn.primitives.rules import _pvary_tensor

        lifted = {}

        def fix(x):
            if isinstance(x, _Tensor) and id(x) in lift:
                if id(x) not in lifted:
                    t, axes = lift[id(x)]
                    lifted[id(x)] = _pvary_tensor(t, tuple(sorted(axes)), self.ctx)
                return lifted[id(x)]
            if isinstance(x, (list, tuple)) and any(isinstance(b, _Tensor) and id(b) in lift for b in x):
                return type(x)(fix(b) for b in x)
            return x

        return tuple(fix(a) for a in args), {k: fix(v) for k, v in kwargs.items()}


# ---- custom autograd Functions -----------------------------------------------------------------
# A torch function mode sees the ops inside a custom autograd.Function's forward but not the call
# itself, so the automatic pvary would be missing for the Function's operands and a replicated
# weight passed into one (a fused norm, an attention kernel) would get only its local gradient.
# Function.apply is therefore wrapped once: inside a tracked shard_map program it applies the same
# rule as the mode (lift operands that need gradients, tag outputs with the union); anywhere else
# it is the original apply.
_original_apply = None


def install_function_hook() -> None:
    """Wrap torch.autograd.Function.apply with the vma rule (idempotent; a no-op outside shard_map)."""
    global _original_apply
    if _original_apply is not None:
        return
    from shardfn import context

    original = torch.autograd.Function.__dict__["apply"].__func__

    def apply(cls, *args, **kwargs):
        ctx = context.current()
        if ctx is None or ctx.suspended or not ctx.check_vma:
            return original(cls, *args, **kwargs)
        return _tracked_apply(ctx, original, cls, args, kwargs)

    apply.__doc__ = original.__doc__
    torch.autograd.Function.apply = classmethod(apply)
    _original_apply = original


def _tracked_apply(ctx, original, cls, args, kwargs):
    found = [a for a in args if isinstance(a, _Tensor)]
    found += [b for a in args if isinstance(a, (list, tuple)) for b in a if isinstance(b, _Tensor)]
    found += [a for a in kwargs.values() if isinstance(a, _Tensor)]
    union = EMPTY
    for t in found:
        v = getattr(t, _ATTR, EMPTY)
        if v:
            union = union | v
    if not union:
        return original(cls, *args, **kwargs)
    lift = {}
    for t in found:
        v = getattr(t, _ATTR, EMPTY)
        if v != union and t.requires_grad:
            lift[id(t)] = (t, union - v)
    if lift:
        args, kwargs = VmaMode(ctx)._lift(args, kwargs, lift)
    prev = ctx.suspended
    ctx.suspended = True
    try:
        out = original(cls, *args, **kwargs)
    finally:
        ctx.suspended = prev
    _tag(out, union)
    return out
