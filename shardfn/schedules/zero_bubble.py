"""Zero-bubble schedules (Qi et al. 2024, "Zero Bubble Pipeline Parallelism"): ZB-H1 and ZB-V.

Both split the backward into I (input gradient, on the critical path between stages)
and W (weight gradient, free to move) and use W to fill bubbles.
"""

from __future__ import annotations

from .actions import Action, Kind
from .generators import check_sizes
from .placement import stage_of_rank_chunk
from .schedule import Schedule

__all__ = ["zero_bubble_h1", "zbv"]


def zero_bubble_h1(num_ranks: int, num_microbatches: int) -> Schedule:
    """ZB-H1: 1F1B order and memory with each backward split into I then W, where rank ``r``
    runs each W ``r`` backward steps late (its last ``r`` W run after the final I).

    The lag lets the input-gradient wave run at ``F + I`` per hop instead of ``F + B``, and the
    late W fill the tail bubble, so for ``m >= p`` the bubble per rank is
    ``(p-1)(T_F + T_I - T_W)`` (ZB paper section 2.1). Rank ``r`` holds at most ``p - r`` full
    forwards plus ``r`` pending W (each holding ``weight_memory`` of a forward in `simulate`).

    Args:
        num_ranks: pipeline ranks ``p``.
        num_microbatches: microbatches ``m`` (any ``m >= 1``; the closed form needs ``m >= p``).

    Returns:
        The `Schedule`.
    """
    check_sizes("zero_bubble_h1", num_ranks, num_microbatches)
    p, m = num_ranks, num_microbatches
    programs = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        out = [Action(r, Kind.F, i) for i in range(warmup)]
        pending: list[int] = []

        def backward(i):
            out.append(Action(r, Kind.I, i))
            pending.append(i)
            if len(pending) > r:  # W lags I by r steps on rank r
                out.append(Action(r, Kind.W, pending.pop(0)))

        for i in range(m - warmup):
            out.append(Action(r, Kind.F, warmup + i))
            backward(i)
        for i in range(m - warmup, m):
            backward(i)
        out += [Action(r, Kind.W, i) for i in pending]
        programs.append(out)
    return Schedule(programs, p, m, "loop", "zbh1")


def zbv(num_ranks: int, num_microbatches: int) -> Schedule:
    """ZB-V: two chunks per rank in V placement (rank ``r`` holds stages ``r`` and ``2p-1-r``),
    split backward, and W filling every gap.

    The order is built by list scheduling with unit times (``T_F = T_I = T_W``, the case in
    which ZB-V has zero bubble): whenever a rank is free it runs, in this priority, an I that is
    ready (chunk 1 first: it is closer to the loss), a ready F if the rank holds fewer than
    ``2p`` chunk activations (1F1B's peak of ``p`` microbatches; chunk 1 first, to finish
    microbatches early), else the oldest pending W. With other costs the order is kept and
    `simulate` times it.

    Args:
        num_ranks: pipeline ranks ``p`` (``2p`` stages).
        num_microbatches: microbatches ``m >= 1``.

    Returns:
        The `Schedule` (``placement="v"``).
    """
    check_sizes("zbv", num_ranks, num_microbatches)
    p, m = num_ranks, num_microbatches
    stages = 2 * p
    last = stages - 1
    # Event times of the unit-time list scheduling: F done, DX (input grad) done.
    f_done: dict[tuple[int, int], int] = {}
    dx_done: dict[tuple[int, int], int] = {}
    next_f = [[0, 0] for _ in range(p)]  # per rank, per chunk: next forward microbatch
    next_i = [[0, 0] for _ in range(p)]
    pending_w: list[list[tuple[int, int]]] = [[] for _ in range(p)]
    held = [0] * p
    programs: list[list[Action]] = [[] for _ in range(p)]
    total = 3 * stages * m
    scheduled, time = 0, 0
    while scheduled < total:
        picks = []
        for r in range(p):
            pick = None
            for chunk in (1, 0):
                s, i = stage_of_rank_chunk(r, chunk, p, "v"), next_i[r][chunk]
                if i < m and f_done.get((s, i), time + 1) <= time and (
                    s == last or dx_done.get((s + 1, i), time + 1) <= time
                ):
                    pick = ("I", r, chunk, s, i)
                    break
            if pick is None and held[r] < 2 * p:
                for chunk in (1, 0):
                    s, i = stage_of_rank_chunk(r, chunk, p, "v"), next_f[r][chunk]
                    if i < m and (s == 0 or f_done.get((s - 1, i), time + 1) <= time):
                        pick = ("F", r, chunk, s, i)
                        break
            if pick is None and pending_w[r]:
                pick = ("W", r, None) + pending_w[r][0]
            if pick is not None:
                picks.append(pick)
        for kind, r, chunk, s, i in picks:
            programs[r].append(Action(s, Kind(kind), i))
            scheduled += 1
            if kind == "F":
                f_done[(s, i)] = time + 1
                next_f[r][chunk] += 1
                held[r] += 1
            elif kind == "I":
                dx_done[(s, i)] = time + 1
                next_i[r][chunk] += 1
                pending_w[r].append((s, i))
                held[r] -= 1
            else:
                pending_w[r].pop(0)
        time += 1
    return Schedule(programs, stages, m, "v", "zbv")
