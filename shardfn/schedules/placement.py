"""Where stages and layers live: stage -> (rank, chunk) and layer -> stage maps.

Two placements of ``num_stages = num_ranks * num_chunks`` model stages:

- ``"loop"`` (Megatron's virtual pipeline): stage ``s`` is chunk ``s // p`` on rank
  ``s % p``, so a forward visits ranks 0..p-1, then 0..p-1 again.
- ``"v"`` (ZB-V, DualPipeV): even chunks run ranks 0..p-1, odd chunks run back
  p-1..0, so rank 0 holds the first and the last stage and the turn at rank p-1
  needs no communication.

All functions here are pure integer arithmetic (MindSpeed's "layer offset" functions,
FEATURES.md section 0.2 M7), tested against brute-force enumeration.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import attrs

__all__ = [
    "PLACEMENTS",
    "rank_chunk_of_stage",
    "stage_of_rank_chunk",
    "stage_to_rank",
    "LayerPartition",
    "partition_layers",
    "layer_to_rank_chunk",
]

PLACEMENTS = ("loop", "v")


def _check_placement(api: str, placement: str) -> None:
    if placement not in PLACEMENTS:
        raise ValueError(f"{api}: placement={placement!r} is not one of {PLACEMENTS}; use 'loop' or 'v'.")


def _check_positive(api: str, **values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{api}: {name}={value!r} must be an int >= 1.")


def rank_chunk_of_stage(stage: int, num_ranks: int, placement: str = "loop") -> tuple[int, int]:
    """Return ``(rank, chunk)`` of a model stage.

    Args:
        stage: stage index in model order, ``0 <= stage``.
        num_ranks: pipeline ranks ``p``.
        placement: ``"loop"`` or ``"v"``.

    Returns:
        ``(rank, chunk)``: the rank that runs the stage and the stage's local chunk index.
    """
    _check_placement("rank_chunk_of_stage", placement)
    chunk, offset = divmod(stage, num_ranks)
    if placement == "v" and chunk % 2 == 1:
        return num_ranks - 1 - offset, chunk
    return offset, chunk


def stage_of_rank_chunk(rank: int, chunk: int, num_ranks: int, placement: str = "loop") -> int:
    """Inverse of `rank_chunk_of_stage`: the model stage run as ``chunk`` on ``rank``."""
    _check_placement("stage_of_rank_chunk", placement)
    if placement == "v" and chunk % 2 == 1:
        return chunk * num_ranks + (num_ranks - 1 - rank)
    return chunk * num_ranks + rank


def stage_to_rank(num_stages: int, num_ranks: int, placement: str = "loop") -> tuple[int, ...]:
    """Return the rank of every stage, ``[num_stages]``, for a placement."""
    _check_positive("stage_to_rank", num_stages=num_stages, num_ranks=num_ranks)
    if num_stages % num_ranks:
        raise ValueError(
            f"stage_to_rank: num_stages={num_stages} is not a multiple of num_ranks={num_ranks}; "
            f"every rank holds the same number of chunks."
        )
    return tuple(rank_chunk_of_stage(s, num_ranks, placement)[0] for s in range(num_stages))


@attrs.frozen
class LayerPartition:
    """Layers of a model split over pipeline stages (unaligned splits and noop layers allowed).

    Attributes:
        num_layers: total layers ``L`` including noop layers.
        stage_layers: for each stage in model order, the global layer indices it holds
            (contiguous; possibly empty).
        noop_layers: global indices of noop (identity) layers.
    """

    num_layers: int
    stage_layers: tuple[tuple[int, ...], ...]
    noop_layers: frozenset[int]

    @property
    def num_stages(self) -> int:
        return len(self.stage_layers)

    @property
    def layers_per_stage(self) -> tuple[int, ...]:
        return tuple(len(layers) for layers in self.stage_layers)

    def stage_of(self, layer: int) -> int:
        """Return the stage that holds global layer ``layer``."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"LayerPartition.stage_of: layer={layer} is outside [0, {self.num_layers}).")
        return bisect.bisect_right(_prefix_sums(self.layers_per_stage), layer)

    def real_layers(self, stage: int) -> tuple[int, ...]:
        """The layers of ``stage`` that are not noop layers."""
        return tuple(i for i in self.stage_layers[stage] if i not in self.noop_layers)


def _prefix_sums(counts: Sequence[int]) -> tuple[int, ...]:
    """Inclusive prefix sums: the end (exclusive) of each stage's layer range."""
    total, out = 0, []
    for c in counts:
        total += c
        out.append(total)
    return tuple(out)


def _stage_counts(api: str, num_layers: int, num_stages: int, layers_per_stage) -> tuple[int, ...]:
    _check_positive(api, num_stages=num_stages)
    if not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"{api}: num_layers={num_layers!r} must be an int >= 0.")
    if layers_per_stage is None:
        if num_layers % num_stages:
            raise ValueError(
                f"{api}: num_layers={num_layers} is not divisible by num_stages={num_stages}. "
                f"Pass layers_per_stage (one count per stage, zeros allowed) for an unaligned "
                f"pipeline, or add noop layers to reach a multiple."
            )
        return (num_layers // num_stages,) * num_stages
    counts = tuple(layers_per_stage)
    bad = [f"layers_per_stage[{i}]={c!r}" for i, c in enumerate(counts) if not isinstance(c, int) or c < 0]
    if len(counts) != num_stages or bad or sum(counts) != num_layers:
        raise ValueError(
            f"{api}: layers_per_stage={list(counts)} must hold num_stages={num_stages} ints >= 0 "
            f"summing to num_layers={num_layers} (got {len(counts)} entries summing to "
            f"{sum(c for c in counts if isinstance(c, int))}{'; bad: ' + ', '.join(bad) if bad else ''})."
        )
    return counts


def partition_layers(
    num_layers: int,
    num_stages: int,
    *,
    layers_per_stage: Sequence[int] | None = None,
    noop_layers: Sequence[int] = (),
) -> LayerPartition:
    """Split ``num_layers`` layers over ``num_stages`` stages in model order.

    Without ``layers_per_stage`` the split is even (Megatron: stage ``s`` holds
    ``[s*L/S, (s+1)*L/S)``). With it, stage ``s`` holds the next ``layers_per_stage[s]``
    layers (MindSpeed's unaligned pipeline; zero is allowed, e.g. for a stage that only
    holds the embedding). ``noop_layers`` (MindSpeed ``--noop-layers``) are global indices
    among the ``num_layers`` layers that are identities; they count for the split.

    Args:
        num_layers: total layers ``L``, noop layers included.
        num_stages: model stages ``S`` (ranks x chunks).
        layers_per_stage: optional ``[S]`` counts in model (stage) order, summing to ``L``.
            For a loop placement stage order is chunk-major (chunk 0 of ranks 0..p-1, then
            chunk 1 ...), which is MindSpeed's column-major reading of its ``p x v`` table.
        noop_layers: global layer indices that are noop layers.

    Returns:
        A `LayerPartition`.

    Raises:
        ValueError: uneven split without ``layers_per_stage``, bad counts, or a noop index
            outside ``[0, L)``.

    Example:
        >>> partition_layers(6, 3, layers_per_stage=[1, 3, 2]).stage_layers
        ((0,), (1, 2, 3), (4, 5))
    """
    counts = _stage_counts("partition_layers", num_layers, num_stages, layers_per_stage)
    noops = tuple(noop_layers)
    bad = [i for i in noops if not isinstance(i, int) or not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"partition_layers: noop_layers {bad} are not layer indices in [0, {num_layers}); "
            f"noop layers are counted inside num_layers (MindSpeed: --num-layers includes them)."
        )
    stage_layers, start = [], 0
    for count in counts:
        stage_layers.append(tuple(range(start, start + count)))
        start += count
    return LayerPartition(num_layers, tuple(stage_layers), frozenset(noops))


def layer_to_rank_chunk(
    layer: int,
    num_layers: int,
    num_ranks: int,
    *,
    num_chunks: int = 1,
    placement: str = "loop",
    layers_per_stage: Sequence[int] | None = None,
) -> tuple[int, int]:
    """Map a global layer index to the ``(rank, chunk)`` that holds it.

    Args:
        layer: global layer index, ``0 <= layer < num_layers``.
        num_layers: total layers ``L`` (noop layers included).
        num_ranks: pipeline ranks ``p``.
        num_chunks: chunks per rank ``v`` (virtual pipeline size; 2 for ZB-V and DualPipeV).
        placement: ``"loop"`` or ``"v"`` (see module docstring).
        layers_per_stage: optional ``[p*v]`` layer counts in model order (unaligned pipeline).

    Returns:
        ``(rank, chunk)``.

    Example:
        L=16, p=4, v=2, loop: layers 0-1 are on (0, 0), layers 8-9 on (0, 1).
        DualPipeV (v placement, v=2): rank 0 holds the first and the last L/(2p) layers.
    """
    _check_positive("layer_to_rank_chunk", num_ranks=num_ranks, num_chunks=num_chunks)
    _check_placement("layer_to_rank_chunk", placement)
    num_stages = num_ranks * num_chunks
    counts = _stage_counts("layer_to_rank_chunk", num_layers, num_stages, layers_per_stage)
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer_to_rank_chunk: layer={layer} is outside [0, num_layers={num_layers}).")
    if layers_per_stage is None:
        stage = layer // counts[0]
    else:
        stage = bisect.bisect_right(_prefix_sums(counts), layer)
    return rank_chunk_of_stage(stage, num_ranks, placement)
