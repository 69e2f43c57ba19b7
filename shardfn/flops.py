"""FLOP counting (FEATURES.md 46) on torch's FlopCounterMode, with recorded vs traversed totals.

Convention: a multiply-add is 2 FLOPs; only matmul-like ops count (mm, bmm, addmm, convolution,
attention kernels as ``4 b h s_q s_k d`` forward and twice that backward); elementwise ops,
softmax and norms count 0; causal masking is not discounted. "traversed" counts every op run
(hardware FLOPs, HFU); "recorded" leaves out forwards re-run by recomputation (model FLOPs, MFU),
including the q k^T that a flash-attention backward recomputes inside its kernel.
"""
from __future__ import annotations

import contextlib

import attrs
import optree
import torch
from torch.utils import flop_counter as _fc
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

__all__ = ["FlopCount", "count", "recomputing"]

_aten = torch.ops.aten


def _cpu_flash_fwd(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_flop_count(q, k, v)


def _cpu_flash_bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_backward_flop_count(grad_out, q, k, v)


# The CPU flash kernel is not in torch's registry; it costs what the other SDPA kernels cost.
_CUSTOM = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_fwd,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_bwd,
}


_FLASH_BACKWARDS = {
    _aten._scaled_dot_product_flash_attention_for_cpu_backward,
    _aten._scaled_dot_product_flash_attention_backward,
    _aten._scaled_dot_product_efficient_attention_backward,
    _aten._scaled_dot_product_cudnn_attention_backward,
}


class _Counter(_fc.FlopCounterMode):
    """FlopCounterMode that also sums the FLOPs run inside ``recomputing()``."""

    def __init__(self):
        super().__init__(display=False, custom_mapping=_CUSTOM)
        self.recompute_depth = 0
        self.recompute_flops = 0

    def _count_flops(self, func_packet, out, args, kwargs):
        if self.recompute_depth and func_packet in self.flop_registry:
            self.recompute_flops += self.flop_registry[func_packet](*args, **kwargs, out_val=out)
        elif func_packet in _FLASH_BACKWARDS:
            # A flash backward first recomputes the scores q k^T: hardware work, not model work.
            q, k = args[1], args[2]
            b, h, s_q, d = q.shape
            self.recompute_flops += 2 * b * h * s_q * k.shape[-2] * d
        return super()._count_flops(func_packet, out, args, kwargs)


@contextlib.contextmanager
def recomputing():
    """Mark the ops run inside as a recomputation for any active ``count``.

    Recompute helpers (``shardfn.layers.recompute``, ``shardfn.memory``) enter it around the
    forward they re-run; it costs nothing when no count is active.
    """
    counters = [m.counter for m in _get_current_dispatch_mode_stack() if isinstance(getattr(m, "counter", None), _Counter)]
    for c in counters:
        c.recompute_depth += 1
    try:
        yield
    finally:
        for c in counters:
            c.recompute_depth -= 1


@attrs.frozen
class FlopCount:
    """FLOPs of one forward (and backward) of a function.

    Attributes:
      forward: FLOPs of the forward call.
      backward: FLOPs of the backward, including recomputed forwards.
      recompute: FLOPs of forwards re-run during backward.
      by_op: traversed FLOPs per aten op name.
    """

    forward: int
    backward: int
    recompute: int
    by_op: dict = attrs.field(factory=dict, eq=False, repr=False)

    @property
    def traversed(self) -> int:
        """Everything run: forward + backward (incl. recompute); the HFU numerator."""
        return self.forward + self.backward

    @property
    def recorded(self) -> int:
        """Model FLOPs, recomputation left out; the MFU numerator."""
        return self.traversed - self.recompute


def _graph_leaves(outs):
    """The leaf tensors (AccumulateGrad nodes) the outputs' graph reaches."""
    leaves, seen = [], set()
    stack = [t.grad_fn for t in outs if t.grad_fn is not None]
    stack += [None] if any(t.grad_fn is None for t in outs) else []
    leaves += [t for t in outs if t.grad_fn is None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return leaves


def count(fn, *args, backward: bool = True, **kwargs) -> FlopCount:
    """Count the FLOPs of ``fn(*args, **kwargs)`` and, by default, of its backward.

    The backward differentiates every output that requires grad, with ones as the cotangent,
    w.r.t. every leaf of its graph (arguments and closed-over parameters alike), through
    ``torch.autograd.grad``: no ``.grad`` is touched.

    Args:
      fn: the function.
      *args: its positional arguments (pytrees of tensors allowed).
      backward: also run and count the backward.
      **kwargs: its keyword arguments.

    Returns:
      A ``FlopCount``; ``.recorded`` and ``.traversed`` differ by the recomputed forwards.

    Example:
      >>> w = torch.randn(8, 4, requires_grad=True)
      >>> count(lambda x: x @ w, torch.randn(3, 8)).forward
      192
    """
    with _Counter() as counter:
        out = fn(*args, **kwargs)
        fwd = counter.get_total_flops()
        if backward:
            outs = [t for t in optree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
            leaves = _graph_leaves(outs)
            if outs and leaves:
                torch.autograd.grad(outs, leaves, [torch.ones_like(t) for t in outs], allow_unused=True)
        total = counter.get_total_flops()
        by_op = {str(k): v for k, v in counter.get_flop_counts().get("Global", {}).items()}
        return FlopCount(forward=fwd, backward=total - fwd, recompute=counter.recompute_flops, by_op=by_op)
