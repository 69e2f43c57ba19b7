"""The single-device reference every pipeline schedule must equal (FEATURES.md 0.3)."""

from __future__ import annotations

import torch

from shardfn.tree import tree_map

__all__ = ["sequential_reference"]


def sequential_reference(stage_fn, stage_params, microbatches, loss_fn):
    """Run microbatches 0..m-1 through every stage in order and accumulate ``loss_i / m`` gradients.

    This is what Megatron's schedules compute, so `run_pipeline` must match it (bitwise where
    each stage's weight gradients accumulate in microbatch order).

    Args:
        stage_fn: ``stage_fn(params, stage, x) -> y`` for one stage (pytrees of tensors).
        stage_params: one params pytree per stage, in stage order (not modified).
        microbatches: the microbatch pytrees; stage 0 gets ``microbatches[i]``.
        loss_fn: ``loss_fn(y, microbatch) -> scalar`` on the last stage's output.

    Returns:
        ``(mean loss, grads)``: a detached 0-d tensor and, per stage, a pytree of ``.grad`` of
        the floating-point params (None where a param got no gradient).
    """
    params = [
        tree_map(lambda t: t.detach().clone().requires_grad_(t.is_floating_point()), p) for p in stage_params
    ]
    total = 0
    for mb in microbatches:
        x = mb
        for stage, p in enumerate(params):
            x = stage_fn(p, stage, x)
        scaled = loss_fn(x, mb) / len(microbatches)
        scaled.backward()
        total = total + scaled.detach()
    return total, [tree_map(lambda t: t.grad, p) for p in params]
