"""M1, keep the view but free the bytes (FEATURES.md 0.2).

``discard_storage`` shrinks a tensor's storage to 0 bytes while every tensor sharing it (the
copies autograd saved included) keeps its shape; ``refill_storage`` grows it back and writes
values in without bumping version counters, so saved tensors stay valid.

``checkpoint_without_output`` builds the recompute pattern of norm and activation-function
recompute on top (Megatron/MindSpeed's CheckpointWithoutOutput): run f without a graph, let the
consumer save f's output, free it, and recompute it into the same storage when the gradient
reaches the consumer's output, just before the consumer's backward needs it.
"""
from __future__ import annotations

import torch

from shardfn.flops import recomputing
from shardfn.memory.rng import RngSnapshot

__all__ = ["discard_storage", "refill_storage", "checkpoint_without_output", "RecomputedOutput"]


def discard_storage(t: torch.Tensor) -> int:
    """Free t's storage (size 0) and return how many bytes it held; t keeps shape and strides."""
    st = t.untyped_storage()
    n = st.nbytes()
    st.resize_(0)
    return n


def refill_storage(t: torch.Tensor, values: torch.Tensor, nbytes: int | None = None) -> None:
    """Give t's storage back its bytes (``nbytes``, default just enough) and copy ``values`` in.

    The copy goes through a fresh tensor on the same storage, so t's version counter (and that
    of tensors autograd saved) does not change.
    """
    st = t.untyped_storage()
    need = (t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()
    st.resize_(max(need, nbytes or 0))
    view = t.new_empty(0).set_(st, t.storage_offset(), t.size(), t.stride())
    with torch.no_grad():
        view.copy_(values)


class _State:
    def __init__(self, fn, rng: RngSnapshot):
        self.fn = fn
        self.rng = rng
        self.discarded_bytes = None  # set once the output storage is freed
        self.recomputed = None  # (inputs, output) rebuilt with a graph


class _NoOutputCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state, *inputs):
        ctx.state = state
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            out = state.fn(*inputs)
        if any(out is t for t in inputs):
            out = out.clone()
        return out

    @staticmethod
    def backward(ctx, grad):
        state = ctx.state
        if state.recomputed is None:
            if state.discarded_bytes is not None:
                raise RuntimeError(
                    "checkpoint_without_output: the output was discarded but never recomputed; the"
                    " tensor passed as discard(until=...) must lie after the output's consumer."
                )
            _recompute(ctx)
        inputs, out = state.recomputed
        state.recomputed = None
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True) if wanted else ())
        return (None,) + tuple(next(grads) if t.requires_grad else None for t in inputs)


def _recompute(ctx):
    state = ctx.state
    inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
    with state.rng.replay(), torch.enable_grad(), recomputing():
        out = state.fn(*inputs)
    state.recomputed = (inputs, out)
    return out


class RecomputedOutput:
    """Handle returned by ``checkpoint_without_output``: ``.value`` and ``.discard(until=...)``."""

    def __init__(self, value: torch.Tensor, node, state: _State):
        self.value = value
        self._node = node
        self._state = state

    def discard(self, *, until: torch.Tensor) -> int:
        """Free ``value``'s bytes now; rebuild them when the gradient reaches ``until``.

        Call it after the consumer of ``value`` ran (it has saved ``value``); ``until`` is the
        consumer's output (or any tensor whose gradient arrives before the consumer's backward).

        Returns:
          The bytes freed (0 when ``value`` needs no gradient: then nothing is freed).
        """
        if not self.value.requires_grad:
            return 0  # no backward will need it: autograd saved nothing
        if not isinstance(until, torch.Tensor) or not until.requires_grad:
            raise ValueError(
                "RecomputedOutput.discard: until must be a tensor that requires grad (the consumer's"
                " output), so a hook can refill the storage before the consumer's backward."
            )
        if self._state.discarded_bytes is not None:
            raise RuntimeError("RecomputedOutput.discard: already discarded.")
        v = self.value
        node, state = self._node, self._state
        nbytes = discard_storage(v)
        storage_view = v.detach()  # same storage, no graph: refilled in place later
        state.discarded_bytes = nbytes

        def refill(grad):
            if state.recomputed is None:
                out = _recompute(node)
                refill_storage(storage_view, out.detach(), nbytes)
            return None

        until.register_hook(refill)
        return nbytes


def checkpoint_without_output(fn, *inputs: torch.Tensor, generators=()) -> RecomputedOutput:
    """Run ``fn(*inputs)`` without keeping its graph; its output can be freed and rebuilt later.

    The output is differentiable: its backward recomputes fn, with the global RNG, the inputs'
    device RNG and the given ``generators`` replayed to their state at the first call, and
    backpropagates through the rebuilt graph. Only the inputs are saved. Gradients equal plain
    autograd bitwise.

    Args:
      fn: a function of tensors returning one tensor.
      *inputs: its tensor arguments.
      generators: torch.Generators fn draws from (bind them into fn; they are replayed).

    Returns:
      A ``RecomputedOutput``; use ``.value`` as fn's output, then ``.discard(until=consumer_out)``.

    Example:
      >>> x = torch.randn(4, 8, requires_grad=True); w = torch.randn(8, 8, requires_grad=True)
      >>> a = checkpoint_without_output(torch.nn.functional.gelu, x)
      >>> y = a.value @ w          # the matmul saves a.value for dw
      >>> _ = a.discard(until=y)   # a.value's storage is now 0 bytes
      >>> y.sum().backward()       # refilled just before the matmul's backward
    """
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"checkpoint_without_output: inputs[{i}] is a {type(t).__name__}; pass tensors only"
                " and bind other arguments with functools.partial."
            )
    state = _State(fn, RngSnapshot.take(devices=[t.device for t in inputs], generators=generators))
    # Under shard_map, lift invariant inputs first so their gradients are summed (vma rule).
    from shardfn.layers.vma_align import align_vma

    value = _NoOutputCheckpoint.apply(state, *align_vma(*inputs))
    return RecomputedOutput(value, value.grad_fn, state)
