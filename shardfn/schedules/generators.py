"""Generators of the classic schedules: GPipe, 1F1B, interleaved 1F1B, NanoPipe.

Each is a pure function of sizes returning a `Schedule` without communication actions
(`add_comms` inserts them). Sizes are checked with a ValueError that names the rule.
"""

from __future__ import annotations

from .actions import Action, Kind
from .schedule import Schedule

__all__ = [
    "gpipe",
    "one_f_one_b",
    "interleaved_1f1b",
    "nanopipe",
    "interleaved_warmup",
    "check_sizes",
]


def check_sizes(api: str, num_ranks: int, num_microbatches: int, num_chunks: int = 1) -> None:
    """Raise a ValueError unless every size is an int >= 1."""
    for name, value in (("num_ranks", num_ranks), ("num_microbatches", num_microbatches), ("num_chunks", num_chunks)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{api}: {name}={value!r} must be an int >= 1.")


def gpipe(num_ranks: int, num_microbatches: int) -> Schedule:
    """GPipe: every rank runs all forwards, then all backwards (microbatch order 0..m-1).

    Bubble per rank ``(p-1)(F+B)``; every rank holds all ``m`` microbatches' activations.

    Args:
        num_ranks: pipeline ranks ``p`` (one stage each).
        num_microbatches: microbatches ``m`` (any ``m >= 1``).

    Returns:
        The `Schedule` (loop placement, ``p`` stages).
    """
    check_sizes("gpipe", num_ranks, num_microbatches)
    mbs = range(num_microbatches)
    programs = [
        [Action(r, Kind.F, i) for i in mbs] + [Action(r, Kind.B, i) for i in mbs] for r in range(num_ranks)
    ]
    return Schedule(programs, num_ranks, num_microbatches, "loop", "gpipe")


def _one_f_one_b_program(rank: int, num_ranks: int, num_microbatches: int, backward=Kind.B) -> list[Action]:
    warmup = min(num_ranks - rank - 1, num_microbatches)
    out = [Action(rank, Kind.F, i) for i in range(warmup)]
    for i in range(num_microbatches - warmup):
        out += [Action(rank, Kind.F, warmup + i), Action(rank, backward, i)]
    out += [Action(rank, backward, i) for i in range(num_microbatches - warmup, num_microbatches)]
    return out


def one_f_one_b(num_ranks: int, num_microbatches: int) -> Schedule:
    """1F1B (PipeDream-flush, Megatron): warmup ``min(p-r-1, m)`` forwards on rank ``r``,
    then alternate one forward and one backward, then drain the backwards.

    Bubble per rank ``(p-1)(F+B)``; rank ``r`` holds at most ``min(p-r, m)`` microbatches.

    Args:
        num_ranks: pipeline ranks ``p``.
        num_microbatches: microbatches ``m`` (``m < p`` allowed).

    Returns:
        The `Schedule`.
    """
    check_sizes("one_f_one_b", num_ranks, num_microbatches)
    programs = [_one_f_one_b_program(r, num_ranks, num_microbatches) for r in range(num_ranks)]
    return Schedule(programs, num_ranks, num_microbatches, "loop", "1f1b")


def interleaved_warmup(rank: int, num_ranks: int, num_microbatches: int, num_chunks: int) -> int:
    """Megatron's interleaved warmup on ``rank``: ``min((p-r-1)*2 + (v-1)*p, m*v)`` forwards."""
    return min((num_ranks - rank - 1) * 2 + (num_chunks - 1) * num_ranks, num_microbatches * num_chunks)


def _virtual(k: int, num_ranks: int, num_chunks: int, forward: bool) -> tuple[int, int]:
    """(chunk, microbatch) of virtual step ``k``: groups of ``p`` microbatches per chunk."""
    group = num_ranks * num_chunks
    chunk = (k % group) // num_ranks
    if not forward:
        chunk = num_chunks - 1 - chunk
    return chunk, (k // group) * num_ranks + k % num_ranks


def _check_interleaved(api: str, num_ranks: int, num_microbatches: int, num_chunks: int) -> None:
    check_sizes(api, num_ranks, num_microbatches, num_chunks)
    if num_chunks > 1 and num_microbatches % num_ranks:
        raise ValueError(
            f"{api}: num_microbatches={num_microbatches} must be a multiple of num_ranks={num_ranks} "
            f"when num_chunks={num_chunks} > 1 (Megatron's interleaved schedule runs microbatches in "
            f"groups of p per chunk). Use m = {num_ranks * max(1, -(-num_microbatches // num_ranks))}."
        )


def _interleaved_programs(num_ranks, num_microbatches, num_chunks, deferred_w=None):
    """Rank programs of interleaved 1F1B; ``deferred_w(rank)`` backwards become I with W at the end."""
    p, m, v = num_ranks, num_microbatches, num_chunks
    total = m * v
    programs = []
    for r in range(p):
        warmup = interleaved_warmup(r, p, m, v)

        def fwd(k):
            chunk, mb = _virtual(k, p, v, True)
            return Action(chunk * p + r, Kind.F, mb)

        backwards = []
        for k in range(total):
            chunk, mb = _virtual(k, p, v, False)
            backwards.append((chunk * p + r, mb))
        num_split = 0 if deferred_w is None else min(deferred_w(r), total - warmup)

        def bwd(k):
            stage, mb = backwards[k]
            return Action(stage, Kind.I if k < num_split else Kind.B, mb)

        out = [fwd(k) for k in range(warmup)]
        for i in range(total - warmup):
            out += [fwd(warmup + i), bwd(i)]
        out += [bwd(k) for k in range(total - warmup, total)]
        out += [Action(backwards[k][0], Kind.W, backwards[k][1]) for k in range(num_split)]
        programs.append(out)
    return programs


def interleaved_1f1b(num_ranks: int, num_microbatches: int, *, num_chunks: int) -> Schedule:
    """Interleaved 1F1B (Megatron virtual pipeline, Narayanan et al. 2021).

    Stage ``s`` is chunk ``s // p`` on rank ``s % p`` (loop placement, ``p*v`` stages).
    Virtual step ``k`` runs chunk ``(k mod pv) // p`` forward (``v-1`` minus that backward)
    on microbatch ``(k // pv) * p + k mod p``. Rank ``r`` warms up with
    ``min((p-r-1)*2 + (v-1)*p, m*v)`` forwards, then alternates F and B.

    Bubble per rank ``(p-1)(F+B)/v`` in units of a whole rank's stage; rank ``r`` holds at most
    ``min(warmup_r + 1, m*v) / v`` microbatches (rank 0: ``p(1 + (p-1)/(pv))``).

    Args:
        num_ranks: pipeline ranks ``p``.
        num_microbatches: microbatches ``m``; a multiple of ``p`` when ``v > 1``.
        num_chunks: chunks (virtual stages) per rank ``v``; ``v == 1`` gives `one_f_one_b`.

    Returns:
        The `Schedule`.

    Raises:
        ValueError: a size is not a positive int, or ``m % p != 0`` with ``v > 1``.
    """
    _check_interleaved("interleaved_1f1b", num_ranks, num_microbatches, num_chunks)
    if num_chunks == 1:
        return Schedule(one_f_one_b(num_ranks, num_microbatches).programs, num_ranks, num_microbatches, "loop",
                        "interleaved1")
    programs = _interleaved_programs(num_ranks, num_microbatches, num_chunks)
    return Schedule(programs, num_ranks * num_chunks, num_microbatches, "loop", f"interleaved{num_chunks}")


def nanopipe(num_ranks: int, num_microbatches: int, *, num_chunks: int) -> Schedule:
    """MindSpeed NanoPipe: interleaved 1F1B whose first ``2r`` steady backwards on rank ``r``
    compute only the input gradient (I); their weight gradients (W) run, in order, after the
    cooldown (MindSpeed's WeightGradStore drain).

    The ``2r`` is ``warmup_0 - warmup_r`` (rank 0's warmup minus rank r's), capped by the number
    of steady steps, so rank 0 defers nothing and later ranks fill their tail bubble with W.

    Args:
        num_ranks: pipeline ranks ``p``.
        num_microbatches: microbatches ``m`` (multiple of ``p``).
        num_chunks: chunks per rank ``v >= 2`` (NanoPipe needs a virtual pipeline).

    Returns:
        The `Schedule`.

    Raises:
        ValueError: bad sizes, ``v < 2``, or ``m % p != 0``.
    """
    _check_interleaved("nanopipe", num_ranks, num_microbatches, num_chunks)
    if num_chunks < 2:
        raise ValueError(
            f"nanopipe: num_chunks={num_chunks} must be >= 2; MindSpeed's NanoPipe runs on the virtual "
            f"(interleaved) pipeline. Use one_f_one_b or zero_bubble_h1 without chunks."
        )
    p, m, v = num_ranks, num_microbatches, num_chunks

    def deferred(r):
        return interleaved_warmup(0, p, m, v) - interleaved_warmup(r, p, m, v)

    programs = _interleaved_programs(p, m, v, deferred)
    return Schedule(programs, p * v, m, "loop", f"nanopipe{v}")
