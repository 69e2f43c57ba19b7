"""Functional optimizers (optax style): pure ``init``/``update`` pairs over pytrees.

    tx = chain(clip_by_global_norm(1.0), adamw(1e-3))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)     # pure
    params = apply_updates(params, updates)
    params, state = apply_step(tx, grads, state, params)  # in place where tx has a step

Wrappers change where state lives, not the numbers: ``mixed_precision`` (fp32 masters),
``reuse_fp32_param`` (masters sharing the bf16 params' storage), ``distributed`` (ZeRO-1 over a
mesh axis, inside shard_map; ``distributed(reuse_fp32_param(tx))`` combines the two),
``swap_optimizer`` / ``virtual_optimizer`` (host memory).
"""
from shardfn.optim.adamw import AdamState, adam_scalars, adamw
from shardfn.optim.base import (
    EmptyState,
    GradientTransformation,
    SgdState,
    apply_step,
    apply_updates,
    chain,
    identity,
    sgd,
)
from shardfn.optim.clip import clip_by_global_norm, global_norm
from shardfn.optim.distributed import DistributedReuseState, DistributedState, DistributedTransformation, distributed, opt_state_specs
from shardfn.optim.ema import (
    EmaAdamState,
    EmaKernelBackend,
    ema_decay_at,
    ema_kernel_backend,
    ema_params,
    flatten_params,
    fused_ema_adamw,
    swap_ema,
)
from shardfn.optim.master import MasterState, mixed_precision
from shardfn.optim.reuse_fp32 import ReuseFP32State, ReuseFP32Transformation, pack_fp32, reuse_fp32_param, unpack_fp32
from shardfn.optim.swap import (
    SwapState,
    SwapWindow,
    VirtualState,
    plan_virtual,
    state_nbytes,
    swap_optimizer,
    swap_windows,
    virtual_optimizer,
)

__all__ = [
    "AdamState",
    "DistributedReuseState",
    "DistributedState",
    "DistributedTransformation",
    "EmaAdamState",
    "EmaKernelBackend",
    "EmptyState",
    "MasterState",
    "ReuseFP32State",
    "ReuseFP32Transformation",
    "SwapState",
    "SwapWindow",
    "VirtualState",
    "GradientTransformation",
    "SgdState",
    "adam_scalars",
    "adamw",
    "apply_step",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "distributed",
    "ema_decay_at",
    "ema_kernel_backend",
    "ema_params",
    "flatten_params",
    "fused_ema_adamw",
    "global_norm",
    "identity",
    "mixed_precision",
    "opt_state_specs",
    "pack_fp32",
    "plan_virtual",
    "reuse_fp32_param",
    "sgd",
    "state_nbytes",
    "swap_ema",
    "swap_optimizer",
    "swap_windows",
    "unpack_fp32",
    "virtual_optimizer",
]
