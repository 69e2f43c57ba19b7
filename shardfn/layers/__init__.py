"""Stateless layers: pure functions over dict pytrees (no nn.Module state).

Functions: ``attention``, ``explicit_attention``, ``varlen_attention``, masks, ``eod_reset``,
norms, ``swiglu``, RoPE, ALiBi, ``dropout`` (with ``MaskFeed`` for given masks). Families (modules with ``init`` / ``apply``):
``linear``, ``embedding``, ``norm``, ``mlp``, ``attention_block``, ``moe``, ``noop``, ``block``,
``model``. Recomputation: ``recompute`` (``checkpoint``, ``selective``, ``RecomputePolicy``).
"""
from shardfn.layers import (
    tensor_parallel,
    tp2d,
    tp_model,
    tp_rng,
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
from shardfn.layers.drop import MaskFeed, dropout, keep_mask
from shardfn.layers.eod import eod_reset
from shardfn.layers.masks import CompressedCausal, band_mask, causal_mask, compressed_causal_mask
from shardfn.layers.norm import layer_norm, rms_norm
from shardfn.layers.recompute import LayerRecompute, RecomputePolicy, checkpoint, selective
from shardfn.layers.rotary import apply_rotary, rope_cache
from shardfn.layers.tensor_parallel import (
    column_parallel_linear,
    row_parallel_linear,
    vocab_parallel_embedding,
    vocab_parallel_cross_entropy,
    column_parallel_specs,
    row_parallel_specs,
    vocab_parallel_embedding_specs,
    unaligned_attention_layout,
    unaligned_attention_specs,
    unaligned_attention_local,
)
from shardfn.layers.tp_model import (
    tp_layout,
    tp_specs,
    tp_block_specs,
    tp_block_apply,
    tp_model_apply,
    tp_model_loss,
)
from shardfn.layers.tp_rng import (
    TPStreams,
    tp_rng_streams,
    rank_streams,
    tp_dropout,
    assemble_tp_dropout_masks,
)
from shardfn.layers.tp2d import (
    rms_norm_2d,
    layer_norm_2d,
    mlp_2d,
    attention_2d,
    block_2d_apply,
    tp2d_block_specs,
)

__all__ = [
    "tensor_parallel",
    "tp2d",
    "tp_model",
    "tp_rng",
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
    "keep_mask",
    "MaskFeed",
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
    "column_parallel_linear",
    "row_parallel_linear",
    "vocab_parallel_embedding",
    "vocab_parallel_cross_entropy",
    "column_parallel_specs",
    "row_parallel_specs",
    "vocab_parallel_embedding_specs",
    "unaligned_attention_layout",
    "unaligned_attention_specs",
    "unaligned_attention_local",
    "tp_layout",
    "tp_specs",
    "tp_block_specs",
    "tp_block_apply",
    "tp_model_apply",
    "tp_model_loss",
    "TPStreams",
    "tp_rng_streams",
    "rank_streams",
    "tp_dropout",
    "assemble_tp_dropout_masks",
    "rms_norm_2d",
    "layer_norm_2d",
    "mlp_2d",
    "attention_2d",
    "block_2d_apply",
    "tp2d_block_specs",
]
