"""Debugging aids: count the bytes each collective sends (`count_comms`)."""
from __future__ import annotations

import contextvars
from collections import defaultdict
from contextlib import contextmanager
from fractions import Fraction

import attrs

__all__ = ["CommRecord", "CommLog", "count_comms"]

_active: contextvars.ContextVar[tuple] = contextvars.ContextVar("shardfn_comm_logs", default=())


@attrs.frozen
class CommRecord:
    """One collective issued by one device.

    Attributes:
        name: the collective ("psum", "all_gather", "psum_scatter", "all_to_all", "ppermute", "p2p").
        axis_name: the mesh axes it ran over (tuple, major first).
        bytes_sent: bytes this device sends under the ring algorithms of PERF.md 2.1
            (all-reduce 2(n-1)/n·M, all-gather and reduce-scatter (n-1)/n·M of the full tensor M,
            all-to-all (n-1)/n·M_local, a permute or p2p send its payload); exact, a Fraction.
        device: the device's flat rank in the mesh.
        phase: "forward" or "backward" (collectives issued by a transpose rule).
    """

    name: str
    axis_name: tuple
    bytes_sent: Fraction
    device: int
    phase: str


class CommLog:
    """The records collected by one `count_comms()` block (thread-safe appends)."""

    def __init__(self):
        self.records: list[CommRecord] = []

    def bytes_per_device(self, *, name=None, phase=None) -> dict[int, Fraction]:
        """Total bytes sent by each device, optionally only for one collective name or phase."""
        out = defaultdict(Fraction)
        for r in self.records:
            if (name is None or r.name == name) and (phase is None or r.phase == phase):
                out[r.device] += r.bytes_sent
        return dict(out)

    def bytes_sent(self, device: int = 0, *, name=None, phase=None) -> Fraction:
        """Bytes sent by one device (default: device 0)."""
        return self.bytes_per_device(name=name, phase=phase).get(device, Fraction(0))

    def calls(self, device: int = 0) -> list[tuple[str, tuple, str]]:
        """(name, axis_name, phase) of each collective one device issued, in order."""
        return [(r.name, r.axis_name, r.phase) for r in self.records if r.device == device]

    def __repr__(self) -> str:
        return f"CommLog({len(self.records)} records, device 0 sent {float(self.bytes_sent(0)):.0f} B)"


@contextmanager
def count_comms():
    """Record every collective issued inside the block, forward and backward.

    Yields:
        A CommLog; read it after (or during) the block.

    Example:
        >>> with count_comms() as log:
        ...     y = shard_map(lambda x: psum(x, 'dp'), mesh=mesh, in_specs=P('dp'), out_specs=P())(x)
        >>> log.bytes_sent(0)
    """
    log = CommLog()
    token = _active.set(_active.get() + (log,))
    try:
        yield log
    finally:
        _active.reset(token)


def active_logs() -> tuple:
    """The CommLogs active in the calling thread's context."""
    return _active.get()


def record(ctx, name: str, axis_name: tuple, numerator: int, phase: str, denominator: int = 1) -> None:
    """Append one record (numerator/denominator bytes) to every log active for `ctx` (a DeviceContext)."""
    logs = ctx.recorders if ctx.recorders is not None else _active.get()
    if logs:
        rec = CommRecord(name, tuple(axis_name), Fraction(numerator, denominator), ctx.index, phase)
        for log in logs:
            log.records.append(rec)
