"""The recompute family (FEATURES.md 22, 24, 25).

* full: ``checkpoint(block_apply, ...)`` keeps only the block's inputs and re-runs its forward
  in backward. ``RecomputePolicy`` picks the blocks as Megatron/MindSpeed do: method "block"
  (the first N blocks of every pipeline stage / virtual chunk, or per pipeline rank across its
  chunks) or "uniform" (groups of N consecutive blocks, one checkpoint per group).
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
from shardfn.schedules.placement import PLACEMENTS, layer_to_rank_chunk, partition_layers, stage_of_rank_chunk

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


_METHODS = ("block", "uniform")


def _count(value):
    """``int`` or a per-pipeline-rank sequence of ints, as stored (a tuple for a sequence)."""
    return value if value is None or isinstance(value, int) else tuple(value)


def _check_count(name):
    def check(instance, attribute, value):
        ok = (value is None and name == "light_layers") or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 0)
        if isinstance(value, tuple):
            ok = bool(value) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        if not ok:
            raise ValueError(
                f"RecomputePolicy: {name}={value!r} must be an int >= 0 or a non-empty sequence of ints >= 0 "
                f"(one per pipeline rank){' or None (all)' if name == 'light_layers' else ''}."
            )

    return check


@attrs.frozen
class RecomputePolicy:
    """Which blocks recompute what: Megatron's full-recompute methods and MindSpeed's priority rule.

    Blocks are placed on a pipeline of ``num_ranks`` ranks x ``num_chunks`` virtual chunks with
    ``shardfn.schedules.placement`` (even split, or the unaligned ``layers_per_stage``; noop blocks
    count as layers). A block's *local index* is its position inside its stage (chunk). The
    defaults (one rank, one chunk) make the whole model one stage, so ``full_layers=N`` means the
    first ``N`` blocks.

    * ``method="block"``: the blocks with priority ``< N`` are checkpointed whole, one checkpoint
      each. The priority is the local index (Megatron: the first ``N`` blocks of every stage or
      virtual chunk); with ``per_pp_rank=True`` (MindSpeed ``--enable-recompute-layers-per-pp-rank``)
      it is ``local_index * num_chunks + chunk`` (see ``priority``), so ``N`` counts blocks over all
      chunks of a rank, the first block of every chunk before the second of any.
    * ``method="uniform"``: every stage is cut into groups of ``N`` consecutive blocks (the last may be
      shorter) and each group is one checkpoint, storing only the group's input.
    * Lighter kinds (selective, norm, activation: FEATURES.md 22, 24, 25) go to the blocks that are not
      fully recomputed with priority ``< N + light_layers`` (all of them when ``light_layers`` is
      None), so a block never gets two kinds. Norm/activation recompute combine with full recompute
      only with ``method="block"`` (as in MindSpeed).

    ``N`` (``full_layers``) and ``light_layers`` are an int, or one int per pipeline rank.

    Attributes:
      full_layers: ``N``: blocks checkpointed per stage (block), per rank (block with ``per_pp_rank``),
        or the group size (uniform); 0 = no full recompute.
      selective: checkpoint the attention core.
      norm: norm recompute.
      activation: activation-function recompute.
      light_layers: how many blocks after the full ones get the lighter kinds (None = all).
      method: ``"block"`` or ``"uniform"``.
      per_pp_rank: count ``N`` per pipeline rank across its virtual chunks (block method only).
      num_ranks: pipeline ranks ``p``.
      num_chunks: virtual chunks per rank ``v``.
      layers_per_stage: optional ``[p*v]`` block counts in model order (unaligned pipeline).
      placement: ``"loop"`` or ``"v"`` (see ``shardfn.schedules.placement``).
    """

    full_layers: int | tuple[int, ...] = attrs.field(default=0, converter=_count, validator=_check_count("full_layers"))
    selective: bool = False
    norm: bool = False
    activation: bool = False
    light_layers: int | tuple[int, ...] | None = attrs.field(default=None, converter=_count,
                                                               validator=_check_count("light_layers"))
    method: str = attrs.field(default="block", validator=attrs.validators.in_(_METHODS))
    per_pp_rank: bool = False
    num_ranks: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    num_chunks: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    layers_per_stage: tuple[int, ...] | None = attrs.field(
        default=None, converter=lambda v: v if v is None else tuple(v))
    placement: str = attrs.field(default="loop", validator=attrs.validators.in_(PLACEMENTS))

    def __attrs_post_init__(self):
        errors = []
        for name in ("full_layers", "light_layers"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != self.num_ranks:
                errors.append(f"{name}={list(value)} has {len(value)} entries but num_ranks={self.num_ranks}; "
                              f"give one count per pipeline rank or a single int")
        if self.method == "uniform" and self.per_pp_rank:
            errors.append("per_pp_rank=True applies to method='block' only (uniform groups live inside a chunk)")
        if self.method == "uniform" and (self.norm or self.activation) and self._any_full():
            errors.append("norm/activation recompute combine with full recompute only with method='block' "
                          "(uniform recomputes every block already); use method='block' or full_layers=0")
        if errors:
            raise ValueError("RecomputePolicy: " + "; ".join(errors) + ".")

    def _any_full(self) -> bool:
        counts = self.full_layers if isinstance(self.full_layers, tuple) else (self.full_layers,)
        return any(counts)

    def _for_rank(self, value, rank):
        return value[rank] if isinstance(value, tuple) else value

    def _locate(self, index: int, num_layers: int | None) -> tuple[int, int, int, tuple[int, ...]]:
        """``(rank, chunk, local index inside its stage, block count of each chunk of that rank)``."""
        if num_layers is None:
            if self.num_ranks * self.num_chunks > 1 or self.layers_per_stage is not None:
                raise ValueError(
                    f"RecomputePolicy.for_layer: num_layers is required with num_ranks={self.num_ranks}, "
                    f"num_chunks={self.num_chunks}, layers_per_stage={self.layers_per_stage}; pass the model's "
                    f"block count (noop blocks included)."
                )
            if index < 0:
                raise ValueError(f"RecomputePolicy.for_layer: index={index} must be >= 0.")
            return 0, 0, index, (index + 1,)
        parts = partition_layers(num_layers, self.num_ranks * self.num_chunks, layers_per_stage=self.layers_per_stage)
        stage_layers = parts.stage_layers[parts.stage_of(index)]
        rank, chunk = layer_to_rank_chunk(index, num_layers, self.num_ranks, num_chunks=self.num_chunks,
                                          placement=self.placement, layers_per_stage=self.layers_per_stage)
        sizes = tuple(parts.layers_per_stage[stage_of_rank_chunk(rank, j, self.num_ranks, self.placement)]
                      for j in range(self.num_chunks))
        return rank, chunk, index - stage_layers[0], sizes

    def priority(self, index: int, num_layers: int | None = None) -> int:
        """MindSpeed's recompute priority of block ``index``: lower is recomputed first.

        The local index, or with ``per_pp_rank`` the block's position on its rank when the rank's
        blocks are ordered by (local index, chunk): ``local * num_chunks + chunk`` for equal chunks
        (MindSpeed's ``should_recompute``), chunks that ran out of blocks skipped for unequal ones.
        """
        _, chunk, local, sizes = self._locate(index, num_layers)
        return self._priority(chunk, local, sizes)

    def _priority(self, chunk: int, local: int, sizes: tuple[int, ...]) -> int:
        if not self.per_pp_rank:
            return local
        return sum(min(n, local) for n in sizes) + sum(n > local for n in sizes[:chunk])

    def for_layer(self, index: int, num_layers: int | None = None) -> LayerRecompute:
        """The recompute of block ``index`` (0-based, noop blocks included).

        Args:
          index: global block index.
          num_layers: the model's block count; needed with a pipeline layout (``num_ranks``,
            ``num_chunks`` or ``layers_per_stage`` set), optional otherwise.

        Returns:
          A ``LayerRecompute``; ``full=True`` means the block is inside a checkpoint (see ``full_groups``).
        """
        rank, chunk, local, sizes = self._locate(index, num_layers)
        n_full = self._for_rank(self.full_layers, rank)
        priority = self._priority(chunk, local, sizes)
        if n_full and (self.method == "uniform" or priority < n_full):
            return LayerRecompute(full=True)
        n_light = self._for_rank(self.light_layers, rank)
        if n_light is not None and priority >= n_full + n_light:
            return LayerRecompute()
        return LayerRecompute(selective=self.selective, norm=self.norm, activation=self.activation)

    def full_groups(self, num_layers: int) -> tuple[tuple[int, ...], ...]:
        """The checkpoints of a model of ``num_layers`` blocks, in model order.

        Each entry is a run of consecutive block indices re-run together in backward: single blocks for
        ``method="block"``, groups of up to ``N`` blocks inside one stage for ``method="uniform"``.
        """
        groups = []
        parts = partition_layers(num_layers, self.num_ranks * self.num_chunks, layers_per_stage=self.layers_per_stage)
        for stage_layers in parts.stage_layers:
            full = [i for i in stage_layers if self.for_layer(i, num_layers).full]
            if self.method == "block" or not full:
                groups.extend((i,) for i in full)
                continue
            rank, _ = layer_to_rank_chunk(stage_layers[0], num_layers, self.num_ranks, num_chunks=self.num_chunks,
                                          placement=self.placement, layers_per_stage=self.layers_per_stage)
            size = self._for_rank(self.full_layers, rank)
            groups.extend(stage_layers[k:k + size] for k in range(0, len(stage_layers), size))
        return tuple(groups)
