"""Errors the simulated mesh raises when devices disagree, deadlock or never arrive."""
from __future__ import annotations

__all__ = ["CollectiveMismatchError", "DeadlockError", "MeshTimeoutError", "annotate"]


class CollectiveMismatchError(RuntimeError):
    """Devices of one group called different collectives (or shapes/dtypes) at the same step."""


class DeadlockError(RuntimeError):
    """Every device still running waits for a collective or message that can never come."""


class MeshTimeoutError(TimeoutError):
    """A device did not arrive at a rendezvous within the mesh's timeout."""


def annotate(err: BaseException, note: str) -> BaseException:
    """Add `note` (e.g. where a device raised) to an exception's message, keeping its type; returns it."""
    if err.args and isinstance(err.args[0], str):
        if note not in err.args[0]:
            err.args = (f"{err.args[0]} {note}",) + tuple(err.args[1:])
    elif hasattr(err, "add_note"):
        err.add_note(note)
    return err
