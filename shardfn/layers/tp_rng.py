"""Dropout inside tensor-parallel regions: Megatron's two RNG streams as explicit generators.

Megatron keeps two random streams per device (FEATURES.md 6 "Randomness", 8):

* the **shared** stream, seeded with ``seed`` on every device of the tp group, for dropout on
  activations every tp rank holds in full (the residual path of plain TP after the row linear's
  all-reduce): all ranks draw the same mask, so the activation stays replicated;
* the **model-parallel** stream, seeded with ``seed + offset + tp_rank`` (Megatron's offset 2718),
  for dropout on activations split over tp: the attention probabilities of this rank's heads, the
  MLP hidden of this rank's features, and under sequence parallelism the residual path too, which
  then holds this rank's sequence block (Megatron forks the model-parallel tracker around the
  bias-dropout-add when ``sequence_parallel`` is on). Each rank draws its own part of the mask.

Here the two streams are a `TPStreams` pair of ``torch.Generator`` built inside shard_map by
`tp_rng_streams` (no global tracker; ``recompute.checkpoint`` finds the generators in its
arguments and replays them). Data-parallel replicas share the streams, as Megatron's default;
for distinct masks per replica pass a seed that folds in the dp index.

Single-device reference: `assemble_tp_dropout_masks` replays every rank's streams outside shard_map
and joins the local masks (heads, or sequence blocks) into the masks of the unsharded model, in
its draw order; ``model.apply(..., generator=MaskFeed(masks))`` then runs with exactly the masks
the tp ranks drew.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from shardfn.layers.config import LlamaConfig
from shardfn.layers.drop import dropout
from shardfn.primitives.collectives import axis_index
from shardfn.primitives.uneven import split_sizes

__all__ = ["MODEL_PARALLEL_SEED_OFFSET", "TPStreams", "tp_rng_streams", "rank_streams", "tp_dropout",
           "assemble_tp_dropout_masks"]

MODEL_PARALLEL_SEED_OFFSET = 2718


class TPStreams(NamedTuple):
    """The dropout generators of one device (a NamedTuple, so checkpoint's tree walk finds both).

    Attributes:
      shared: the stream shared by the tp group (replicated activations).
      model_parallel: this tp rank's own stream (activations split over tp, and SP).
    """

    shared: torch.Generator
    model_parallel: torch.Generator


def rank_streams(seed: int, rank: int, *, offset: int = MODEL_PARALLEL_SEED_OFFSET, device=None) -> TPStreams:
    """The streams of tp rank ``rank``, fresh: shared seeded ``seed``, model-parallel ``seed + offset + rank``.

    Usable anywhere (the reference builds every rank's streams with it).

    Args:
      seed: the base seed.
      rank: the tp rank.
      offset: the model-parallel seed offset (Megatron: 2718).
      device: the generators' device (default CPU).
    """
    if not isinstance(seed, int) or not isinstance(rank, int) or rank < 0:
        raise TypeError(f"rank_streams: seed={seed!r} and rank={rank!r} must be ints (rank >= 0).")
    shared = torch.Generator(device=device if device is not None else "cpu").manual_seed(seed)
    model_parallel = torch.Generator(device=device if device is not None else "cpu").manual_seed(seed + offset + rank)
    return TPStreams(shared, model_parallel)


def tp_rng_streams(seed: int, *, axis_name="tp", offset: int = MODEL_PARALLEL_SEED_OFFSET, device=None) -> TPStreams:
    """Inside shard_map: this device's `TPStreams`, the model-parallel seed offset by its tp index.

    Build them once per forward (a generator advances as it draws) and pass them as ``rng=`` to
    ``tp_block_apply`` / ``tp_model_apply`` / ``tp_model_loss``.

    Args:
      seed: the base seed, the same on every device of the tp group.
      axis_name: the tensor-parallel axis (or tuple; its mixed-radix index is the rank).
      offset: the model-parallel seed offset (Megatron: 2718).
      device: the generators' device (default CPU).

    Example:
      >>> def local(p, tokens, targets):
      ...     return tp_model_loss(p, tokens, targets, config=cfg, rng=tp_rng_streams(1234))
    """
    return rank_streams(seed, int(axis_index(axis_name)), offset=offset, device=device)


def tp_dropout(x: torch.Tensor, p: float, streams: TPStreams, *, sharded: bool) -> torch.Tensor:
    """Dropout by Megatron's rule: the rank's own stream for tp-split activations, else the shared one.

    Args:
      x: any shape, this device's tensor.
      p: drop probability in [0, 1); 0 returns x itself.
      streams: this device's `TPStreams`.
      sharded: x is split over tp (head or feature shard, or an SP sequence block): each rank draws
        its own part of the mask. False: x is the same on every tp rank and so is the mask.

    Returns:
      Like x.
    """
    if not isinstance(streams, TPStreams):
        raise TypeError(f"tp_dropout: streams must be TPStreams (from tp_rng_streams); got {type(streams).__name__}.")
    return dropout(x, p, generator=streams.model_parallel if sharded else streams.shared)


def _draws(config: LlamaConfig, batch: int, seq: int, tp: int, sequence_parallel: bool, rank: int):
    """The dropout draws of tp rank ``rank`` in forward order: (local shape, dtype, stream, join dim)."""
    c = config
    act = c.dtype
    probs = torch.float64 if act == torch.float64 else torch.float32  # explicit attention's compute dtype
    s_local = split_sizes(seq, tp)[rank] if sequence_parallel else seq
    hidden_stream = "model_parallel" if sequence_parallel else "shared"
    out = []
    for i in range(c.num_layers):
        if i in c.noop_layers:
            continue
        if c.attention_dropout:
            out.append(((batch, c.num_heads // tp, seq, seq), probs, "model_parallel", 1, c.attention_dropout))
        if c.hidden_dropout:
            for _ in range(2):  # after attention, after the MLP
                out.append(((batch, s_local, c.hidden), act, hidden_stream, 1 if sequence_parallel else None,
                            c.hidden_dropout))
    return out


def assemble_tp_dropout_masks(seed: int | Sequence[int], config: LlamaConfig, batch: int, seq: int, *, tp: int,
                              sequence_parallel: bool = False, offset: int = MODEL_PARALLEL_SEED_OFFSET,
                              device=None) -> list[torch.Tensor]:
    """The single-device keep masks that the tp ranks' masks of ``tp_model_apply`` assemble into.

    Replays each rank's `rank_streams` in the TP model's draw order and joins the local masks:
    attention masks ``[b, h/t, s, s]`` along heads, SP hidden masks ``[b, s_r, H]`` along the
    sequence (``split_sizes`` blocks); TP hidden masks come from the shared stream, identical on
    every rank, and are taken once. Per non-noop layer the order is the unsharded block's:
    attention probabilities (if ``attention_dropout``), then the two hidden dropouts (if
    ``hidden_dropout``).

    Args:
      seed: the seed given to `tp_rng_streams`; or one seed per data-parallel block, the global
        batch then being split evenly into ``len(seed)`` blocks (dp replicas share the streams by
        default: pass ``[seed] * dp``).
      config: the model config (its dtype is the masks' draw dtype).
      batch: the global batch b.
      seq: the sequence length s.
      tp: the tp size.
      sequence_parallel: the TP model ran with sequence parallelism.
      offset: the model-parallel seed offset given to `tp_rng_streams`.
      device: the generators' and masks' device.

    Returns:
      0/1 masks (attention ``[b, h, s, s]``, hidden ``[b, s, H]``) for ``MaskFeed``, in draw order.
    """
    seeds = [seed] if isinstance(seed, int) else list(seed)
    if not seeds or batch % len(seeds):
        raise ValueError(
            f"assemble_tp_dropout_masks: batch={batch} must split evenly into {len(seeds)} data-parallel blocks "
            f"(one per seed in seed={seed!r})."
        )
    b_local = batch // len(seeds)
    per_block = []
    for sd in seeds:
        drawn = []  # drawn[r]: rank r's local masks in order
        for r in range(tp):
            streams = rank_streams(sd, r, offset=offset, device=device)
            masks = []
            for shape, dtype, stream, _, p in _draws(config, b_local, seq, tp, sequence_parallel, r):
                gen = getattr(streams, stream)
                masks.append(torch.empty(shape, dtype=dtype, device=device).bernoulli_(1.0 - p, generator=gen))
            drawn.append(masks)
        joined = []
        for j, (_, _, _, dim, _) in enumerate(_draws(config, b_local, seq, tp, sequence_parallel, 0)):
            joined.append(drawn[0][j] if dim is None else torch.cat([drawn[r][j] for r in range(tp)], dim=dim))
        per_block.append(joined)
    return [torch.cat([blk[j] for blk in per_block], dim=0) for j in range(len(per_block[0]))]
