"""`validate`: is a schedule complete, well placed, paired and free of deadlock?"""

from __future__ import annotations

from collections import Counter

from .actions import Kind
from .schedule import Schedule, format
from .simulate import run_programs

__all__ = ["validate"]

_MAX_LISTED = 12


def _placement_problems(schedule: Schedule) -> list[tuple[int, int, str]]:
    """(rank, step, message) for actions outside the model or on the wrong rank."""
    S, m, to_rank = schedule.num_stages, schedule.num_microbatches, schedule.stage_to_rank
    out = []
    for r, program in enumerate(schedule.programs):
        for k, action in enumerate(program):
            for a in action.computes:
                if not 0 <= a.stage < S or not 0 <= a.microbatch < m:
                    out.append((r, k, f"{a} is outside stages [0, {S}) x microbatches [0, {m})"))
                    continue
                if to_rank[a.stage] != r:
                    out.append((r, k, f"{a} is on rank {r} but stage {a.stage} lives on rank {to_rank[a.stage]} "
                                      f"({schedule.placement} placement)"))
                peer = {Kind.SEND_F: a.stage + 1, Kind.RECV_F: a.stage - 1,
                        Kind.SEND_B: a.stage - 1, Kind.RECV_B: a.stage + 1}.get(a.kind)
                if peer is not None and (not 0 <= peer < S or to_rank[peer] == r):
                    out.append((r, k, f"{a} talks to stage {peer}, which is not a stage on another rank "
                                      f"(no communication between stages on the same rank)"))
    return out


def _count_problems(schedule: Schedule) -> list[str]:
    """Missing or repeated work per (stage, microbatch), and unpaired communication."""
    S, m, to_rank = schedule.num_stages, schedule.num_microbatches, schedule.stage_to_rank
    counts = Counter((a.kind, a.stage, a.microbatch) for p in schedule.programs for x in p for a in x.computes)
    out = []
    for s in range(S):
        for mb in range(m):
            f, b, i, w = (counts[(k, s, mb)] for k in (Kind.F, Kind.B, Kind.I, Kind.W))
            if f != 1:
                out.append(f"stage {s} microbatch {mb} has {f} forwards (needs exactly 1)")
            if not ((b, i, w) == (1, 0, 0) or (b, i, w) == (0, 1, 1)):
                out.append(f"stage {s} microbatch {mb} has B={b}, I={i}, W={w} (needs one B, or one I and one W)")
            if not schedule.has_comms:
                continue
            if s + 1 < S and to_rank[s + 1] != to_rank[s]:
                pairs = [(Kind.SEND_F, s), (Kind.RECV_F, s + 1), (Kind.SEND_B, s + 1), (Kind.RECV_B, s)]
                for kind, stage in pairs:
                    if counts[(kind, stage, mb)] != 1:
                        out.append(f"{stage}{kind.value}{mb} appears {counts[(kind, stage, mb)]} times; every "
                                   f"cross-rank hand-off {s}->{s + 1} needs one SEND and one RECV each way")
    return out


def validate(schedule: Schedule) -> None:
    """Check that a schedule is a correct pipeline schedule.

    Checks (every problem is listed, up to a dozen):

    - each action sits on the rank that holds its stage and within the model's sizes;
    - each (stage, microbatch) has exactly one F, and one B or one I and one W;
    - with communication actions, each cross-rank hand-off has one SEND_F/RECV_F and one
      SEND_B/RECV_B, and no stage talks to a stage on its own rank;
    - dependencies hold (`deps` rule: F after the previous stage's F, B/I after its own F and
      the next stage's input gradient, W after I, RECV after its SEND): running the programs
      in order reaches the end without deadlock.

    Args:
        schedule: the `Schedule` to check.

    Returns:
        None.

    Raises:
        ValueError: the schedule is invalid; the message shows the grid with the failing
            steps marked (a `DeadlockError`, also a ValueError, for dependency failures).
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"validate: expected a Schedule, got {type(schedule).__name__}.")
    placed = _placement_problems(schedule)
    problems = [f"rank {r} step {k}: {msg}" for r, k, msg in placed] + _count_problems(schedule)
    if problems:
        mark = {}
        for r, k, _ in placed:
            mark.setdefault(r, k)
        shown = problems[:_MAX_LISTED]
        more = len(problems) - len(shown)
        raise ValueError(
            f"validate: schedule {schedule.name or '(unnamed)'} is invalid ({len(problems)} problems):\n  "
            + "\n  ".join(shown)
            + (f"\n  ... and {more} more" if more > 0 else "")
            + "\n"
            + format(schedule, mark=mark, note=placed[0][2] if placed else "")
        )
    run_programs(schedule, lambda action: 0)
