"""Discrete-event simulation of a schedule: timeline, makespan, bubbles, peak activations.

Every rank runs its program in order. An action starts when the rank is free and every
event it needs (`deps.needs`) has happened; an event produced on another rank arrives
``latency`` later (one message). Durations come from a per-kind cost table (optionally
per stage). All arithmetic is exact when the costs are ints or `fractions.Fraction`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from numbers import Real
from types import MappingProxyType

import attrs

from .actions import COMPUTE_KINDS, Action, Kind
from .deps import Event, needs, producer_rank, provides
from .schedule import Schedule, format

__all__ = ["DeadlockError", "TimedAction", "Timeline", "simulate", "DEFAULT_COST"]

DEFAULT_COST: Mapping[str, Real] = MappingProxyType({"F": 1, "B": 2, "I": 1, "W": 1})
_COST_KEYS = frozenset({"F", "B", "I", "W", "F&B", "SEND_F", "RECV_F", "SEND_B", "RECV_B"})


class DeadlockError(ValueError):
    """No rank can make progress although some programs have actions left.

    Attributes:
        waiting: ``{rank: (step, action, missing_events)}`` for every stuck rank.
    """

    def __init__(self, message: str, waiting: Mapping[int, tuple[int, Action, tuple[Event, ...]]]):
        super().__init__(message)
        self.waiting = dict(waiting)


@attrs.frozen(repr=False)
class TimedAction:
    """One executed action: rank, position in the rank's program, start and end time."""

    rank: int
    step: int
    action: Action
    start: Real
    end: Real

    def __repr__(self) -> str:
        return f"{self.action}@r{self.rank}[{self.start},{self.end})"


@attrs.frozen(repr=False)
class Timeline:
    """The result of `simulate`.

    Attributes:
        schedule: the simulated `Schedule`.
        entries: every `TimedAction`, sorted by (start, rank, step).
        makespan: time from the first start (0) to the last end.
        busy: per rank, total compute time (F, B, I, W, F&B; communication is not compute).
        bubble: per rank idle time ``makespan - busy[r]``. This is the "bubble per device"
            of PERF.md section 1.2 (1F1B: ``(p-1)(F+B)``), measured over the whole
            iteration (global convention: a rank that starts late is idle until it starts).
        bubble_over_makespan: per rank ``bubble / makespan`` (GPipe's convention).
        bubble_over_ideal: per rank ``bubble / busy`` (Megatron's convention, ``(p-1)/m`` for 1F1B).
        span_bubble: per rank idle time between its own first start and last end
            (the rank-local convention used for ZB-H2 / ZB-V).
        peak_activations: per rank, the largest number of microbatches' activations held
            at once, in units of one microbatch's activations of all the layers a rank holds
            (each chunk's forward adds ``1/num_chunks``; see `simulate`).
    """

    schedule: Schedule
    entries: tuple[TimedAction, ...]
    makespan: Real
    busy: tuple[Real, ...]
    bubble: tuple[Real, ...]
    bubble_over_makespan: tuple[Real, ...]
    bubble_over_ideal: tuple[Real, ...]
    span_bubble: tuple[Real, ...]
    peak_activations: tuple[Real, ...]

    def rank_entries(self, rank: int) -> tuple[TimedAction, ...]:
        """The entries of one rank in program order."""
        return tuple(sorted((e for e in self.entries if e.rank == rank), key=lambda e: e.step))

    def __repr__(self) -> str:
        return (
            f"Timeline({self.schedule.name or 'schedule'}: makespan={self.makespan}, "
            f"bubble={list(self.bubble)}, peak_activations={list(self.peak_activations)})"
        )


def _cost_table(cost: Mapping[str, object] | None) -> dict[str, object]:
    table = dict(DEFAULT_COST)
    if cost is not None:
        unknown = sorted(set(map(str, cost)) - _COST_KEYS - {"OVERLAP_F_B"})
        if unknown:
            raise ValueError(
                f"simulate: cost keys {unknown} are not kinds; use {sorted(_COST_KEYS)} "
                f"(values: a number, or a per-stage sequence / mapping)."
            )
        for key, value in cost.items():
            table["F&B" if key == "OVERLAP_F_B" else str(key)] = value
    return table


def _lookup(table: Mapping[str, object], key: str, stage: int) -> Real:
    value = table.get(key, 0)
    if isinstance(value, Mapping):
        return value.get(stage, 0)
    if isinstance(value, Sequence) and not isinstance(value, str):
        return value[stage]
    return value


def _duration_fn(cost: Mapping[str, object] | None) -> Callable[[Action], Real]:
    table = _cost_table(cost)

    def duration(action: Action) -> Real:
        if action.kind is Kind.OVERLAP_F_B:
            if "F&B" in table:
                return _lookup(table, "F&B", action.stage)
            return sum(_lookup(table, a.kind.value, a.stage) for a in action.sub_actions)
        return _lookup(table, action.kind.value, action.stage)

    return duration


def _deadlock(schedule: Schedule, heads: list[int], done: Mapping[Event, object]) -> DeadlockError:
    waiting = {}
    for r, program in enumerate(schedule.programs):
        if heads[r] < len(program):
            action = program[heads[r]]
            waiting[r] = (heads[r], action, tuple(e for e in needs(action, schedule) if e not in done))
    lines = [
        f"rank {r} step {step}: {action} waits for "
        + ", ".join(f"{e} (from rank {producer_rank(e, schedule)})" for e in missing)
        for r, (step, action, missing) in waiting.items()
    ]
    first = min(waiting)
    grid = format(
        schedule,
        mark={r: step for r, (step, _, _) in waiting.items()},
        note=f"rank {first} waits for {', '.join(map(repr, waiting[first][2]))}",
    )
    message = (
        f"schedule {schedule.name or '(unnamed)'} deadlocks: ranks {sorted(waiting)} are stuck "
        f"(every rank's next action needs an event that no rank can still produce).\n"
        + "\n".join(lines)
        + "\nFix the order so that each needed event is produced earlier, or run add_comms to pair "
        "sends and receives.\n"
        + grid
    )
    return DeadlockError(message, waiting)


def run_programs(
    schedule: Schedule, duration: Callable[[Action], Real], latency: Real = 0
) -> list[TimedAction]:
    """Run every rank's program under the dependency rule; return the timed actions.

    Raises:
        DeadlockError: some rank can never start its next action.
    """
    programs = schedule.programs
    heads = [0] * len(programs)
    free = [0] * len(programs)
    done: dict[Event, tuple[Real, int]] = {}
    out: list[TimedAction] = []
    remaining = sum(len(p) for p in programs)
    while remaining:
        progress = False
        for r, program in enumerate(programs):
            while heads[r] < len(program):
                action = program[heads[r]]
                wanted = needs(action, schedule)
                if any(e not in done for e in wanted):
                    break
                start = free[r]
                for e in wanted:
                    t, src = done[e]
                    start = max(start, t + latency if src != r else t)
                end = start + duration(action)
                out.append(TimedAction(r, heads[r], action, start, end))
                for e in provides(action):
                    done[e] = (end, r)
                free[r] = end
                heads[r] += 1
                remaining -= 1
                progress = True
        if not progress:
            raise _deadlock(schedule, heads, done)
    return out


def _memory_delta(action: Action, weight_memory: Real) -> Real:
    delta = 0
    for a in action.computes:
        delta += {Kind.F: 1, Kind.B: -1, Kind.I: weight_memory - 1, Kind.W: -weight_memory}.get(a.kind, 0)
    return delta


def simulate(
    schedule: Schedule,
    cost: Mapping[str, object] | None = None,
    *,
    latency: Real = 0,
    weight_memory: Real = 0,
) -> Timeline:
    """Simulate a schedule without tensors: start/end of every action, bubbles, memory.

    Args:
        schedule: a `Schedule` (it need not be validated; a deadlock raises).
        cost: durations per kind name: ``"F"``, ``"B"`` (full backward), ``"I"``, ``"W"``,
            ``"F&B"`` (an OVERLAP_F_B pair; default: the sum of its halves), and
            ``"SEND_F"``/``"RECV_F"``/``"SEND_B"``/``"RECV_B"`` (default 0). Each value is a
            number, or a per-stage sequence ``[S]`` or mapping ``{stage: duration}``. Missing
            kinds use the defaults F=1, B=2, I=1, W=1 (durations are per action, i.e. per
            chunk: for an interleaved schedule pass ``F=1/v`` to keep a rank's work fixed).
        latency: time a message takes between ranks: added to every event that an action
            needs from another rank (a RECV's matching SEND, or without comms the producer's
            compute). Same-rank stage hand-offs are free.
        weight_memory: fraction of a stage's activations an ``I`` leaves alive until its ``W``
            (ZB's ``M_W / M_B``; default 0). Memory deltas per chunk, in units of ``1/num_chunks``:
            F ``+1``, B ``-1``, I ``-(1 - weight_memory)``, W ``-weight_memory``.

    Returns:
        A `Timeline`. ``bubble[r] = makespan - busy[r]`` (idle time over the whole iteration);
        the ratio fields give both conventions (÷ makespan and ÷ ideal compute).

    Raises:
        DeadlockError: (a ValueError) no rank can make progress; names stuck ranks and events.
    """
    duration = _duration_fn(cost)
    entries = run_programs(schedule, duration, latency)
    entries.sort(key=lambda e: (e.start, e.rank, e.step))
    ranks = range(schedule.num_ranks)
    makespan = max((e.end for e in entries), default=0)
    busy = [0] * schedule.num_ranks
    first = [None] * schedule.num_ranks
    last = [0] * schedule.num_ranks
    for e in entries:
        if e.action.kind in COMPUTE_KINDS:
            busy[e.rank] += e.end - e.start
        first[e.rank] = e.start if first[e.rank] is None else min(first[e.rank], e.start)
        last[e.rank] = max(last[e.rank], e.end)
    bubble = [makespan - busy[r] for r in ranks]
    unit = Fraction(1, schedule.num_chunks)
    peaks = []
    for program in schedule.programs:
        level, peak = 0, 0
        for action in program:
            level += _memory_delta(action, weight_memory) * unit
            peak = max(peak, level)
        peaks.append(peak)
    return Timeline(
        schedule=schedule,
        entries=tuple(entries),
        makespan=makespan,
        busy=tuple(busy),
        bubble=tuple(bubble),
        bubble_over_makespan=tuple(_ratio(bubble[r], makespan) for r in ranks),
        bubble_over_ideal=tuple(_ratio(bubble[r], busy[r]) for r in ranks),
        span_bubble=tuple((last[r] - (first[r] or 0)) - busy[r] for r in ranks),
        peak_activations=tuple(peaks),
    )


def _ratio(a: Real, b: Real) -> Real:
    if b == 0:
        return 0
    if isinstance(a, (int, Fraction)) and isinstance(b, (int, Fraction)):
        return Fraction(a) / Fraction(b)
    return a / b
