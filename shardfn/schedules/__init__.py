"""Pipeline schedules as data: actions, generators, validation, simulation and pictures.

A schedule is a value (`Schedule`): per-rank ordered programs of `Action`s. It prints as a
step x rank grid of torch.distributed.pipelining action strings (`format`), parses back
(`parse_schedule`), validates (`validate`), simulates without tensors (`simulate`) and plots
(`plot`). All checks and the simulator use one dependency rule, `deps.ready`, which the
pipeline executor, `run_pipeline`, uses too: inside shard_map it runs any schedule with real
tensors on a mesh's pipeline axis (`stack_stages` / `stack_layers` lay out the parameters).

Example:
    >>> from shardfn.schedules import one_f_one_b, simulate
    >>> simulate(one_f_one_b(4, 8)).bubble       # (p-1)(F+B) with F=1, B=2
    (9, 9, 9, 9)
"""

from . import deps
from .actions import Action, Kind, parse_action
from .comms import add_comms
from .deps import Event, ready
from .dualpipe import dualpipev, dualpipev_phase_counts
from .executor import run_pipeline
from .interop import from_torch_order, to_torch_strings, torch_order
from .reference import sequential_reference
from .generators import gpipe, interleaved_1f1b, nanopipe, one_f_one_b
from .placement import (
    LayerPartition,
    layer_to_rank_chunk,
    partition_layers,
    rank_chunk_of_stage,
    stage_of_rank_chunk,
    stage_to_rank,
)
from .plot import plot
from .schedule import Schedule, format, parse_schedule
from .simulate import DeadlockError, TimedAction, Timeline, simulate
from .stages import apply_layers, stack_layers, stack_stages, unstack_layers, unstack_stages
from .validate import validate
from .zero_bubble import zbv, zero_bubble_h1

__all__ = [
    "Action",
    "Kind",
    "parse_action",
    "Schedule",
    "format",
    "parse_schedule",
    "gpipe",
    "one_f_one_b",
    "interleaved_1f1b",
    "zero_bubble_h1",
    "nanopipe",
    "zbv",
    "dualpipev",
    "dualpipev_phase_counts",
    "add_comms",
    "from_torch_order",
    "to_torch_strings",
    "torch_order",
    "sequential_reference",
    "validate",
    "simulate",
    "Timeline",
    "TimedAction",
    "DeadlockError",
    "plot",
    "deps",
    "Event",
    "ready",
    "LayerPartition",
    "partition_layers",
    "layer_to_rank_chunk",
    "rank_chunk_of_stage",
    "stage_of_rank_chunk",
    "stage_to_rank",
    "run_pipeline",
    "stack_stages",
    "unstack_stages",
    "stack_layers",
    "apply_layers",
    "unstack_layers",
]
