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


# Calls that differentiate rather than compute a value: lifting their tensor arguments would
# replace the `inputs` of torch.autograd.grad by fresh pvary outputs that are not in the graph.
_NOT_VALUES = frozenset({torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward})


def _differentiate(func, args, kwargs):
    """Run autograd.grad/backward untouched; a gradient varies over the axes its input does."""
    out = func(*args, **kwargs)
    if func is torch.autograd.grad:
        inputs = kwargs["inputs"] if "inputs" in kwargs else args[1]
        inputs = (inputs,) if isinstance(inputs, _Tensor) else tuple(inputs)
        for x, g in zip(inputs, out):
            if isinstance(g, _Tensor):
                v = getattr(x, _ATTR, EMPTY)
                if v:
                    setattr(g, _ATTR, v)
    return out


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
        if func in _NOT_VALUES:
            return _differentiate(func, args, kwargs)
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
            from shardfn.primitives.collectives import _pvary_inplace

            _pvary_inplace(args[0], tuple(sorted(union - found[0][1])), self.ctx)
        out = func(*args, **kwargs)
        if out is None and inplace and args and isinstance(args[0], _Tensor):
            _tag(args[0], union)
        else:
            _tag(out, union)
        return out

    def _lift(self, args, kwargs, lift):
        from shardfn.primitives.collectives import _pvary_tensor

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
