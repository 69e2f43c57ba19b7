"""Activation memory: measuring what autograd saves, and freeing bytes while keeping views (M1)."""
from shardfn.memory.discard import RecomputedOutput, checkpoint_without_output, discard_storage, refill_storage
from shardfn.memory.rng import RngSnapshot
from shardfn.memory.saved import saved_activation_bytes, saved_activations

__all__ = [
    "RecomputedOutput",
    "RngSnapshot",
    "checkpoint_without_output",
    "discard_storage",
    "refill_storage",
    "saved_activation_bytes",
    "saved_activations",
]
