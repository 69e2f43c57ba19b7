"""The configuration of the functional Llama-style model, a frozen attrs record."""
from __future__ import annotations

import attrs
import torch

from shardfn.tree import register_static

__all__ = ["LlamaConfig"]

_POSITIONS = ("rope", "alibi", "none")


@register_static
@attrs.frozen(kw_only=True, repr=False)
class LlamaConfig:
    """Architecture of a Llama-style decoder; change it with ``attrs.evolve``.

    Attributes:
      vocab_size: V.
      hidden: H.
      num_layers: blocks, noop layers included.
      num_heads: query heads.
      num_kv_heads: key/value heads (GQA; default num_heads).
      ffn_hidden: MLP width f (default 4H).
      head_dim: d (default H / num_heads).
      norm: "rms" or "layer".
      norm_eps: norm epsilon.
      mlp: "swiglu" or "gelu".
      position: "rope", "alibi" or "none".
      rope_base: RoPE base.
      rotary_dim: rotated channels per head (default d; less for partial rotary).
      rotary_interleaved: GPT-J pairs instead of NeoX halves.
      num_experts: routed experts per block (0 = dense MLP).
      moe_top_k: experts per token.
      moe_ffn_hidden: expert width (default ffn_hidden).
      num_shared_experts: shared experts (width num_shared_experts * expert width).
      moe_aux_loss_coeff: weight of the MoE load-balancing loss that ``model.loss`` adds (summed over
        MoE blocks; 0 = not added).
      noop_layers: 0-based indices of parameter-free blocks.
      tie_embeddings: output logits use the embedding matrix.
      bias: linear biases.
      attention_dropout: dropout on attention probabilities.
      hidden_dropout: dropout before each residual add.
      init_std: weight init std.
      dtype: parameter dtype.
    """

    vocab_size: int
    hidden: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    ffn_hidden: int | None = None
    head_dim: int | None = None
    norm: str = attrs.field(default="rms", validator=attrs.validators.in_(("rms", "layer")))
    norm_eps: float = 1e-6
    mlp: str = attrs.field(default="swiglu", validator=attrs.validators.in_(("swiglu", "gelu")))
    position: str = attrs.field(default="rope", validator=attrs.validators.in_(_POSITIONS))
    rope_base: float = 10000.0
    rotary_dim: int | None = None
    rotary_interleaved: bool = False
    num_experts: int = 0
    moe_top_k: int = 2
    moe_ffn_hidden: int | None = None
    num_shared_experts: int = 0
    moe_aux_loss_coeff: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))
    noop_layers: tuple = attrs.field(default=(), converter=tuple)
    tie_embeddings: bool = False
    bias: bool = False
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    init_std: float = 0.02
    dtype: torch.dtype = torch.float32

    def __attrs_post_init__(self):
        g = self.kv_heads
        errors = []
        if self.num_heads % g:
            errors.append(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={g}")
        if self.head_dim is None and self.hidden % self.num_heads:
            errors.append(f"hidden={self.hidden} must be divisible by num_heads={self.num_heads} (or set head_dim)")
        bad = [i for i in self.noop_layers if not isinstance(i, int) or not 0 <= i < self.num_layers]
        if bad:
            errors.append(f"noop_layers {bad} must be ints in [0, num_layers={self.num_layers})")
        if self.position == "rope" and (self.rope_dim % 2 or self.rope_dim > self.dim_per_head):
            errors.append(f"rotary_dim={self.rope_dim} must be even and <= head_dim={self.dim_per_head}")
        if self.num_experts and not 1 <= self.moe_top_k <= self.num_experts:
            errors.append(f"moe_top_k={self.moe_top_k} must be in [1, num_experts={self.num_experts}]")
        if errors:
            raise ValueError("LlamaConfig: " + "; ".join(errors) + ".")

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def dim_per_head(self) -> int:
        return self.hidden // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def ffn(self) -> int:
        return 4 * self.hidden if self.ffn_hidden is None else self.ffn_hidden

    @property
    def rope_dim(self) -> int:
        return self.dim_per_head if self.rotary_dim is None else self.rotary_dim

    def __repr__(self) -> str:
        fields = [f"{a.name}={getattr(self, a.name)!r}" for a in attrs.fields(type(self))
                  if a.default is attrs.NOTHING or getattr(self, a.name) != a.default]
        return f"LlamaConfig({', '.join(fields)})"
