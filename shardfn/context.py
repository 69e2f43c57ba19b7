"""The per-device context a program runs in inside shard_map (thread-local)."""
from __future__ import annotations

import threading
from contextlib import contextmanager

__all__ = ["DeviceContext", "current", "require", "use"]

_tls = threading.local()


class DeviceContext:
    """What one device's program needs: its mesh position, its communicator and the vma switch.

    `recorders` is the tuple of active `count_comms` logs captured when the work was dispatched
    (sim threads), or None to read them from the calling thread (dist).
    """

    __slots__ = ("mesh", "index", "coords", "comm", "check_vma", "recorders", "suspended")

    def __init__(self, mesh, index, comm, *, check_vma, recorders):
        self.mesh = mesh
        self.index = index
        self.coords = mesh.coords_of(index)
        self.comm = comm
        self.check_vma = check_vma
        self.recorders = recorders
        self.suspended = False


def current() -> DeviceContext | None:
    """The device context of the calling thread, or None outside shard_map."""
    return getattr(_tls, "ctx", None)


def require(api: str) -> DeviceContext:
    """The current device context; a clear error when called outside shard_map."""
    ctx = getattr(_tls, "ctx", None)
    if ctx is None:
        raise RuntimeError(
            f"shardfn.{api} is a collective over named mesh axes and runs only inside a function "
            f"mapped by shard_map. Wrap the per-device program: shard_map(f, mesh=mesh, in_specs=..., out_specs=...)."
        )
    return ctx


def swap(ctx: DeviceContext | None) -> DeviceContext | None:
    """Install `ctx` as the calling thread's device context; return the previous one."""
    prev = getattr(_tls, "ctx", None)
    _tls.ctx = ctx
    return prev


@contextmanager
def use(ctx: DeviceContext | None):
    """Make `ctx` the calling thread's device context for the duration of the block."""
    prev = getattr(_tls, "ctx", None)
    _tls.ctx = ctx
    try:
        yield ctx
    finally:
        _tls.ctx = prev
