"""Dropout drawn from an explicit generator, so recomputation can replay it bitwise.

The mask source is a ``torch.Generator`` (or None: the global RNG) or a `MaskFeed`, which hands
out masks given in advance in draw order. A feed lets a single-device reference run with the
masks a sharded run drew from several streams (``shardfn.layers.tp_rng``).
"""
from __future__ import annotations

import torch

__all__ = ["dropout", "keep_mask", "MaskFeed"]


class MaskFeed:
    """Keep masks given in advance, handed out one per dropout call, in call order.

    Pass it where a dropout generator goes (``generator=`` of `dropout`, ``attention``,
    ``block.apply``, ``model.apply``). Each draw takes the next mask, which must have the drawn
    tensor's shape. The feed is consumed as it is used (build a new one per forward); check
    `remaining` afterwards to be sure every mask was used.

    Args:
      masks: a sequence of 0/1 tensors (1 = keep), e.g. from
        ``tp_rng.assemble_tp_dropout_masks``.

    Example:
      >>> feed = MaskFeed([torch.tensor([1.0, 0.0])])
      >>> dropout(torch.ones(2), 0.5, generator=feed)
      tensor([2., 0.])
    """

    def __init__(self, masks):
        self._masks = list(masks)
        self._next = 0

    @property
    def remaining(self) -> int:
        """Masks not handed out yet."""
        return len(self._masks) - self._next

    def next_keep(self, like: torch.Tensor) -> torch.Tensor:
        """The next mask, as ``like``'s dtype and device; its shape must be ``like``'s."""
        if self._next >= len(self._masks):
            raise ValueError(
                f"MaskFeed: dropout draw number {self._next + 1} (shape {tuple(like.shape)}) but only "
                f"{len(self._masks)} masks were given. Give one mask per dropout call of the forward."
            )
        mask = self._masks[self._next]
        if tuple(mask.shape) != tuple(like.shape):
            raise ValueError(
                f"MaskFeed: mask {self._next} has shape {tuple(mask.shape)} but dropout draw number "
                f"{self._next + 1} needs {tuple(like.shape)}. The masks must follow the forward's draw order."
            )
        self._next += 1
        return mask.to(dtype=like.dtype, device=like.device)


def keep_mask(like: torch.Tensor, p: float, generator=None) -> torch.Tensor:
    """A 0/1 keep mask shaped like ``like`` (1 with probability ``1 - p``), in its dtype.

    Args:
      like: the tensor to drop from (any shape).
      p: drop probability in (0, 1).
      generator: a torch.Generator, None (the global RNG) or a `MaskFeed`.
    """
    if isinstance(generator, MaskFeed):
        return generator.next_keep(like)
    return torch.empty_like(like).bernoulli_(1.0 - p, generator=generator)


def dropout(x: torch.Tensor, p: float, *, generator=None) -> torch.Tensor:
    """Zero each element with probability p and scale the rest by ``1 / (1 - p)``.

    Args:
      x: any shape.
      p: drop probability in [0, 1); 0 returns x itself.
      generator: source of the mask: a torch.Generator, None (the global RNG) or a `MaskFeed`.

    Returns:
      Like x. Saves the scaled mask (x's dtype, like torch's CPU dropout) for backward.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p={p} must be in [0, 1).")
    if p == 0.0:
        return x
    keep = keep_mask(x, p, generator)
    return x * (keep / (1.0 - p))
