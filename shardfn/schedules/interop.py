"""Exchange orders with torch.distributed.pipelining (its ``pipeline_order`` dictionaries)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .actions import COMPUTE_KINDS, parse_action
from .placement import stage_to_rank
from .schedule import Schedule

__all__ = ["from_torch_order", "to_torch_strings", "torch_order"]


def from_torch_order(
    order: Mapping[int, Sequence[object | None]],
    *,
    num_stages: int,
    num_microbatches: int,
    placement: str = "loop",
    name: str = "torch",
) -> Schedule:
    """Build a compute-only `Schedule` from a torch ``pipeline_order`` (``{rank: [action | None]}``).

    torch pads its per-rank lists with ``None`` to align time steps and adds bookkeeping
    actions (``REDUCE_GRAD``, ``UNSHARD``, ``RESHARD``) and, in some variants, SEND/RECV;
    only the compute actions (F, B, I, W, OVERLAP_F_B) are kept, in order. Actions are read
    through their string form, so torch need not be imported here.

    Args:
        order: rank -> list of torch ``_Action`` (or anything whose ``str`` is an action string) or None.
        num_stages: model stages.
        num_microbatches: microbatches.
        placement: ``"loop"`` or ``"v"`` (torch's ``style``).
        name: label for the result.

    Returns:
        The `Schedule` (use `add_comms` to put communication back).
    """
    programs = []
    for rank in sorted(order):
        program = []
        for item in order[rank]:
            if item is None:
                continue
            text = str(item)
            if not (text.endswith("OVERLAP_F_B") or text[-1:].isdigit()):
                continue  # REDUCE_GRAD, UNSHARD, RESHARD carry no microbatch
            action = parse_action(text)
            if action.kind in COMPUTE_KINDS:
                program.append(action)
        programs.append(program)
    return Schedule(programs, num_stages, num_microbatches, placement, name)


def to_torch_strings(schedule: Schedule) -> dict[int, list[str]]:
    """Return ``{rank: [action string]}``; torch's ``_Action.from_str`` reads every entry."""
    return {rank: [str(a) for a in program] for rank, program in enumerate(schedule.programs)}


class _StubStage:
    """What torch's schedule constructors read from a stage, and nothing else."""

    def __init__(self, stage_index, num_stages, group_rank, group_size):
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.group_rank = group_rank
        self.group_size = group_size
        self.is_first = stage_index == 0
        self.is_last = stage_index == num_stages - 1
        self.submod = None
        self.stage_index_to_group_rank = {}


def torch_order(cls_name: str, num_ranks: int, num_microbatches: int, *, num_chunks: int = 1,
                placement: str = "loop") -> Schedule:
    """The order torch.distributed.pipelining's schedule class `cls_name` generates, as a `Schedule`.

    torch's classes compute ``pipeline_order`` in their constructor from stage indices and group
    sizes alone, so stub stages (no process group, no module) suffice; each rank's constructor
    sees only its own stages.

    Args:
        cls_name: e.g. "ScheduleGPipe", "ScheduleInterleaved1F1B", "ScheduleZBVZeroBubble".
        num_ranks, num_microbatches: sizes.
        num_chunks: stages per rank.
        placement: "loop" or "v".

    Returns:
        The compute-only Schedule named ``torch_<cls_name>``.
    """
    from torch.distributed.pipelining import schedules

    cls = getattr(schedules, cls_name)
    num_stages = num_ranks * num_chunks
    to_rank = stage_to_rank(num_stages, num_ranks, placement)
    order = {}
    for rank in range(num_ranks):
        stages = [_StubStage(s, num_stages, rank, num_ranks) for s in range(num_stages) if to_rank[s] == rank]
        single = issubclass(cls, schedules.PipelineScheduleSingle)
        order[rank] = cls(stages[0] if single else stages, num_microbatches).pipeline_order[rank]
    return from_torch_order(order, num_stages=num_stages, num_microbatches=num_microbatches,
                            placement=placement, name=f"torch_{cls_name}")
