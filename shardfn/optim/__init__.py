"""Functional optimizers (optax style): pure ``init``/``update`` pairs over pytrees."""
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

__all__ = [
    "AdamState",
    "EmaAdamState",
    "EmaKernelBackend",
    "EmptyState",
    "GradientTransformation",
    "SgdState",
    "adam_scalars",
    "adamw",
    "apply_step",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "ema_decay_at",
    "ema_kernel_backend",
    "ema_params",
    "flatten_params",
    "fused_ema_adamw",
    "global_norm",
    "identity",
    "sgd",
    "swap_ema",
]
