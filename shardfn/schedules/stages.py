"""Lay out stage and layer parameters for `run_pipeline`: one ``[p, v, ...]`` pytree split over ``pp``.

`run_pipeline` takes each rank's own parameters. With shard_map the simplest way to hand them
out is one global pytree whose leaves have a leading ``[p, v]`` (rank, chunk) block, passed with
``in_specs=P("pp")``: rank ``r`` then holds ``[1, v, ...]`` and its chunk ``c`` is entry
``[0, c]``, the model stage ``stage_of_rank_chunk(r, c, p, placement)``.

- `stack_stages` / `unstack_stages`: ``S`` per-stage pytrees <-> the ``[p, v, ...]`` layout.
- `stack_layers` / `apply_layers` / `unstack_layers`: a model given layer by layer, split over
  stages by a `LayerPartition` (`partition_layers`: unaligned counts, zero-layer stages, noop
  layers). Each stage holds ``width = max(1, max layers per stage)`` slots; a mask marks the
  slots that hold a real layer, so noop layers and padding slots pass activations through.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from shardfn.tree import flatten, tree_map, unflatten

from .placement import LayerPartition, rank_chunk_of_stage, stage_of_rank_chunk

__all__ = ["stack_stages", "unstack_stages", "stack_layers", "apply_layers", "unstack_layers"]


def _same_structure(api: str, what: str, trees: Sequence):
    """Flatten every tree; raise unless all share the first one's structure, shapes and dtypes."""
    flat = [flatten(t) for t in trees]
    spec0, leaves0 = flat[0][1], flat[0][0]
    bad = []
    for i, (leaves, spec) in enumerate(flat):
        if spec != spec0:
            bad.append(f"{what}[{i}] has structure {spec}, not {spec0}")
            continue
        for k, (a, b) in enumerate(zip(leaves, leaves0)):
            if not isinstance(a, torch.Tensor):
                bad.append(f"{what}[{i}] leaf {k} is a {type(a).__name__}, not a tensor")
            elif a.shape != b.shape or a.dtype != b.dtype:
                bad.append(
                    f"{what}[{i}] leaf {k} is {a.dtype}{list(a.shape)}, not {b.dtype}{list(b.shape)} like {what}[0]"
                )
    if bad:
        raise ValueError(
            f"{api}: every entry must be a pytree of tensors with the same structure, shapes and dtypes "
            f"(they are stacked):\n  " + "\n  ".join(bad)
        )
    return [leaves for leaves, _ in flat], spec0


def stack_stages(stage_params: Sequence, num_ranks: int, placement: str = "loop"):
    """Stack per-stage parameter pytrees into the ``[p, v, ...]`` layout of `run_pipeline`.

    Args:
        stage_params: ``S = p * v`` pytrees in model (stage) order, all with the same structure,
            shapes and dtypes.
        num_ranks: pipeline ranks ``p``.
        placement: ``"loop"`` or ``"v"`` (the schedule's placement).

    Returns:
        One pytree whose leaves are ``[p, v, *leaf_shape]`` with entry ``[r, c]`` from stage
        ``stage_of_rank_chunk(r, c, p, placement)``. Pass it with ``in_specs=P("pp")``.

    Raises:
        ValueError: ``S`` is not a positive multiple of ``p``, or the pytrees differ.
    """
    num_stages = len(stage_params)
    if num_stages == 0 or num_stages % num_ranks:
        raise ValueError(
            f"stack_stages: got {num_stages} stage pytrees for num_ranks={num_ranks}; give p * v of them "
            f"(v chunks per rank) in model order."
        )
    leaves, spec = _same_structure("stack_stages", "stage_params", stage_params)
    v = num_stages // num_ranks
    order = [[stage_of_rank_chunk(r, c, num_ranks, placement) for c in range(v)] for r in range(num_ranks)]
    out = [
        torch.stack([torch.stack([leaves[s][k] for s in row]) for row in order])  # [p, v, ...]
        for k in range(len(leaves[0]))
    ]
    return unflatten(spec, out)


def unstack_stages(stacked, placement: str = "loop") -> list:
    """Inverse of `stack_stages`: ``[p, v, ...]`` leaves back to ``S`` per-stage pytrees.

    Non-tensor leaves (e.g. the None gradients `run_pipeline` returns for integer leaves) are
    copied into every stage.
    """
    leaves, spec = flatten(stacked)
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    if not tensors or any(t.dim() < 2 for t in tensors):
        raise ValueError("unstack_stages: expected tensor leaves with a leading [p, v] block (from stack_stages).")
    p, v = tensors[0].shape[:2]
    out = []
    for s in range(p * v):
        r, c = rank_chunk_of_stage(s, p, placement)
        out.append(unflatten(spec, [x[r, c] if isinstance(x, torch.Tensor) else x for x in leaves]))
    return out


def _real_layers(partition: LayerPartition) -> list[int]:
    return [g for g in range(partition.num_layers) if g not in partition.noop_layers]


def stack_layers(layer_params: Sequence, partition: LayerPartition, num_ranks: int, placement: str = "loop"):
    """Lay out a layered model over pipeline stages, unaligned splits and noop layers included.

    Args:
        layer_params: one pytree per *real* layer, in model order (``L - len(noop_layers)``
            entries, same structure, shapes and dtypes).
        partition: `partition_layers(L, p * v, layers_per_stage=..., noop_layers=...)`.
        num_ranks: pipeline ranks ``p``.
        placement: the schedule's placement.

    Returns:
        ``{"layers": leaves [p, v, width, ...], "real": bool [p, v, width]}``: slot ``k`` of a
        stage holds its ``k``-th layer's parameters when that layer is real (zeros and
        ``real=False`` for noop layers and padding). Pass with ``in_specs=P("pp")`` and run the
        stage with `apply_layers`.

    Raises:
        ValueError: the number of layer pytrees does not match the partition's real layers, or
            the partition's stage count is not a multiple of ``num_ranks``.
    """
    real = _real_layers(partition)
    if len(layer_params) != len(real) or not real:
        raise ValueError(
            f"stack_layers: got {len(layer_params)} layer pytrees but the partition has {len(real)} real layers "
            f"({partition.num_layers} layers, noop {sorted(partition.noop_layers)}); give one per real layer, "
            f"in model order."
        )
    leaves, spec = _same_structure("stack_layers", "layer_params", layer_params)
    index = {g: i for i, g in enumerate(real)}
    width = max(1, max(partition.layers_per_stage))
    stages = []
    for layers in partition.stage_layers:
        slots, mask = [], []
        for k in range(width):
            g = layers[k] if k < len(layers) else None
            if g is not None and g in index:
                slots.append(leaves[index[g]])
                mask.append(True)
            else:
                slots.append([torch.zeros_like(x) for x in leaves[0]])
                mask.append(False)
        stacked = [torch.stack([slot[j] for slot in slots]) for j in range(len(leaves[0]))]  # [width, ...]
        stages.append({"layers": unflatten(spec, stacked), "real": torch.tensor(mask, dtype=torch.bool)})
    return stack_stages(stages, num_ranks, placement)


def apply_layers(layer_fn: Callable, params, chunk: int, x):
    """Run the real layers of one chunk in order: ``x = layer_fn(layer_params, x)`` for each.

    Args:
        layer_fn: ``layer_fn(layer_params, x) -> x`` for one layer.
        params: this rank's block of `stack_layers`'s output (leaves ``[1, v, width, ...]``).
        chunk: the local chunk index (`run_pipeline`'s ``chunk``).
        x: the stage input.

    Returns:
        The stage output; ``x`` itself for a stage without real layers.
    """
    for k, is_real in enumerate(params["real"][0, chunk].tolist()):
        if is_real:
            x = layer_fn(tree_map(lambda t: t[0, chunk, k], params["layers"]), x)
    return x


def unstack_layers(stacked, partition: LayerPartition, placement: str = "loop") -> list:
    """Inverse of `stack_layers` for its ``"layers"`` part (e.g. gradients): one pytree per real layer."""
    per_stage = unstack_stages(stacked["layers"], placement)
    out = []
    for g in _real_layers(partition):
        s = partition.stage_of(g)
        k = g - partition.stage_layers[s][0]
        out.append(tree_map(lambda t, k=k: t[k] if isinstance(t, torch.Tensor) else t, per_stage[s]))
    return out
