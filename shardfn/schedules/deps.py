"""The one dependency rule of pipeline schedules, shared by validate, simulate and the executor.

Each action *provides* events when it completes and *needs* events before it may
start. An `Event` names a fact about one (stage, microbatch):

====== ========================================================================
kind   meaning
====== ========================================================================
F      the stage's forward finished (its output exists on the stage's rank)
DX     the stage's input gradient finished (by a full ``B`` or an ``I``)
DW     the stage's weight gradient finished (by a full ``B`` or a ``W``)
SEND_F / SEND_B / RECV_F / RECV_B   the matching communication action ran
====== ========================================================================

Rules (``S`` stages, ``prev = stage - 1``, ``next = stage + 1``):

- ``F(s, m)`` needs ``F(prev, m)``; when ``prev`` lives on another rank and the schedule
  has communication actions, it needs ``RECV_F(s, m)`` instead.
- ``B(s, m)`` and ``I(s, m)`` need the stage's own ``F(s, m)`` and ``DX(next, m)`` (or
  ``RECV_B(s, m)`` across ranks with comms); the last stage needs only its ``F``.
- ``W(s, m)`` needs ``DX(s, m)``.
- ``SEND_F(s, m)`` needs ``F(s, m)``; ``SEND_B(s, m)`` needs ``DX(s, m)``.
- ``RECV_F(s, m)`` needs ``SEND_F(prev, m)``; ``RECV_B(s, m)`` needs ``SEND_B(next, m)``.
- ``OVERLAP_F_B`` needs what either half needs (minus what the other half provides).

An executor keeps the set of completed events and calls `ready` before each action of
its rank's program: an empty answer means "run it now"; otherwise the answer lists
what it waits for (and `producer_rank` says which rank will provide it).
"""

from __future__ import annotations

from collections.abc import Container

import attrs

from .actions import Action, Kind

__all__ = ["Event", "provides", "needs", "ready", "producer_rank", "peer_stage", "peer_rank"]


@attrs.frozen(repr=False)
class Event:
    """A completed fact about one (stage, microbatch); see the module docstring."""

    kind: str
    stage: int
    microbatch: int

    def __repr__(self) -> str:
        return f"{self.kind}({self.stage},{self.microbatch})"


def provides(action: Action) -> tuple[Event, ...]:
    """Return the events an action makes true when it completes."""
    out: list[Event] = []
    for a in action.computes:
        s, m = a.stage, a.microbatch
        if a.kind is Kind.F:
            out.append(Event("F", s, m))
        elif a.kind is Kind.B:
            out += [Event("DX", s, m), Event("DW", s, m)]
        elif a.kind is Kind.I:
            out.append(Event("DX", s, m))
        elif a.kind is Kind.W:
            out.append(Event("DW", s, m))
        else:  # a communication action
            out.append(Event(a.kind.value, s, m))
    return tuple(out)


def _crosses(schedule, stage_a: int, stage_b: int) -> bool:
    """Whether data between two stages crosses ranks through SEND/RECV actions."""
    return schedule.has_comms and schedule.stage_to_rank[stage_a] != schedule.stage_to_rank[stage_b]


def _needs_one(a: Action, schedule) -> list[Event]:
    s, m, last = a.stage, a.microbatch, schedule.num_stages - 1
    kind = a.kind
    if kind is Kind.F:
        if s == 0:
            return []
        return [Event("RECV_F", s, m) if _crosses(schedule, s - 1, s) else Event("F", s - 1, m)]
    if kind in (Kind.B, Kind.I):
        out = [Event("F", s, m)]
        if s < last:
            out.append(Event("RECV_B", s, m) if _crosses(schedule, s + 1, s) else Event("DX", s + 1, m))
        return out
    if kind is Kind.W:
        return [Event("DX", s, m)]
    if kind is Kind.SEND_F:
        return [Event("F", s, m)]
    if kind is Kind.SEND_B:
        return [Event("DX", s, m)]
    if kind is Kind.RECV_F:
        return [Event("SEND_F", s - 1, m)]
    return [Event("SEND_B", s + 1, m)]  # RECV_B


def needs(action: Action, schedule) -> tuple[Event, ...]:
    """Return the events that must hold before ``action`` may start.

    Args:
        action: an `Action` of ``schedule``.
        schedule: the `Schedule` (its ``num_stages``, ``stage_to_rank`` and ``has_comms``
            decide whether cross-rank data is waited for as a RECV or as the producer's event).

    Returns:
        The needed events, without duplicates, in a fixed order.
    """
    got: list[Event] = []
    own = set(provides(action)) if action.kind is Kind.OVERLAP_F_B else set()
    for a in action.computes:
        for e in _needs_one(a, schedule):
            if e not in got and e not in own:
                got.append(e)
    return tuple(got)


def ready(action: Action, done: Container[Event], schedule) -> tuple[Event, ...]:
    """Say whether ``action`` may run, given the completed events.

    This is the dependency rule that `validate`, `simulate` and the pipeline executor share.

    Args:
        action: the next action of a rank's program.
        done: the events completed so far (a set, or a dict keyed by `Event`).
        schedule: the `Schedule` the action belongs to.

    Returns:
        The needed events that are not yet in ``done``; empty means the action may run.
    """
    return tuple(e for e in needs(action, schedule) if e not in done)


def producer_rank(event: Event, schedule) -> int:
    """Return the rank whose program provides ``event`` (the rank of its stage)."""
    return schedule.stage_to_rank[event.stage]


_PEER_OFFSET = {Kind.SEND_F: 1, Kind.RECV_F: -1, Kind.SEND_B: -1, Kind.RECV_B: 1}


def peer_stage(action: Action) -> int:
    """For a SEND/RECV action, the stage at the other end of the message.

    ``SEND_F(s)`` goes to ``s + 1``, ``RECV_F(s)`` comes from ``s - 1``, ``SEND_B(s)`` goes to
    ``s - 1`` and ``RECV_B(s)`` comes from ``s + 1``.

    Raises:
        ValueError: ``action`` is not a communication action.
    """
    if action.kind not in _PEER_OFFSET:
        raise ValueError(f"peer_stage: {action} is not a SEND_F/RECV_F/SEND_B/RECV_B action.")
    return action.stage + _PEER_OFFSET[action.kind]


def peer_rank(action: Action, schedule) -> int:
    """For a SEND/RECV action, the rank at the other end (the executor's send/recv peer)."""
    return schedule.stage_to_rank[peer_stage(action)]
