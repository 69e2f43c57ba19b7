"""The `Schedule` record and its text form (a step x rank grid of action strings)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import attrs

from .actions import COMM_KINDS, Action, parse_action
from .placement import PLACEMENTS, stage_to_rank

__all__ = ["Schedule", "format", "parse_schedule"]

_EMPTY = "."
_NAME = re.compile(r"^[\w.+-]*$")


def _to_programs(value) -> tuple[tuple[Action, ...], ...]:
    return tuple(tuple(program) for program in value)


@attrs.frozen(repr=False)
class Schedule:
    """A pipeline schedule as data: one ordered program of actions per rank.

    Attributes:
        programs: ``programs[r]`` is rank ``r``'s ordered tuple of `Action`.
        num_stages: model stages ``S`` (a multiple of the number of ranks).
        num_microbatches: microbatches ``m`` per iteration.
        placement: ``"loop"`` or ``"v"``: how stages map to ranks (see `placement`).
        name: a short label (no spaces), e.g. ``"1f1b"``; printed by `format` and `plot`.

    Derived (not arguments): ``num_ranks``, ``num_chunks`` (stages per rank),
    ``stage_to_rank`` (``[S]``) and ``has_comms`` (whether SEND/RECV actions are present).
    """

    programs: tuple[tuple[Action, ...], ...] = attrs.field(converter=_to_programs)
    num_stages: int
    num_microbatches: int
    placement: str = "loop"
    name: str = ""
    stage_to_rank: tuple[int, ...] = attrs.field(init=False, eq=False)
    has_comms: bool = attrs.field(init=False, eq=False)

    def __attrs_post_init__(self):
        if not self.programs:
            raise ValueError("Schedule: programs must hold one program per rank; got none.")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"Schedule: placement={self.placement!r} is not one of {PLACEMENTS}.")
        if not _NAME.match(self.name):
            raise ValueError(f"Schedule: name={self.name!r} may use letters, digits and _.+- only (no spaces).")
        if not isinstance(self.num_microbatches, int) or self.num_microbatches < 1:
            raise ValueError(f"Schedule: num_microbatches={self.num_microbatches!r} must be an int >= 1.")
        object.__setattr__(self, "stage_to_rank", stage_to_rank(self.num_stages, len(self.programs), self.placement))
        object.__setattr__(
            self, "has_comms", any(a.kind in COMM_KINDS for program in self.programs for a in program)
        )

    @property
    def num_ranks(self) -> int:
        return len(self.programs)

    @property
    def num_chunks(self) -> int:
        return self.num_stages // len(self.programs)

    def __repr__(self) -> str:
        return (
            f"Schedule({self.name or 'unnamed'}: ranks={self.num_ranks}, stages={self.num_stages}, "
            f"microbatches={self.num_microbatches}, placement={self.placement}, "
            f"actions={sum(len(p) for p in self.programs)})"
        )


def format(schedule: Schedule, *, mark: Mapping[int, int] | None = None, note: str = "") -> str:  # noqa: A001
    """Draw a schedule as a step x rank grid of torch action strings.

    Row ``k`` holds the ``k``-th action of every rank's program (``.`` once a rank's
    program has ended). The first line records the sizes so that `parse_schedule`
    can rebuild the exact `Schedule`.

    Args:
        schedule: the schedule.
        mark: optional ``{rank: step}`` cells to flag with ``*`` (validation errors).
        note: text appended to the first marked row (e.g. what the action waits for).

    Returns:
        The text grid, ending with a newline. Example (``one_f_one_b(2, 2)``)::

            # shardfn schedule name=1f1b ranks=2 stages=2 microbatches=2 placement=loop
                     Rank 0 Rank 1
            Step 00: 0F0    1F0
            Step 01: 0F1    1B0
            ...
    """
    mark = dict(mark or {})
    programs = schedule.programs
    num_steps = max(len(p) for p in programs)
    cells = [
        [
            (str(p[k]) if k < len(p) else _EMPTY) + ("*" if mark.get(r) == k else "")
            for r, p in enumerate(programs)
        ]
        for k in range(num_steps)
    ]
    labels = [f"Rank {r}" for r in range(len(programs))]
    widths = [max([len(labels[r])] + [len(row[r]) for row in cells]) for r in range(len(programs))]
    step_width = len(str(max(num_steps - 1, 0)))
    lines = [
        f"# shardfn schedule name={schedule.name} ranks={schedule.num_ranks} stages={schedule.num_stages} "
        f"microbatches={schedule.num_microbatches} placement={schedule.placement}",
        " " * (step_width + 7) + " ".join(f"{lab:<{w}}" for lab, w in zip(labels, widths)).rstrip(),
    ]
    marked_rows = sorted(set(mark.values()))
    for k, row in enumerate(cells):
        line = f"Step {k:0{step_width}d}: " + " ".join(f"{c:<{w}}" for c, w in zip(row, widths))
        line = line.rstrip()
        if k in marked_rows:
            line += "  <-- " + (note if note and k == marked_rows[0] else "here")
        lines.append(line)
    return "\n".join(lines) + "\n"


_HEADER = re.compile(
    r"^#\s*shardfn schedule name=(\S*) ranks=(\d+) stages=(\d+) microbatches=(\d+) placement=(\w+)\s*$"
)
_ROW = re.compile(r"^Step\s+(\d+):(.*)$")


def parse_schedule(text: str) -> Schedule:
    """Rebuild a `Schedule` from its `format` text: ``parse_schedule(format(s)) == s``.

    Args:
        text: the grid. Lines other than the header and ``Step NN:`` rows are ignored;
            ``.`` is an empty cell. Markers added by validation errors are not accepted.

    Returns:
        The `Schedule`.

    Raises:
        ValueError: no header line, a row with the wrong number of cells, or a bad action.
    """
    header, rows = None, []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.rstrip()
        if header is None and _HEADER.match(line):
            header = _HEADER.match(line).groups()
            continue
        match = _ROW.match(line.strip())
        if match:
            rows.append((number, match.group(2).split()))
    if header is None:
        raise ValueError(
            "parse_schedule: no header line '# shardfn schedule name=.. ranks=.. stages=.. "
            "microbatches=.. placement=..'; pass text produced by shardfn.schedules.format."
        )
    name, ranks, stages, microbatches, placement = header
    num_ranks = int(ranks)
    programs: list[list[Action]] = [[] for _ in range(num_ranks)]
    for number, cells in rows:
        if len(cells) != num_ranks:
            raise ValueError(
                f"parse_schedule: line {number} has {len(cells)} cells {cells}, expected one per rank "
                f"(ranks={num_ranks}); use '.' for an empty cell."
            )
        for r, cell in enumerate(cells):
            if cell == _EMPTY:
                continue
            try:
                programs[r].append(parse_action(cell))
            except ValueError as err:
                raise ValueError(f"parse_schedule: line {number}, rank {r}: {err}") from None
    return Schedule(programs, int(stages), int(microbatches), placement, name)
