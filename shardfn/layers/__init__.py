"""Stateless layers: pure functions over dict pytrees (no nn.Module state).

Functions: ``attention``, ``explicit_attention``, ``varlen_attention``, masks, ``eod_reset``,
norms, ``swiglu``, RoPE, ALiBi, ``dropout``. Families (modules with ``init`` / ``apply``):
``linear``, ``embedding``, ``norm``, ``mlp``, ``attention_block``, ``moe``, ``noop``, ``block``,
``model``. Recomputation: ``recompute`` (``checkpoint``, ``selective``, ``RecomputePolicy``).
"""
from shardfn.layers import (
    attention_block,
    block,
    embedding,
    linear,
    mlp,
    model,
    moe,
    noop,
    norm,
    recompute,
)
from shardfn.layers.activations import gelu, swiglu
from shardfn.layers.alibi import alibi_bias, alibi_slopes
from shardfn.layers.config import LlamaConfig
from shardfn.layers.core_attention import attention, explicit_attention, varlen_attention
from shardfn.layers.drop import dropout
from shardfn.layers.eod import eod_reset
from shardfn.layers.masks import CompressedCausal, band_mask, causal_mask, compressed_causal_mask
from shardfn.layers.norm import layer_norm, rms_norm
from shardfn.layers.recompute import LayerRecompute, RecomputePolicy, checkpoint, selective
from shardfn.layers.rotary import apply_rotary, rope_cache

__all__ = [
    "CompressedCausal",
    "LayerRecompute",
    "LlamaConfig",
    "RecomputePolicy",
    "alibi_bias",
    "alibi_slopes",
    "apply_rotary",
    "attention",
    "attention_block",
    "band_mask",
    "block",
    "causal_mask",
    "checkpoint",
    "compressed_causal_mask",
    "dropout",
    "embedding",
    "eod_reset",
    "explicit_attention",
    "gelu",
    "layer_norm",
    "linear",
    "mlp",
    "model",
    "moe",
    "noop",
    "norm",
    "recompute",
    "rms_norm",
    "rope_cache",
    "selective",
    "swiglu",
    "varlen_attention",
]
