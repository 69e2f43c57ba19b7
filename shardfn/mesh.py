"""Mesh: an n-d grid of devices with named axes, on the simulated or the torch.distributed backend."""
from __future__ import annotations

import contextvars
import math
import types
from typing import Sequence

import torch

__all__ = ["Mesh", "make_mesh", "current_mesh"]

_BACKENDS = ("auto", "sim", "dist")
_DEVICE_FOR_PG_BACKEND = {"gloo": "cpu", "nccl": "cuda", "hccl": "npu"}
_current: contextvars.ContextVar[tuple] = contextvars.ContextVar("shardfn_current_mesh", default=())


class Mesh:
    """An n-d grid of devices with named axes (major to minor, the last axis fastest over ranks).

    Attributes:
        axis_names: the axis names, major first.
        shape: read-only ordered mapping axis name -> size.
        size: number of devices.
        backend: "sim" (threads in this process) or "dist" (one process per device).
        device_type: "cpu", "cuda" or "npu".
        timeout: seconds any rendezvous of the sim backend may wait before it fails.

    `with mesh:` makes it the current mesh, so `shard_map(..., mesh=None)` uses it.
    """

    def __init__(self, axis_shapes, axis_names, *, backend, device_type, timeout, device_mesh=None):
        self.axis_names = tuple(axis_names)
        self.shape = types.MappingProxyType(dict(zip(self.axis_names, (int(s) for s in axis_shapes))))
        self.size = math.prod(self.shape.values())
        self.backend = backend
        self.device_type = device_type
        self.timeout = float(timeout)
        self.device_mesh = device_mesh
        self._strides = {}
        stride = 1
        for name in reversed(self.axis_names):
            self._strides[name] = stride
            stride *= self.shape[name]
        self._runtime = None
        self._tokens = []

    def coords_of(self, index: int) -> dict:
        """Mesh coordinates {axis: index} of the device with flat rank `index`."""
        return {a: (index // self._strides[a]) % self.shape[a] for a in self.axis_names}

    def index_of(self, coords: dict) -> int:
        """Flat rank of the device at `coords`."""
        return sum(coords[a] * self._strides[a] for a in self.axis_names)

    def describe(self, index: int) -> str:
        """A device as people read it: ``(dp=0, tp=1)``."""
        c = self.coords_of(index)
        return "(" + ", ".join(f"{a}={c[a]}" for a in self.axis_names) + ")"

    @property
    def runtime(self):
        """The backend object that runs per-device programs (created on first use)."""
        if self._runtime is None:
            if self.backend == "sim":
                from shardfn.backends.sim import SimRuntime

                self._runtime = SimRuntime(self)
            else:
                from shardfn.backends.dist import DistRuntime

                self._runtime = DistRuntime(self)
        return self._runtime

    def __enter__(self) -> "Mesh":
        self._tokens.append(_current.set(_current.get() + (self,)))
        return self

    def __exit__(self, *exc) -> None:
        _current.reset(self._tokens.pop())

    def __repr__(self) -> str:
        return f"Mesh({dict(self.shape)}, backend={self.backend!r}, device_type={self.device_type!r})"


def current_mesh() -> Mesh | None:
    """The innermost mesh entered with `with mesh:`, or None."""
    stack = _current.get()
    return stack[-1] if stack else None


def make_mesh(
    axis_shapes: Sequence[int],
    axis_names: Sequence[str],
    *,
    backend: str = "auto",
    device_type: str | None = None,
    timeout: float = 60.0,
) -> Mesh:
    """Make a device mesh with named axes.

    Args:
        axis_shapes: size of each axis, major first, e.g. (2, 4).
        axis_names: name of each axis, e.g. ("dp", "tp").
        backend: "sim" runs one thread per device in this process; "dist" uses the initialised
            torch.distributed world (torchrun), wrapping `init_device_mesh` (gloo on cpu, nccl on
            cuda, hccl on npu); "auto" picks "dist" when torch.distributed is initialised, else "sim".
        device_type: "cpu", "cuda" or "npu"; by default "cpu" for sim and the process group's
            device for dist.
        timeout: seconds any sim rendezvous may wait for a missing device before failing.

    Returns:
        The Mesh.

    Raises:
        TypeError / ValueError: bad shapes, names, backend, or a mesh size that is not the world size.

    Example:
        >>> mesh = make_mesh((2, 4), ("dp", "tp"), backend="sim")
        >>> dict(mesh.shape)
        {'dp': 2, 'tp': 4}
    """
    axis_shapes = tuple(axis_shapes)
    axis_names = tuple(axis_names)
    if len(axis_shapes) != len(axis_names):
        raise ValueError(
            f"make_mesh: axis_shapes {axis_shapes} and axis_names {axis_names} have different lengths "
            f"({len(axis_shapes)} vs {len(axis_names)}). Give one name per axis size."
        )
    bad_shapes = [s for s in axis_shapes if not isinstance(s, int) or isinstance(s, bool) or s < 1]
    if bad_shapes:
        raise ValueError(f"make_mesh: axis_shapes must be positive ints; got {axis_shapes}. Example: (2, 4).")
    bad_names = [n for n in axis_names if not isinstance(n, str) or not n]
    if bad_names:
        raise TypeError(f"make_mesh: axis_names must be non-empty strings; got {axis_names}. Example: ('dp', 'tp').")
    if len(set(axis_names)) != len(axis_names):
        raise ValueError(f"make_mesh: axis_names {axis_names} repeat a name; each axis needs its own name.")
    if backend not in _BACKENDS:
        raise ValueError(f"make_mesh: backend={backend!r} is not one of {_BACKENDS}.")
    if not timeout > 0:
        raise ValueError(f"make_mesh: timeout={timeout!r} must be a positive number of seconds.")
    dist = torch.distributed
    if backend == "auto":
        backend = "dist" if dist.is_available() and dist.is_initialized() else "sim"
    if backend == "sim":
        return Mesh(axis_shapes, axis_names, backend="sim", device_type=device_type or "cpu", timeout=timeout)
    return _make_dist_mesh(axis_shapes, axis_names, device_type, timeout)


def _make_dist_mesh(axis_shapes, axis_names, device_type, timeout, backend_override=None) -> Mesh:
    from torch.distributed.device_mesh import init_device_mesh

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "make_mesh(backend='dist') needs an initialised torch.distributed world. Start the program "
            "with torchrun and call torch.distributed.init_process_group() first, or use backend='sim'."
        )
    world = dist.get_world_size()
    size = math.prod(axis_shapes)
    if size != world:
        raise ValueError(
            f"make_mesh: mesh size {size} (axis_shapes {axis_shapes}) does not equal the world size {world}. "
            f"Choose axis sizes whose product is {world}, e.g. ({world},)."
        )
    if device_type is None:
        device_type = _DEVICE_FOR_PG_BACKEND.get(str(dist.get_backend()), "cpu")
    if device_type == "npu":
        from shardfn.npu import torch_npu_module

        if torch_npu_module() is None:
            raise ValueError(
                "make_mesh: device_type='npu' needs torch_npu (pip install torch_npu on an Ascend host); "
                "use device_type='cpu' or 'cuda' elsewhere."
            )
    kwargs = {"backend_override": backend_override} if backend_override else {}
    device_mesh = init_device_mesh(device_type, axis_shapes, mesh_dim_names=axis_names, **kwargs)
    return Mesh(axis_shapes, axis_names, backend="dist", device_type=device_type, timeout=timeout, device_mesh=device_mesh)
