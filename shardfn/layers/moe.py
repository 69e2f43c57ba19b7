"""Mixture of experts: top-k router, routed experts and shared experts (FEATURES.md 37).

``y = sum_{e in topk(x)} w_e(x) * expert_e(x) + shared_mlp(x)``, router softmax in fp32,
top-k weights renormalised to sum 1 (Mixtral) unless ``normalize_topk=False`` (DeepSeek).
Expert weights are stacked on a leading expert dim so expert parallelism can split it.

Auxiliary load-balancing loss (Switch Transformer / GShard): ``E * sum_i f_i * P_i`` with ``f_i``
the fraction of routing assignments (token, slot) sent to expert ``i`` (``count_i / (t * k)``; the
token fraction for top-1) and ``P_i`` the mean router probability of expert ``i`` over tokens. It is
1 for a perfectly balanced router; its gradient flows through ``P`` only.
"""
from __future__ import annotations

import torch
from einops import rearrange

from shardfn.layers import linear, mlp
from shardfn.layers.linear import normal

__all__ = ["init", "apply", "route", "load_balancing_loss"]


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


def route(router: dict, x: torch.Tensor, top_k: int, *, normalize_topk: bool = True, return_probs: bool = False):
    """Top-k routing of tokens x `[t, H]`: ``(weights [t, k] fp32 (fp64 for fp64 x), experts [t, k] int64)``.

    With ``return_probs=True`` also returns the router's softmax over all experts, ``probs [t, E]``.
    """
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = torch.nn.functional.linear(x.to(cdtype), router["weight"].to(cdtype))  # [t, E]
    num_experts = logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"moe.route: top_k={top_k} must be in [1, num_experts={num_experts}].")
    probs = torch.softmax(logits, dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    if normalize_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if return_probs:
        return weights, experts, probs
    return weights, experts


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Switch/GShard auxiliary loss ``E * sum_i f_i * P_i`` of one routing.

    Args:
      probs: router softmax over all experts, `[t, E]` (from ``route(..., return_probs=True)``).
      experts: chosen experts, int `[t, k]`.

    Returns:
      A 0-d tensor in ``probs``' dtype; ``f`` (counts) carries no gradient, ``P`` does.
    """
    if probs.dim() != 2 or experts.dim() != 2 or experts.shape[0] != probs.shape[0]:
        raise ValueError(
            f"moe.load_balancing_loss: probs must be [t, E] and experts [t, k] with the same t; got "
            f"probs {tuple(probs.shape)}, experts {tuple(experts.shape)}."
        )
    num_tokens, num_experts = probs.shape
    counts = torch.bincount(experts.flatten(), minlength=num_experts).to(probs.dtype)
    fraction = counts / (num_tokens * experts.shape[1])
    mean_prob = probs.mean(dim=0)
    return num_experts * (fraction * mean_prob).sum()


def apply(params: dict, x: torch.Tensor, *, top_k: int, kind: str = "swiglu", normalize_topk: bool = True,
          column_linear=linear.apply, row_linear=linear.apply, return_aux_loss: bool = False):
    """Apply the MoE layer to x `[..., H]` -> `[..., H]` (routed + shared).

    With ``return_aux_loss=True`` returns ``(y, aux)``: ``aux`` is ``load_balancing_loss`` of this
    call's routing over all tokens of ``x`` (0-d, fp32; fp64 for fp64 x), unscaled.
    """
    shape = x.shape
    xs = rearrange(x, "... h -> (...) h")
    weights, experts, probs = route(params["router"], xs, top_k, normalize_topk=normalize_topk, return_probs=True)
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
    if return_aux_loss:
        return out, load_balancing_loss(probs, experts)
    return out
