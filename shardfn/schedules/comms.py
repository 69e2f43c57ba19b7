"""`add_comms`: insert the SEND/RECV actions a compute-only schedule needs."""

from __future__ import annotations

from .actions import COMM_KINDS, Action, Kind
from .schedule import Schedule

__all__ = ["add_comms"]


def add_comms(schedule: Schedule) -> Schedule:
    """Insert point-to-point communication actions for every cross-rank hand-off.

    For a forward ``F(s, m)`` whose next stage ``s+1`` lives on another rank, ``SEND_F(s, m)``
    goes right after it on its rank and ``RECV_F(s+1, m)`` right before ``F(s+1, m)`` on the
    receiving rank; likewise ``SEND_B(s, m)`` after the input-gradient backward (B or I) of a
    stage whose previous stage is remote, and ``RECV_B(s-1, m)`` before the backward of
    ``s-1``. Stages on the same rank (the turn of a V) exchange nothing. Sends do not block,
    so a schedule valid without communication stays valid (and deadlock free) with it.

    Args:
        schedule: a schedule without communication actions.

    Returns:
        A new `Schedule` with the same compute order and the SEND/RECV actions.

    Raises:
        ValueError: the schedule already has communication actions.
    """
    if schedule.has_comms:
        raise ValueError(
            f"add_comms: schedule {schedule.name or '(unnamed)'} already has SEND/RECV actions; "
            f"pass the compute-only schedule (filter out kinds {sorted(k.value for k in COMM_KINDS)})."
        )
    to_rank, last = schedule.stage_to_rank, schedule.num_stages - 1

    def remote(a: int, b: int) -> bool:
        return 0 <= b <= last and to_rank[a] != to_rank[b]

    programs = []
    for program in schedule.programs:
        out: list[Action] = []
        for action in program:
            before, after = [], []
            for a in action.computes:
                s, m = a.stage, a.microbatch
                if a.kind is Kind.F:
                    if remote(s, s - 1):
                        before.append(Action(s, Kind.RECV_F, m))
                    if remote(s, s + 1):
                        after.append(Action(s, Kind.SEND_F, m))
                elif a.kind in (Kind.B, Kind.I):
                    if remote(s, s + 1):
                        before.append(Action(s, Kind.RECV_B, m))
                    if remote(s, s - 1):
                        after.append(Action(s, Kind.SEND_B, m))
            out += before + [action] + after
        programs.append(out)
    return Schedule(programs, schedule.num_stages, schedule.num_microbatches, schedule.placement, schedule.name)
