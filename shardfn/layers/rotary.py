"""Rotary position embedding (RoPE, FEATURES.md 35): cache and application.

``freqs[pos, i] = pos * base^(-2i / dr)`` for the rotary dim ``dr``, duplicated to ``dr``;
``out = x * cos + rot(x) * sin`` on the first ``dr`` channels, the rest pass through.
rot is rotate-half (NeoX, ``[-x2, x1]``) or interleaved (GPT-J, over even/odd pairs).
"""
from __future__ import annotations

import torch
from einops import rearrange, repeat

__all__ = ["rope_cache", "apply_rotary"]


def rope_cache(seq: int, dim: int, *, base: float = 10000.0, position_ids: torch.Tensor | None = None,
               dtype=torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(cos, sin)`` for positions ``0..seq-1`` (or ``position_ids``), in half-split layout.

    Args:
      seq: number of positions (ignored when position_ids is given).
      dim: rotary dim ``dr`` (even).
      base: RoPE base.
      position_ids: int tensor `[s]` or `[b, s]` (EOD reset, CP slicing: the table is built
        from the true positions, so slicing positions then building equals building then slicing).
      dtype: dtype of the result (angles are computed in fp64, then cast).
      device: device of the result.

    Returns:
      ``cos, sin``: `[s, dr]` (or `[b, s, dr]`), the same ``dr/2`` frequencies repeated twice
      (``[f0..f_{dr/2-1}, f0..f_{dr/2-1}]``). ``apply_rotary`` re-lays them out for interleaved.
    """
    if dim % 2:
        raise ValueError(f"rope_cache: dim={dim} must be even (channels rotate in pairs).")
    if position_ids is None:
        pos = torch.arange(seq, dtype=torch.float64, device=device)
    else:
        pos = position_ids.to(device=device if device is not None else position_ids.device, dtype=torch.float64)
    inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)  # [dr/2]
    freqs = pos[..., None] * inv  # [..., s, dr/2]
    freqs = torch.cat([freqs, freqs], dim=-1)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    pairs = rearrange(x, "... (d two) -> ... d two", two=2)
    x1, x2 = pairs.unbind(-1)
    return rearrange(torch.stack([-x2, x1], dim=-1), "... d two -> ... (d two)")


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False,
                 rotary_dim: int | None = None) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` channels of x by the angles in ``(cos, sin)``.

    Args:
      x: `[b, s, h, d]`.
      cos: `[s, dr]` or `[b, s, dr]` from ``rope_cache``.
      sin: like cos.
      interleaved: GPT-J pairs (2i, 2i+1) instead of NeoX halves (i, i + dr/2).
      rotary_dim: ``dr <= d`` (default ``cos.shape[-1]``); channels past it pass through.

    Returns:
      `[b, s, h, d]` in x's dtype (the rotation itself runs in x's dtype).
      Its backward is the same rotation with ``-sin``.
    """
    dr = cos.shape[-1] if rotary_dim is None else rotary_dim
    if dr > x.shape[-1] or dr % 2 or dr != cos.shape[-1]:
        raise ValueError(
            f"apply_rotary: rotary_dim={dr} must be even, <= head_dim {x.shape[-1]}, and equal to the"
            f" cache's last dim {cos.shape[-1]}. Build the cache with rope_cache(seq, {dr})."
        )
    if cos.shape[-2] != x.shape[1]:
        raise ValueError(f"apply_rotary: cache has {cos.shape[-2]} positions, x has seq {x.shape[1]} (dim 1).")
    c = cos.to(x.dtype)
    s = sin.to(x.dtype)
    if interleaved:
        # [f0..f_{k-1}, f0..f_{k-1}] -> [f0, f0, f1, f1, ...]
        c = repeat(c[..., : dr // 2], "... d -> ... (d two)", two=2)
        s = repeat(s[..., : dr // 2], "... d -> ... (d two)", two=2)
    c = c.unsqueeze(-2)  # broadcast over heads: [.., s, 1, dr]
    s = s.unsqueeze(-2)
    xr, xp = x[..., :dr], x[..., dr:]
    rot = _rotate_pairs(xr) if interleaved else _rotate_half(xr)
    out = xr * c + rot * s
    return torch.cat([out, xp], dim=-1) if xp.shape[-1] else out
