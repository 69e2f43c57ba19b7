"""Partition specs: `P`, their validation against a mesh, and splitting/joining by spec."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator, Sequence

import attrs
import torch

if TYPE_CHECKING:
    from shardfn.mesh import Mesh

__all__ = ["P", "entry_axes", "spec_axes", "check_spec", "local_shape", "block_index", "local_block", "join_blocks"]


def _normalize_entry(entry):
    if entry is None or isinstance(entry, str):
        return entry
    if isinstance(entry, (tuple, list)) and all(isinstance(a, str) for a in entry):
        entry = tuple(entry)
        if len(entry) == 0:
            return None
        return entry[0] if len(entry) == 1 else entry
    raise TypeError(
        f"P: each entry must be None, an axis name (str) or a tuple of axis names; got {entry!r}. "
        f"Example: P('dp', None) or P(('dp', 'tp'), None)."
    )


@attrs.frozen(init=False, repr=False)
class P:
    """A partition spec: one entry per tensor dim (None, an axis name, or a tuple of axis names).

    Mesh axes a spec does not name mean "replicated over that axis". A tuple entry splits the
    dim over the product of its axes, the first name major. Trailing dims may be omitted.

    Example:
        >>> P('dp', None)
        P('dp', None)
    """

    entries: tuple

    def __init__(self, *entries):
        self.__attrs_init__(tuple(_normalize_entry(e) for e in entries))

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator:
        return iter(self.entries)

    def __getitem__(self, i):
        return self.entries[i]

    def __repr__(self) -> str:
        return "P(" + ", ".join(repr(e) for e in self.entries) + ")"


def entry_axes(entry) -> tuple[str, ...]:
    """The axis names of one spec entry, major first."""
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def spec_axes(spec: P | None) -> tuple[str, ...]:
    """Every axis name a spec uses, in order of appearance."""
    if spec is None:
        return ()
    return tuple(a for e in spec.entries for a in entry_axes(e))


def check_spec(spec: P | None, shape: Sequence[int], mesh: "Mesh", where: str, *, allow_uneven: bool = False) -> list[str]:
    """Return every rule `spec` breaks for a tensor of `shape` on `mesh` (empty when valid)."""
    if spec is None:
        return []
    problems = []
    names = spec_axes(spec)
    unknown = [a for a in names if a not in mesh.shape]
    if unknown:
        problems.append(
            f"{where} = {spec!r} names axis {', '.join(map(repr, unknown))} which the mesh does not have "
            f"(mesh axes: {tuple(mesh.axis_names)}). Use one of the mesh's axis names."
        )
    repeated = sorted({a for a in names if names.count(a) > 1})
    if repeated:
        problems.append(
            f"{where} = {spec!r} uses axis {', '.join(map(repr, repeated))} more than once; "
            f"an axis can split only one dim. Name each axis once."
        )
    if len(spec) > len(shape):
        problems.append(
            f"{where} = {spec!r} has {len(spec)} entries but the tensor has rank {len(shape)} "
            f"(shape {tuple(shape)}). Give at most one entry per dim."
        )
    if problems or allow_uneven:
        return problems
    for dim, entry in enumerate(spec.entries):
        axes = entry_axes(entry)
        if not axes:
            continue
        size = math.prod(mesh.shape[a] for a in axes)
        if shape[dim] % size:
            problems.append(
                f"{where} splits dim {dim} (size {shape[dim]}) over {axes} (size {size}); "
                f"{shape[dim]} is not divisible by {size}. Pad dim {dim} to a multiple of {size}, "
                f"or leave it unsplit with None."
            )
    return problems


def local_shape(shape: Sequence[int], spec: P | None, mesh: "Mesh") -> tuple[int, ...]:
    """The per-device shape of a global `shape` split by `spec` (divisible sizes)."""
    out = list(shape)
    if spec is not None:
        for dim, entry in enumerate(spec.entries):
            for a in entry_axes(entry):
                out[dim] //= mesh.shape[a]
    return tuple(out)


def block_index(axes: Sequence[str], coords: dict, mesh: "Mesh") -> int:
    """Mixed-radix index of a device within the product of `axes` (first axis major)."""
    index = 0
    for a in axes:
        index = index * mesh.shape[a] + coords[a]
    return index


def local_block(x: torch.Tensor, spec: P | None, coords: dict, mesh: "Mesh") -> torch.Tensor:
    """The block of global `x` that the device at `coords` holds under `spec` (a view)."""
    if spec is None:
        return x
    for dim, entry in enumerate(spec.entries):
        axes = entry_axes(entry)
        if not axes:
            continue
        n = math.prod(mesh.shape[a] for a in axes)
        size = x.shape[dim] // n
        x = x.narrow(dim, block_index(axes, coords, mesh) * size, size)
    return x


def join_blocks(blocks: Sequence[torch.Tensor], coords: Sequence[dict], spec: P | None, mesh: "Mesh") -> torch.Tensor:
    """Assemble the global value from per-device blocks (devices replicated over unnamed axes agree)."""
    split = [(dim, entry_axes(e)) for dim, e in enumerate(spec.entries) if entry_axes(e)] if spec is not None else []
    if not split:
        return blocks[0]
    by_key = {}
    for block, c in zip(blocks, coords):
        key = tuple(block_index(axes, c, mesh) for _, axes in split)
        by_key.setdefault(key, block)

    def assemble(level: int, prefix: tuple) -> torch.Tensor:
        if level == len(split):
            return by_key[prefix]
        dim, axes = split[level]
        n = math.prod(mesh.shape[a] for a in axes)
        return torch.cat([assemble(level + 1, prefix + (i,)) for i in range(n)], dim=dim)

    return assemble(0, ())
