"""Attention masks ("generate mask", FEATURES.md 32), in torch's convention: True = keep.

Masks are built once per (size, device) and cached, so every layer, stage and micro-batch
reuses the same tensor (MindSpeed's process-global mask, without the global). Cached masks
are shared: treat them as read-only.
"""
from __future__ import annotations

import functools

import attrs
import torch

__all__ = ["causal_mask", "band_mask", "CompressedCausal", "compressed_causal_mask"]


def _device_key(device) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


@functools.lru_cache(maxsize=64)
def _causal(s_q: int, s_k: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(s_q, device=device)[:, None]
    j = torch.arange(s_k, device=device)[None, :]
    return j <= i


@functools.lru_cache(maxsize=64)
def _band(s: int, pre: int, post: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(s, device=device)[:, None]
    j = torch.arange(s, device=device)[None, :]
    return (j >= i - pre) & (j <= i + post)


def _check_size(api: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{api}: {name} must be an int, got {type(value).__name__} {value!r}.")
    if value < 0:
        raise ValueError(f"{api}: {name}={value} must be >= 0.")


def causal_mask(s: int, s_k: int | None = None, *, device=None) -> torch.Tensor:
    """Return the causal mask `[s, s_k]` (True = keep): query i sees keys j <= i.

    Aligned top-left like torch's ``is_causal`` when ``s_k != s``. Built once per
    (sizes, device) and cached.

    Args:
      s: query length.
      s_k: key length (defaults to ``s``).
      device: where the mask lives (default CPU).

    Returns:
      A read-only boolean tensor `[s, s_k]`.

    Example:
      >>> causal_mask(3).int().tolist()
      [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    _check_size("causal_mask", "s", s)
    s_k = s if s_k is None else s_k
    _check_size("causal_mask", "s_k", s_k)
    return _causal(s, s_k, _device_key(device))


def band_mask(s: int, pre: int, post: int, *, device=None) -> torch.Tensor:
    """Return the band mask `[s, s]` (True = keep): query i sees keys i-pre <= j <= i+post.

    This is MindSpeed's pre/next-tokens mask (masked where ``j < i - pre`` or ``j > i + post``);
    ``band_mask(s, s, 0)`` equals ``causal_mask(s)``.

    Args:
      s: sequence length.
      pre: how many earlier tokens each query sees (``pre_tockens``).
      post: how many later tokens each query sees (``next_tockens``).
      device: where the mask lives (default CPU).

    Returns:
      A read-only boolean tensor `[s, s]`.
    """
    _check_size("band_mask", "s", s)
    _check_size("band_mask", "pre", pre)
    _check_size("band_mask", "post", post)
    return _band(s, pre, post, _device_key(device))


@attrs.frozen(repr=False, eq=False)
class CompressedCausal:
    """A causal mask of any length, carried as one fixed `[size, size]` block.

    This is the portable form of the NPU flash kernel's compressed mask (sparse_mode 2, a
    2048 x 2048 upper-triangular block standing for a causal mask of any length). ``attention``
    recognises it and runs the kernel's own causal path, so no `[s, s]` mask is built; the
    result equals ``attention(..., mask=causal_mask(s))`` bitwise. ``block`` is what an NPU
    kernel would be handed (True = keep, torch's convention).

    Attributes:
      block: the cached boolean block `[size, size]`.
    """

    block: torch.Tensor

    @property
    def size(self) -> int:
        return self.block.shape[-1]

    def __repr__(self) -> str:
        return f"CompressedCausal(size={self.size}, device={self.block.device})"


@functools.lru_cache(maxsize=16)
def _compressed(size: int, device: torch.device) -> CompressedCausal:
    return CompressedCausal(_causal(size, size, device))


def compressed_causal_mask(size: int = 2048, *, device=None) -> CompressedCausal:
    """Return the compressed causal mask: one `[size, size]` block reused for every length.

    Built once per (size, device). Pass it as ``attention(..., mask=...)``.

    Args:
      size: the block size (2048, as on the NPU).
      device: where the block lives (default CPU).

    Returns:
      A ``CompressedCausal``.
    """
    _check_size("compressed_causal_mask", "size", size)
    if size == 0:
        raise ValueError("compressed_causal_mask: size=0 must be >= 1; use the default 2048.")
    return _compressed(size, _device_key(device))
