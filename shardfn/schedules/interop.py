"""Exchange orders with torch.distributed.pipelining (its ``pipeline_order`` dictionaries)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .actions import COMPUTE_KINDS, parse_action
from .schedule import Schedule

__all__ = ["from_torch_order", "to_torch_strings"]


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
