"""DualPipeV (DeepSeek-V3's "cut-in-half" DualPipe) with MindSpeed's phase structure.

Rank ``r`` of ``P`` holds the master chunk (stage ``r``, flowing rank 0 -> P-1) and the slave
chunk (stage ``2P-1-r``, flowing back P-1 -> 0): a V placement of ``2P`` stages. Microbatch
ids are the same for both chunks (MindSpeed labels slave microbatches ``+m``; here the
stage tells the chunk). Per-rank phases (FEATURES.md section 52, counts in actions):

================== ==================== =====================================================
phase              count                actions
================== ==================== =====================================================
warmup             ``2P-2-2r``          F master
interleaved fwd    ``r+1`` pairs        F master, F slave
1b1w1f             ``P-r-1`` triples    I slave, W slave (popped at once), F slave
overlap            ``2m-4P+2r+2``       F&B pairs, alternating (F master & B slave),
                                        (F slave & B master); on rank P-1 the very first
                                        pair runs as F master then B slave (the V's turn)
1b1overlap         ``2(P-r-1)``         B slave, then (F slave & B master)
interleaved bwd    ``r+1`` pairs        B slave, B master
cooldown           ``P-r-1`` (+ W)      B master; with dw_detach: W, I master ...
drain (dw_detach)  ``r+1``              W
================== ==================== =====================================================

``dw_detach=False`` (MindSpeed's default) runs full B in the interleaved-backward and
cooldown phases. ``dw_detach=True`` (``--dualpipev-dw-detach``, and DeepSeek's reference
order) makes the second half of the interleaved-backward steps and the cooldown steps
input-only, queues their W (FIFO) and pops one W before each cooldown backward and the
remaining ``r+1`` at the end.
"""

from __future__ import annotations

from .actions import Action, Kind
from .generators import check_sizes
from .schedule import Schedule

__all__ = ["dualpipev", "dualpipev_phase_counts"]

PHASES = ("warmup", "interleaved_forward", "1b1w1f", "overlap", "1b1overlap", "interleaved_backward",
          "cooldown", "drain")


def dualpipev_phase_counts(num_ranks: int, num_microbatches: int, rank: int) -> dict[str, int]:
    """Number of scheduling steps per phase on ``rank`` (MindSpeed's counts, FEATURES.md 52).

    A step is one pair/triple as listed in the module docstring; ``overlap`` and
    ``1b1overlap`` count single actions as MindSpeed does.
    """
    P, m, r = num_ranks, num_microbatches, rank
    return {
        "warmup": 2 * P - 2 - 2 * r,
        "interleaved_forward": r + 1,
        "1b1w1f": P - r - 1,
        "overlap": 2 * m - 4 * P + 2 * r + 2,
        "1b1overlap": 2 * (P - r - 1),
        "interleaved_backward": r + 1,
        "cooldown": P - r - 1,
        "drain": r + 1,
    }


def _rank_program(P: int, m: int, r: int, dw_detach: bool) -> tuple[list[Action], list[str]]:
    """Rank ``r``'s actions and, for each action, the phase that emitted it."""
    master, slave = r, 2 * P - 1 - r
    nxt = {("F", master): 0, ("F", slave): 0, ("B", master): 0, ("B", slave): 0}
    queue: list[Action] = []
    out: list[Action] = []
    phases: list[str] = []

    def take(kind: str, stage: int) -> int:
        mb = nxt[(kind, stage)]
        nxt[(kind, stage)] += 1
        return mb

    def fwd(stage):
        return Action(stage, Kind.F, take("F", stage))

    def bwd(stage, split=False):
        mb = take("B", stage)
        if split:
            queue.append(Action(stage, Kind.W, mb))
            return Action(stage, Kind.I, mb)
        return Action(stage, Kind.B, mb)

    def emit(phase, *actions):
        for a in actions:
            out.append(a)
            phases.append(phase)

    counts = dualpipev_phase_counts(P, m, r)
    for _ in range(counts["warmup"]):
        emit("warmup", fwd(master))
    for _ in range(counts["interleaved_forward"]):
        emit("interleaved_forward", fwd(master), fwd(slave))
    for _ in range(counts["1b1w1f"]):
        emit("1b1w1f", bwd(slave, split=True))
        emit("1b1w1f", queue.pop(0), fwd(slave))
    for i in range(counts["overlap"] // 2):
        if i == 0 and r == P - 1:
            # At the V's turn the slave's first backward follows the master's forward directly.
            emit("overlap", fwd(master), bwd(slave))
        else:
            emit("overlap", Action.overlap(fwd(master), bwd(slave)))
        emit("overlap", Action.overlap(fwd(slave), bwd(master)))
    for _ in range(counts["1b1overlap"] // 2):
        emit("1b1overlap", bwd(slave), Action.overlap(fwd(slave), bwd(master)))
    steps = counts["interleaved_backward"]
    split = False
    for i in range(steps):
        # DeepSeek's order: the second half of these backwards is input-only (odd ranks switch
        # before the slave backward of the middle step, even ranks after it).
        if dw_detach and i == steps // 2 and r % 2 == 1:
            split = True
        emit("interleaved_backward", bwd(slave, split))
        if dw_detach and i == steps // 2 and r % 2 == 0:
            split = True
        emit("interleaved_backward", bwd(master, split))
    for _ in range(counts["cooldown"]):
        if dw_detach:
            emit("cooldown", queue.pop(0))
        emit("cooldown", bwd(master, dw_detach))
    while queue:
        emit("drain", queue.pop(0))
    return out, phases


def dualpipev(num_ranks: int, num_microbatches: int, *, dw_detach: bool = False) -> Schedule:
    """DualPipeV on ``P`` ranks (``2P`` stages, V placement), MindSpeed's phase counts.

    Args:
        num_ranks: pipeline ranks ``P >= 1``.
        num_microbatches: microbatches ``m >= 2P - 1`` (each passes the master, then the slave chunk).
        dw_detach: split the cooldown backwards into I and W (MindSpeed ``--dualpipev-dw-detach``,
            DeepSeek's reference); default False = full B in the cooldown (MindSpeed's default).

    Returns:
        The `Schedule` (OVERLAP_F_B actions for the F&B steps; ``simulate``'s ``"F&B"`` cost
        times them, default F + B, i.e. no overlap gain).

    Raises:
        ValueError: bad sizes, or ``m < 2P - 1`` (the overlap phase of rank 0 would be negative).
    """
    check_sizes("dualpipev", num_ranks, num_microbatches)
    if num_microbatches < 2 * num_ranks - 1:
        raise ValueError(
            f"dualpipev: num_microbatches={num_microbatches} must be >= 2 * num_ranks - 1 = "
            f"{2 * num_ranks - 1} (MindSpeed: m >= 2P - 1; rank 0's overlap phase has 2m - 4P + 2 steps). "
            f"Use more microbatches or fewer ranks."
        )
    programs = [_rank_program(num_ranks, num_microbatches, r, dw_detach)[0] for r in range(num_ranks)]
    name = "dualpipev" + ("_dwdetach" if dw_detach else "")
    return Schedule(programs, 2 * num_ranks, num_microbatches, "v", name)


def dualpipev_phases(num_ranks: int, num_microbatches: int, rank: int, *, dw_detach: bool = False) -> tuple[str, ...]:
    """The phase name of each action of ``rank``'s DualPipeV program (for tests and plots)."""
    return tuple(_rank_program(num_ranks, num_microbatches, rank, dw_detach)[1])
