"""2D tensor parallelism layers (FEATURES.md 7): distributed norms, 2D MLP, 2D attention, 2D block.

Activations between layers are ``[b, s/x, h/y]`` (sequence over ``x_axis``, hidden over ``y_axis``).

* `rms_norm_2d` / `layer_norm_2d`: local sums of x (and x^2) over the local h/y features are summed
  over ``y_axis`` in one all-reduce; the weight slice is ``P(y)``. Their backward reduction of the
  statistics' gradients comes from the transpose, and the weight gradient's sum over ``x_axis``
  (the weight meets x-split sequence rows) from the vma rule.
* `mlp_2d`: fc1 = 2D linear (AG=x, RS=y), activation, fc2 = 2D linear (AG=y, RS=x).
* `attention_2d`: q/k/v = 2D linears (AG=x, RS=y) -> ``[b, s/y, heads/x, d]``; Ulysses all-to-all
  over ``y_axis`` to ``[b, s, heads/(xy), d]`` (the full sequence; MindSpeed's tp_y-union-cp group
  without cp), the layers' attention core, all-to-all back, output 2D linear (AG=y, RS=x).
* `block_2d_apply`: pre-norm block of the layers issue's model in the 2D layout; `tp2d_block_specs`
  its param specs (weights ``P(AG, RS)``, SwiGLU fc1 as ``[2, f, h]`` with ``P(None, x, y)``).

Constraints (MindSpeed's): heads and kv heads divisible by x*y, ffn by x, h by y, s by x and y.
Not combined with Megatron SP (the sequence is already split), MoE or dropout.
"""
from __future__ import annotations

import torch
from einops import rearrange

from shardfn.layers.activations import gelu, swiglu
from shardfn.layers.config import LlamaConfig
from shardfn.layers.core_attention import attention
from shardfn.layers.rotary import apply_rotary
from shardfn.primitives.collectives import all_to_all, axis_size
from shardfn.primitives.tp2d import linear_2d, psum_stats
from shardfn.spec import P

__all__ = ["rms_norm_2d", "layer_norm_2d", "mlp_2d", "attention_2d", "block_2d_apply", "tp2d_block_specs"]


def rms_norm_2d(x: torch.Tensor, weight: torch.Tensor, *, axis_name: str, hidden: int, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of a hidden dim split over ``axis_name``: ``x * rsqrt(sum_all(x^2)/H + eps) * w``.

    Args:
        x: ``[..., h/y]``.
        weight: ``[h/y]``, this device's slice.
        axis_name: the axis the hidden dim is split over (tp_y).
        hidden: the global H.
        eps: added to the mean square.
    """
    (sq,) = psum_stats([x.pow(2).sum(dim=-1)], axis_name)
    return x * torch.rsqrt(sq.unsqueeze(-1) / hidden + eps) * weight


def layer_norm_2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, axis_name: str,
                  hidden: int, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm of a hidden dim split over ``axis_name`` from the all-reduced ``sum x`` and ``sum x^2``.

    ``mu = sum x / H``, ``var = sum x^2 / H - mu^2``, ``y = (x - mu) rsqrt(var + eps) w + b`` with the
    local slices of w and b (one all-reduce of the two statistics forward, one backward).
    """
    s1, s2 = psum_stats([x.sum(dim=-1), x.pow(2).sum(dim=-1)], axis_name)
    mu = (s1 / hidden).unsqueeze(-1)
    var = (s2 / hidden).unsqueeze(-1) - mu * mu
    y = (x - mu) * torch.rsqrt(var + eps) * weight
    return y if bias is None else y + bias


def _flat(p):
    w, b = p["weight"], p.get("bias")
    if w.dim() == 3:  # SwiGLU fc1 [2, f/x, h/y] -> gate rows then up rows
        p = {"weight": rearrange(w, "two f h -> (two f) h")}
        if b is not None:
            p["bias"] = rearrange(b, "two f -> (two f)")
    return p


def mlp_2d(params: dict, x: torch.Tensor, *, x_axis: str, y_axis: str, kind: str = "swiglu") -> torch.Tensor:
    """2D MLP ``fc2(act(fc1(x)))``: ``[b, s/x, h/y] -> [b, s/y, E/x] -> [b, s/x, h/y]``.

    Args:
        params: ``{"fc1": [E/x, h/y] (SwiGLU: [2, f/x, h/y]), "fc2": [h/y, f/x]}`` local weights.
        x: ``[b, s/x, h/y]``.
        x_axis, y_axis: the tp_x and tp_y mesh axes.
        kind: "swiglu" or "gelu".
    """
    act = {"swiglu": swiglu, "gelu": gelu}.get(kind)
    if act is None:
        raise ValueError(f"mlp_2d: kind={kind!r} must be 'swiglu' or 'gelu'.")
    hdn = linear_2d(_flat(params["fc1"]), x, ag_axis=x_axis, rs_axis=y_axis)
    return linear_2d(params["fc2"], act(hdn), ag_axis=y_axis, rs_axis=x_axis)


def attention_2d(params: dict, x: torch.Tensor, *, head_dim: int, x_axis: str, y_axis: str, rope=None,
                 rotary_interleaved: bool = False, causal: bool = True, attn_fn=attention) -> torch.Tensor:
    """2D self-attention ``[b, s/x, H/y] -> [b, s/x, H/y]`` (heads over x, then Ulysses over y).

    Args:
        params: ``{"q", "k", "v": [heads*d/x, H/y], "o": [H/y, heads*d/x]}`` local weights.
        x: ``[b, s/x, H/y]``.
        head_dim: d.
        x_axis, y_axis: the tp_x and tp_y mesh axes.
        rope: ``(cos, sin)`` for the full sequence, or None.
        rotary_interleaved: GPT-J pairs instead of NeoX halves.
        causal: causal attention.
        attn_fn: the attention core on ``[b, s, heads/(xy), d]``.
    """
    ny = axis_size(y_axis)

    def heads(name):
        t = rearrange(linear_2d(params[name], x, ag_axis=x_axis, rs_axis=y_axis), "b s (h d) -> b s h d", d=head_dim)
        if t.shape[2] % ny:
            raise ValueError(
                f"attention_2d: {t.shape[2]} local {name} heads (heads / |{x_axis}|) are not divisible by "
                f"|{y_axis}| = {ny}; 2D attention needs heads and kv heads divisible by tp_x * tp_y."
            )
        return all_to_all(t, y_axis, 2, 1, tiled=True)  # [b, s, heads/(xy), d]

    q, k, v = heads("q"), heads("k"), heads("v")
    if rope is not None:
        cos, sin = rope
        q = apply_rotary(q, cos, sin, interleaved=rotary_interleaved)
        k = apply_rotary(k, cos, sin, interleaved=rotary_interleaved)
    out = attn_fn(q, k, v, causal=causal)
    out = all_to_all(out, y_axis, 1, 2, tiled=True)  # [b, s/y, heads/x, d]
    return linear_2d(params["o"], rearrange(out, "b s h d -> b s (h d)"), ag_axis=y_axis, rs_axis=x_axis)


def _norm_2d(p, x, config, y_axis):
    if config.norm == "rms":
        return rms_norm_2d(x, p["weight"], axis_name=y_axis, hidden=config.hidden, eps=config.norm_eps)
    return layer_norm_2d(x, p["weight"], p.get("bias"), axis_name=y_axis, hidden=config.hidden, eps=config.norm_eps)


def block_2d_apply(params: dict, x: torch.Tensor, *, config: LlamaConfig, x_axis: str = "tpx", y_axis: str = "tpy",
                   rope=None, attn_fn=attention) -> torch.Tensor:
    """The layers issue's pre-norm block in the 2D layout ``[b, s/x, h/y]``.

    Args:
        params: this device's block of ``tp_layout(block_params, config)`` under `tp2d_block_specs`.
        x: ``[b, s/x, h/y]``.
        config: the model config (no MoE, no dropout, no ALiBi).
        x_axis, y_axis: the tp_x and tp_y mesh axes.
        rope: ``(cos, sin)`` for the full sequence, or None.
        attn_fn: the attention core.
    """
    c = config
    if c.num_experts or c.attention_dropout or c.hidden_dropout or c.position == "alibi":
        raise NotImplementedError("block_2d_apply: MoE, dropout and ALiBi are not supported by 2D tensor parallelism.")
    a = attention_2d(params["attn"], _norm_2d(params["attn_norm"], x, c, y_axis), head_dim=c.dim_per_head,
                     x_axis=x_axis, y_axis=y_axis, rope=rope, rotary_interleaved=c.rotary_interleaved, attn_fn=attn_fn)
    x = x + a
    return x + mlp_2d(params["mlp"], _norm_2d(params["mlp_norm"], x, c, y_axis), x_axis=x_axis, y_axis=y_axis, kind=c.mlp)


def _lin(p, ag, rs):
    table = {"weight": P(ag, rs), "bias": P(ag)}
    return {k: table[k] for k in p}


def tp2d_block_specs(block_params: dict, config: LlamaConfig, *, x_axis: str = "tpx", y_axis: str = "tpy") -> dict:
    """Specs of one block's ``tp_layout`` params for `block_2d_apply`.

    q/k/v and fc1 ``P(x, y)`` (SwiGLU fc1 ``P(None, x, y)``), o and fc2 ``P(y, x)``, norms ``P(y)``,
    biases ``P(AG)``.
    """
    attn, ml = block_params["attn"], block_params["mlp"]
    fc1 = ml["fc1"]
    if config.mlp == "swiglu":
        fc1_spec = {"weight": P(None, x_axis, y_axis), **({"bias": P(None, x_axis)} if "bias" in fc1 else {})}
    else:
        fc1_spec = _lin(fc1, x_axis, y_axis)
    norm_spec = lambda p: {k: P(y_axis) for k in p}  # noqa: E731
    return {
        "attn_norm": norm_spec(block_params["attn_norm"]),
        "attn": {"q": _lin(attn["q"], x_axis, y_axis), "k": _lin(attn["k"], x_axis, y_axis),
                 "v": _lin(attn["v"], x_axis, y_axis), "o": _lin(attn["o"], y_axis, x_axis)},
        "mlp_norm": norm_spec(block_params["mlp_norm"]),
        "mlp": {"fc1": fc1_spec, "fc2": _lin(ml["fc2"], y_axis, x_axis)},
    }
