"""Errors the simulated mesh raises when devices disagree, deadlock or never arrive."""
from __future__ import annotations

__all__ = ["CollectiveMismatchError", "DeadlockError", "MeshTimeoutError"]


class CollectiveMismatchError(RuntimeError):
    """Devices of one group called different collectives (or shapes/dtypes) at the same step."""


class DeadlockError(RuntimeError):
    """Every device still running waits for a collective or message that can never come."""


class MeshTimeoutError(TimeoutError):
    """A device did not arrive at a rendezvous within the mesh's timeout."""
