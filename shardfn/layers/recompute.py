"""The recompute family (FEATURES.md 22, 24, 25).

* full: ``checkpoint(block_apply, ...)`` keeps only the block's inputs and re-runs its forward
  in backward (whole block, or the first N blocks with ``RecomputePolicy(full_layers=N)``).
* selective: ``selective(attention)`` checkpoints only the attention core (QK^T, softmax,
  dropout, PV), removing the ``as^2b`` terms.
* norm and activation-function recompute: the norm's / activation's output is freed once its
  consumer saved it and rebuilt just before the consumer's backward (``shardfn.memory``, M1).

Every path replays the RNG (the global CPU RNG, the device RNG and any torch.Generator passed
in the arguments), so dropout masks match and gradients equal no recompute bitwise.
"""
from __future__ import annotations

import functools

import attrs
import optree
import torch
import torch.utils.checkpoint as _ckpt

from shardfn.flops import recomputing
from shardfn.memory.rng import RngSnapshot

__all__ = ["checkpoint", "selective", "RecomputePolicy", "LayerRecompute"]


class _Replay:
    """Context managers for torch.utils.checkpoint: record at forward, replay at recompute."""

    def __init__(self, generators):
        self.generators = generators
        self.snapshot = None

    def forward(self):
        replay = self

        class _Fwd:
            def __enter__(self):
                replay.snapshot = RngSnapshot.take(generators=replay.generators)

            def __exit__(self, *exc):
                return False

        return _Fwd()

    def recompute(self):
        replay = self

        class _Re:
            def __enter__(self):
                self._stack = [replay.snapshot.replay(), recomputing()]
                for c in self._stack:
                    c.__enter__()

            def __exit__(self, *exc):
                for c in reversed(self._stack):
                    c.__exit__(*exc)
                return False

        return _Re()


def checkpoint(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` keeping only its inputs; re-run it during backward.

    Full recompute (Megatron's ``--recompute-granularity full``). Built on torch's non-reentrant
    checkpoint; torch replays the global CPU/device RNG and this wrapper also replays every
    torch.Generator found in args/kwargs, so dropout drawn from them matches bitwise. The
    re-run forward is marked for ``shardfn.flops.count`` (recorded vs traversed).

    Args:
      fn: the function (e.g. ``block.apply``).
      *args: its arguments (pytrees allowed).
      **kwargs: its keyword arguments.

    Returns:
      ``fn(*args, **kwargs)``.
    """
    gens = [g for g in optree.tree_leaves((args, kwargs), none_is_leaf=False) if isinstance(g, torch.Generator)]
    replay = _Replay(gens)
    return _ckpt.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True,
                            context_fn=lambda: (replay.forward(), replay.recompute()), **kwargs)


def selective(attn_fn):
    """Wrap an attention core so it is checkpointed (selective recompute).

    Returns a function with ``attn_fn``'s signature; pass it as ``attn_fn=`` to a block.
    """

    @functools.wraps(attn_fn)
    def checkpointed(*args, **kwargs):
        return checkpoint(attn_fn, *args, **kwargs)

    return checkpointed


@attrs.frozen
class LayerRecompute:
    """What one block recomputes. ``full`` excludes the other kinds."""

    full: bool = False
    selective: bool = False
    norm: bool = False
    activation: bool = False


@attrs.frozen
class RecomputePolicy:
    """Which blocks recompute what (Megatron's block method, MindSpeed's priority rule).

    Blocks ``0 .. full_layers-1`` are fully recomputed; of the remaining blocks, the first
    ``light_layers`` (all when None) get the lighter kinds switched on here.

    Attributes:
      full_layers: number of leading blocks checkpointed whole (the model's layer count = all).
      selective: checkpoint the attention core.
      norm: norm recompute.
      activation: activation-function recompute.
      light_layers: how many blocks after the full ones get the lighter kinds (None = all).
    """

    full_layers: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    selective: bool = False
    norm: bool = False
    activation: bool = False
    light_layers: int | None = None

    def for_layer(self, index: int) -> LayerRecompute:
        """The recompute of block ``index`` (0-based, noop layers included)."""
        if index < self.full_layers:
            return LayerRecompute(full=True)
        if self.light_layers is not None and index >= self.full_layers + self.light_layers:
            return LayerRecompute()
        return LayerRecompute(selective=self.selective, norm=self.norm, activation=self.activation)
