"""shardfn: JAX-style functional sharding over PyTorch.

Write the per-device program of a step as a pure function, name the mesh axes, say how each input
and output is split, and `shard_map` runs it on a simulated mesh (threads) or under torchrun.
"""
from shardfn import debug
from shardfn.errors import CollectiveMismatchError, DeadlockError, MeshTimeoutError
from shardfn.mesh import Mesh, current_mesh, make_mesh
from shardfn.primitives.collectives import (
    all_gather,
    all_gather_invariant,
    all_to_all,
    axis_index,
    axis_size,
    pmax,
    pmean,
    pmin,
    ppermute,
    psum,
    psum_scatter,
    pvary,
)
from shardfn.shard_map import shard_map
from shardfn.spec import P
from shardfn.vma import vma_of

from shardfn import npu  # noqa: E402  (after the collectives: npu.mc2 builds on them)
from shardfn import flops, layers, memory, optim, schedules  # noqa: E402

__all__ = [
    "Mesh",
    "make_mesh",
    "current_mesh",
    "P",
    "shard_map",
    "psum",
    "pmean",
    "pmax",
    "pmin",
    "pvary",
    "all_gather",
    "all_gather_invariant",
    "psum_scatter",
    "all_to_all",
    "ppermute",
    "axis_index",
    "axis_size",
    "vma_of",
    "debug",
    "npu",
    "schedules",
    "optim",
    "layers",
    "memory",
    "flops",
    "CollectiveMismatchError",
    "DeadlockError",
    "MeshTimeoutError",
]
