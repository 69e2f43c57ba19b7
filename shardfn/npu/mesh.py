"""Meshes with HCCL settings: `make_npu_mesh` applies per-group buffer sizes when creating the groups."""
from __future__ import annotations

from typing import Sequence

import torch

from shardfn.mesh import Mesh, _make_dist_mesh, make_mesh
from shardfn.npu.hccl import HcclOptions, mesh_group_options

__all__ = ["make_npu_mesh"]


def make_npu_mesh(
    axis_shapes: Sequence[int],
    axis_names: Sequence[str],
    *,
    hccl: HcclOptions | None = None,
    backend: str = "auto",
    device_type: str | None = None,
    timeout: float = 60.0,
) -> Mesh:
    """`shardfn.make_mesh` plus HCCL settings applied as process-group options.

    On an npu dist mesh each axis's group is created with its HCCL buffer size
    (`HcclOptions`, FEATURES.md 41) through `init_device_mesh(backend_override=...)`. On any other
    mesh (cpu, cuda, or the simulated backend) the settings are accepted and ignored, with one log
    line saying so, and the result is exactly `make_mesh(...)`.

    Args:
        axis_shapes, axis_names, backend, device_type, timeout: as for `shardfn.make_mesh`.
        hccl: the HCCL settings, or None.

    Returns:
        The Mesh.
    """
    dist = torch.distributed
    resolved = backend
    if backend == "auto":
        resolved = "dist" if dist.is_available() and dist.is_initialized() else "sim"
    effective_device = device_type or ("cpu" if resolved == "sim" else None)
    if resolved == "dist" and effective_device is None:
        effective_device = {"gloo": "cpu", "nccl": "cuda", "hccl": "npu"}.get(str(dist.get_backend()), "cpu")
    overrides = mesh_group_options(tuple(axis_names), hccl, device_type=effective_device)
    if resolved == "dist" and overrides:
        return _make_dist_mesh(tuple(axis_shapes), tuple(axis_names), effective_device, timeout, backend_override=overrides)
    return make_mesh(axis_shapes, axis_names, backend=resolved, device_type=device_type, timeout=timeout)
