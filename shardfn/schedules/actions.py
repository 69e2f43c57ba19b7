"""Pipeline actions: one unit of work of one stage on one microbatch.

The text form follows torch.distributed.pipelining's action strings, so orders
can be exchanged with torch: ``0F1`` is stage 0 running the forward of
microbatch 1, ``3SEND_F1`` is stage 3 sending that forward's output to stage 4,
and ``(0F4;7B1)OVERLAP_F_B`` is DualPipe's overlapped forward/backward pair.
"""

from __future__ import annotations

import enum
import re

import attrs

__all__ = ["Action", "Kind", "parse_action", "COMPUTE_KINDS", "COMM_KINDS"]


class Kind(str, enum.Enum):
    """What an action does. Values are the torch action-string codes."""

    F = "F"  # forward
    B = "B"  # full backward: input gradient and weight gradient together
    I = "I"  # noqa: E741  backward for the input gradient only (zero-bubble dX)
    W = "W"  # backward for the weight gradient only (zero-bubble dW)
    SEND_F = "SEND_F"  # send this stage's forward output to stage + 1
    RECV_F = "RECV_F"  # receive this stage's forward input from stage - 1
    SEND_B = "SEND_B"  # send this stage's input gradient to stage - 1
    RECV_B = "RECV_B"  # receive this stage's output gradient from stage + 1
    OVERLAP_F_B = "OVERLAP_F_B"  # a forward and a backward run overlapped (DualPipe)

    def __repr__(self) -> str:
        return f"Kind.{self.name}"


COMPUTE_KINDS = frozenset({Kind.F, Kind.B, Kind.I, Kind.W, Kind.OVERLAP_F_B})
COMM_KINDS = frozenset({Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B})

# Longest codes first so that "SEND_F" is never read as something shorter.
_SIMPLE = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)$")
_OVERLAP = re.compile(r"^\((.*)\)OVERLAP_F_B$")


def _check_sub_actions(instance, attribute, value):
    if instance.kind is Kind.OVERLAP_F_B:
        kinds = tuple(a.kind for a in value)
        if len(value) != 2 or kinds[0] is not Kind.F or kinds[1] not in (Kind.B, Kind.I):
            raise ValueError(
                f"Action: an OVERLAP_F_B action needs sub_actions (forward, backward) with kinds "
                f"(F, B or I); got {tuple(str(a) for a in value)}. Build it with "
                f"Action.overlap(Action(s, Kind.F, m), Action(t, Kind.B, n))."
            )
        if instance.stage != value[0].stage or instance.microbatch is not None:
            raise ValueError(
                f"Action: an OVERLAP_F_B action has stage = its forward's stage "
                f"({value[0].stage}) and microbatch None; got stage={instance.stage}, "
                f"microbatch={instance.microbatch}. Use Action.overlap(forward, backward)."
            )
    elif value:
        raise ValueError(f"Action: only OVERLAP_F_B takes sub_actions; {instance.kind.value} got {value}.")
    elif instance.microbatch is None or instance.microbatch < 0:
        raise ValueError(
            f"Action: a {instance.kind.value} action needs a microbatch >= 0; got {instance.microbatch}."
        )


def _to_kind(value) -> Kind:
    return value if isinstance(value, Kind) else Kind(value)


@attrs.frozen(repr=False, order=False)
class Action:
    """One action of a pipeline schedule.

    Attributes:
        stage: model stage (global index in model order) the action works on. For an
            OVERLAP_F_B pair it is the forward's stage.
        kind: a `Kind`; plain strings such as ``"F"`` are converted.
        microbatch: microbatch index (None only for OVERLAP_F_B).
        sub_actions: for OVERLAP_F_B, the pair (forward, backward); empty otherwise.

    ``str(a)`` gives torch's action string and `parse_action` inverts it:
    ``parse_action(str(a)) == a``. Example: ``Action(0, "F", 1)`` prints ``0F1``.
    """

    stage: int = attrs.field(validator=attrs.validators.ge(0))
    kind: Kind = attrs.field(converter=_to_kind)
    microbatch: int | None = None
    sub_actions: tuple[Action, ...] = attrs.field(default=(), converter=tuple, validator=_check_sub_actions)

    @staticmethod
    def overlap(forward: Action, backward: Action) -> Action:
        """Pair a forward with a backward that run overlapped (DualPipe's F&B)."""
        return Action(forward.stage, Kind.OVERLAP_F_B, None, (forward, backward))

    @property
    def computes(self) -> tuple[Action, ...]:
        """The compute actions this action runs: the pair for OVERLAP_F_B, else itself."""
        return self.sub_actions if self.kind is Kind.OVERLAP_F_B else (self,)

    def __str__(self) -> str:
        if self.kind is Kind.OVERLAP_F_B:
            return f"({';'.join(str(a) for a in self.sub_actions)}){self.kind.value}"
        return f"{self.stage}{self.kind.value}{self.microbatch}"

    __repr__ = __str__


def parse_action(text: str) -> Action:
    """Parse torch's action string (``2F0``, ``3SEND_B1``, ``(0F4;7B1)OVERLAP_F_B``).

    Args:
        text: the action string; surrounding whitespace is ignored.

    Returns:
        The `Action`, with ``str(parse_action(s)) == s.strip()`` for well-formed input.

    Raises:
        ValueError: the text is not an action string.
    """
    text = text.strip()
    match = _SIMPLE.match(text)
    if match:
        stage, kind, microbatch = match.groups()
        return Action(int(stage), Kind(kind), int(microbatch))
    match = _OVERLAP.match(text)
    if match:
        parts = [p for p in match.group(1).split(";") if p.strip()]
        subs = tuple(parse_action(p) for p in parts)
        if len(subs) != 2:
            raise ValueError(f"parse_action: {text!r} must hold exactly two sub-actions, e.g. (0F4;7B1)OVERLAP_F_B.")
        return Action.overlap(*subs)
    raise ValueError(
        f"parse_action: {text!r} is not an action string; expected [stage][kind][microbatch] such as "
        f"'0F1', '2I3', '1SEND_F0', or '(0F4;7B1)OVERLAP_F_B'."
    )
