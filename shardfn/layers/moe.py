"""Mixture of experts: top-k router, routed experts and shared experts (FEATURES.md 37).

``y = sum_{e in topk(x)} w_e(x) * expert_e(x) + shared_mlp(x)``, router softmax in fp32,
top-k weights renormalised to sum 1 (Mixtral) unless ``normalize_topk=False`` (DeepSeek).
Expert weights are stacked on a leading expert dim so expert parallelism can split it.
"""
from __future__ import annotations

import torch
from einops import rearrange

from shardfn.layers import linear, mlp
from shardfn.layers.linear import normal

__all__ = ["init", "apply", "route"]


def init(generator: torch.Generator | None, hidden: int, num_experts: int, ffn: int, *, num_shared_experts: int = 0,
         shared_ffn: int | None = None, kind: str = "swiglu", bias: bool = False, std: float = 0.02,
         dtype=torch.float32, device=None) -> dict:
    """MoE parameters.

    Returns:
      ``{"router": {"weight": [E, H]}, "experts": {"fc1": [E, 2f|f, H], "fc2": [E, H, f]}}`` and,
      with shared experts, ``"shared"``: MLP params of width ``shared_ffn`` (default
      ``num_shared_experts * ffn``).
    """
    if num_experts < 1:
        raise ValueError(f"moe.init: num_experts={num_experts} must be >= 1.")
    mlp.activation(kind)
    up = 2 * ffn if kind == "swiglu" else ffn
    params = {
        "router": {"weight": normal(generator, (num_experts, hidden), std=std, dtype=dtype, device=device)},
        "experts": {
            "fc1": {"weight": normal(generator, (num_experts, up, hidden), std=std, dtype=dtype, device=device)},
            "fc2": {"weight": normal(generator, (num_experts, hidden, ffn), std=std, dtype=dtype, device=device)},
        },
    }
    if num_shared_experts or shared_ffn:
        width = shared_ffn if shared_ffn else num_shared_experts * ffn
        params["shared"] = mlp.init(generator, hidden, width, kind=kind, bias=bias, std=std, dtype=dtype,
                                    device=device)
    return params


def route(router: dict, x: torch.Tensor, top_k: int, *, normalize_topk: bool = True):
    """Top-k routing of tokens x `[t, H]`: ``(weights [t, k] fp32 (fp64 for fp64 x), experts [t, k] int64)``."""
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = torch.nn.functional.linear(x.to(cdtype), router["weight"].to(cdtype))  # [t, E]
    num_experts = logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"moe.route: top_k={top_k} must be in [1, num_experts={num_experts}].")
    probs = torch.softmax(logits, dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    if normalize_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def apply(params: dict, x: torch.Tensor, *, top_k: int, kind: str = "swiglu", normalize_topk: bool = True,
          column_linear=linear.apply, row_linear=linear.apply) -> torch.Tensor:
    """Apply the MoE layer to x `[..., H]` -> `[..., H]` (routed + shared)."""
    shape = x.shape
    xs = rearrange(x, "... h -> (...) h")
    weights, experts = route(params["router"], xs, top_k, normalize_topk=normalize_topk)
    out = torch.zeros_like(xs)
    w1, w2 = params["experts"]["fc1"]["weight"], params["experts"]["fc2"]["weight"]
    for e in range(w1.shape[0]):
        tok, slot = torch.nonzero(experts == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        expert = {"fc1": {"weight": w1[e]}, "fc2": {"weight": w2[e]}}
        y = mlp.apply(expert, xs[tok], kind=kind)
        out = out.index_add(0, tok, y * weights[tok, slot, None].to(y.dtype))
    out = out.reshape(shape)
    if "shared" in params:
        out = out + mlp.apply(params["shared"], x, kind=kind, column_linear=column_linear, row_linear=row_linear)
    return out
