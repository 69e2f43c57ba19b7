"""Replace gloo: object and CPU-tensor gathers over the device group, slice by slice (FEATURES.md 42).

Megatron keeps gloo side groups next to the device groups for object gathers and the distributed
optimizer's checkpoint gather/scatter. At thousands of ranks gloo's full-mesh connect fails, so
MindSpeed's ``--disable-gloo-group`` drops them and moves those payloads over the device (HCCL)
group instead. This module is that replacement, written against two collectives every backend has
(equal-size all-gather and broadcast):

1. Lengths first: every rank all-gathers its payload length (one int64), so all ranks know the
   longest payload ``max_len`` and the number of rounds ``ceil(max_len / slice_size)``.
2. Rounds: in round ``r`` every rank sends elements ``[r*S, (r+1)*S)`` of its flat payload,
   zero-padded to the round's width ``min(S, max_len - r*S)``; the slice is copied to the
   group's device, all-gathered, copied back to the CPU, and the receivers keep each rank's valid
   part. Extra device memory per round is about ``S * (d + 1)`` elements for a group of ``d``.
3. Scatter is the mirror: the source broadcasts a ``[d, S]`` block per round (row ``i`` is slice
   ``r`` of rank ``i``'s payload) and rank ``i`` keeps row ``i``. Broadcast, not scatter, because
   every device backend (HCCL, NCCL, gloo) and the simulated mesh have it.

Objects are pickled to uint8 tensors and moved the same way (``slice_size`` is then in bytes).
Like ``torch.distributed``'s object collectives this unpickles what other ranks send: use it only
within a trusted job.

Where the bytes go: pass ``group=`` (a torch.distributed process group, e.g.
:func:`device_group` of a dist mesh axis; None = the world), or ``axis_name=`` inside
``shard_map`` to use shardfn's collectives (works on the simulated mesh and on dist meshes).
``dst`` / ``src`` are ranks within the group (the axis index for ``axis_name``).

The pure pieces (:func:`slice_bounds`, :func:`round_slices`, :func:`unpack_round`,
:func:`object_to_bytes`, :func:`bytes_to_object`) carry the slicing and padding and are tested
without any communication.
"""
from __future__ import annotations

import math
import pickle
from typing import Any, Sequence

import attrs
import torch

__all__ = [
    "DEFAULT_SLICE_SIZE",
    "slice_bounds",
    "round_slices",
    "unpack_round",
    "object_to_bytes",
    "bytes_to_object",
    "device_group",
    "sliced_all_gather",
    "sliced_gather",
    "sliced_scatter",
    "all_gather_object",
    "gather_object",
    "scatter_object",
    "broadcast_object",
]

DEFAULT_SLICE_SIZE = 10 * 2**20  # MindSpeed's --hccl-slice-size default (elements)


# ---- pure pieces ---------------------------------------------------------------------------------
def _check_slice_size(api: str, slice_size: int) -> int:
    if not isinstance(slice_size, int) or isinstance(slice_size, bool) or slice_size < 1:
        raise ValueError(f"{api}: slice_size={slice_size!r} must be a positive int (elements per round); "
                         f"e.g. {DEFAULT_SLICE_SIZE} (10 * 2**20, MindSpeed's --hccl-slice-size default).")
    return slice_size


def slice_bounds(max_len: int, slice_size: int) -> list[tuple[int, int]]:
    """The rounds of a sliced transfer: ``[(start, stop), ...]`` covering ``[0, max_len)``.

    Args:
        max_len: the longest payload in the group (elements), >= 0.
        slice_size: elements per round, >= 1.

    Returns:
        ``ceil(max_len / slice_size)`` half-open ranges; every one has width ``slice_size``
        except the last, which has ``max_len - start`` (so nothing beyond ``max_len`` is sent).
    """
    _check_slice_size("slice_bounds", slice_size)
    if max_len < 0:
        raise ValueError(f"slice_bounds: max_len={max_len} must be >= 0.")
    return [(s, min(s + slice_size, max_len)) for s in range(0, max_len, slice_size)]


def round_slices(flat: torch.Tensor, max_len: int, slice_size: int) -> list[torch.Tensor]:
    """What one rank sends in each round: its payload cut at :func:`slice_bounds`, zero-padded.

    Args:
        flat: this rank's payload [n] with ``n <= max_len``.
        max_len: the longest payload in the group.
        slice_size: elements per round.

    Returns:
        One tensor per round, round ``r`` of width ``stop_r - start_r`` holding
        ``flat[start_r:stop_r]`` followed by zeros where ``flat`` has ended.
    """
    if flat.dim() != 1 or flat.numel() > max_len:
        raise ValueError(f"round_slices: flat must be 1-d with at most max_len={max_len} elements; "
                         f"got shape {tuple(flat.shape)}.")
    out = []
    for start, stop in slice_bounds(max_len, slice_size):
        piece = flat[start:stop]
        if piece.numel() < stop - start:
            piece = torch.cat([piece, piece.new_zeros(stop - start - piece.numel())])
        out.append(piece)
    return out


def unpack_round(rows: torch.Tensor, start: int, lengths: Sequence[int]) -> list[torch.Tensor]:
    """Each rank's valid part of one gathered round (the padding dropped).

    Args:
        rows: the round as gathered, [d, w]: row ``i`` is rank ``i``'s slice ``[start, start+w)``.
        start: the round's first element.
        lengths: every rank's payload length, [d].

    Returns:
        ``d`` tensors; rank ``i``'s has ``clamp(lengths[i] - start, 0, w)`` elements.
    """
    if rows.dim() != 2 or rows.shape[0] != len(lengths):
        raise ValueError(f"unpack_round: rows must be [d, w] with d = len(lengths) = {len(lengths)}; "
                         f"got shape {tuple(rows.shape)}.")
    w = rows.shape[1]
    return [rows[i, : max(0, min(int(n) - start, w))] for i, n in enumerate(lengths)]


def object_to_bytes(obj: Any) -> torch.Tensor:
    """Pickle ``obj`` into a uint8 tensor [num_bytes] (a copy, safe to send)."""
    data = bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    return torch.frombuffer(data, dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def bytes_to_object(data: torch.Tensor) -> Any:
    """Unpickle a uint8 tensor made by :func:`object_to_bytes` (trusted senders only)."""
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise TypeError(f"bytes_to_object: expected a 1-d uint8 tensor; got {data.dtype} {tuple(data.shape)}.")
    return pickle.loads(data.cpu().numpy().tobytes())


# ---- transports: the two collectives the algorithm needs -----------------------------------------
@attrs.frozen
class _DistTransport:
    """A torch.distributed group: slices go to the group's device, results come back to the CPU."""

    group: Any
    device: torch.device
    rank: int
    size: int

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:  # [w] -> [d, w]
        dist = torch.distributed
        local = t.to(self.device)
        bufs = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(bufs, local, group=self.group)
        return torch.stack(bufs).cpu()

    def broadcast(self, t: torch.Tensor | None, src: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        dist = torch.distributed
        buf = t.to(self.device) if self.rank == src else torch.empty(shape, dtype=dtype, device=self.device)
        dist.broadcast(buf, src=dist.get_global_rank(self.group, src), group=self.group)
        return buf.cpu()


@attrs.frozen
class _AxisTransport:
    """A mesh axis inside shard_map (simulated or dist mesh), through shardfn's collectives."""

    axis_name: Any
    rank: int
    size: int

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:  # [w] -> [d, w]
        from shardfn.primitives.collectives import all_gather_invariant

        return all_gather_invariant(t, self.axis_name).detach().clone()

    def broadcast(self, t: torch.Tensor | None, src: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        # no broadcast primitive on the axis: gather and keep the source's row
        local = t if self.rank == src else torch.zeros(shape, dtype=dtype)
        return self.all_gather(local)[src]


def _device_of(group) -> torch.device:
    backend = str(torch.distributed.get_backend(group))
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "hccl":
        from shardfn.npu._dispatch import torch_npu_module

        torch_npu_module()  # importing torch_npu registers torch.npu
        return torch.device("npu", torch.npu.current_device())
    return torch.device("cpu")


def _transport(api: str, group, axis_name, device):
    if group is not None and axis_name is not None:
        raise ValueError(f"{api}: pass group= (a process group) or axis_name= (inside shard_map), not both.")
    if axis_name is not None:
        from shardfn.primitives.collectives import axis_index, axis_size

        return _AxisTransport(axis_name, int(axis_index(axis_name)), axis_size(axis_name))
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{api}: no group= or axis_name= and torch.distributed is not initialised. Call it "
                         "inside shard_map with axis_name=..., or after init_process_group().")
    group = group if group is not None else dist.group.WORLD
    dev = torch.device(device) if device is not None else _device_of(group)
    return _DistTransport(group, dev, dist.get_rank(group), dist.get_world_size(group))


def _check_rank(api: str, what: str, value: int, size: int) -> int:
    if not isinstance(value, int) or not 0 <= value < size:
        raise ValueError(f"{api}: {what}={value!r} must be a rank of the group, 0 <= {what} < {size}.")
    return value


def device_group(mesh, axis_name):
    """The device process group of a dist mesh's axis (or tuple of axes).

    This is where object gathers go when gloo side groups are replaced
    (``HcclOptions(replace_gloo=True)``; see ``shardfn.npu.uses_gloo_side_groups``). For a tuple
    of axes the group's ranks follow the mesh's axis order.
    """
    if mesh.backend != "dist":
        raise ValueError(f"device_group: {mesh!r} is not a dist mesh; on the sim mesh call the object "
                         "gathers inside shard_map with axis_name= instead.")
    names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    bad = [a for a in names if a not in mesh.axis_names]
    if bad or not names:
        raise ValueError(f"device_group: axis_name={axis_name!r} names no axis of {mesh!r} (bad: {bad}); "
                         f"use one of {mesh.axis_names}.")
    ordered = tuple(a for a in mesh.axis_names if a in names)
    return mesh.runtime.comm.group(ordered)[0]


# ---- byte movers ---------------------------------------------------------------------------------
def _all_gather_flat(tr, flat: torch.Tensor, slice_size: int, keep: bool,
                     lengths: Sequence[int] | None = None) -> list[torch.Tensor] | None:
    """Every rank's 1-d payload (any lengths), kept if ``keep`` else dropped; lengths exchanged first
    unless already known."""
    if lengths is None:
        lengths = tr.all_gather(torch.tensor([flat.numel()], dtype=torch.int64))[:, 0].tolist()
    parts: list[list[torch.Tensor]] = [[] for _ in lengths]
    for (start, _), piece in zip(slice_bounds(max(lengths), slice_size),
                                 round_slices(flat.detach().cpu(), max(lengths), slice_size)):
        rows = tr.all_gather(piece)  # [d, w]
        if keep:
            for i, p in enumerate(unpack_round(rows, start, lengths)):
                parts[i].append(p.clone())
    if not keep:
        return None
    return [torch.cat(p) if p else flat.new_zeros(0, device="cpu") for p in parts]


def _scatter_flat(tr, flats: Sequence[torch.Tensor] | None, src: int, slice_size: int,
                  dtype: torch.dtype, lengths: Sequence[int] | None = None) -> torch.Tensor:
    """This rank's 1-d payload out of ``flats`` (given on ``src`` only); lengths broadcast first
    unless already known."""
    d = tr.size
    if lengths is None:
        lengths = tr.broadcast(torch.tensor([f.numel() for f in flats], dtype=torch.int64) if tr.rank == src
                               else None, src, (d,), torch.int64).tolist()
    max_len = max(lengths)
    parts, per_rank = [], None
    if tr.rank == src:
        per_rank = [round_slices(f.detach().cpu().reshape(-1), max_len, slice_size) for f in flats]
    for r, (start, stop) in enumerate(slice_bounds(max_len, slice_size)):
        block = torch.stack([s[r] for s in per_rank]) if tr.rank == src else None  # [d, w]
        rows = tr.broadcast(block, src, (d, stop - start), dtype)
        parts.append(unpack_round(rows, start, lengths)[tr.rank].clone())
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)


# ---- public collectives --------------------------------------------------------------------------
def sliced_all_gather(tensor: torch.Tensor, *, group=None, axis_name=None, slice_size: int = DEFAULT_SLICE_SIZE,
                      device=None) -> list[torch.Tensor]:
    """All-gather every rank's tensor (shapes may differ, dtype must agree) in slices of ``slice_size``.

    Args:
        tensor: this rank's tensor, any shape.
        group: torch.distributed group (default: the world); or
        axis_name: a mesh axis, inside shard_map.
        slice_size: elements per round.
        device: where the slices go for the collective (default: the group's device).

    Returns:
        ``d`` CPU tensors in rank order, each with its sender's shape.

    Raises:
        ValueError: ranks disagree on dtype (every rank raises, naming them).
    """
    api = "sliced_all_gather"
    _check_slice_size(api, slice_size)
    tr = _transport(api, group, axis_name, device)
    metas = _all_gather_objects(tr, (tuple(tensor.shape), str(tensor.dtype)), slice_size, keep=True)
    dtypes = {m[1] for m in metas}
    if len(dtypes) > 1:
        raise ValueError(f"{api}: ranks send different dtypes {[m[1] for m in metas]} (by rank); "
                         "cast every rank's tensor to one dtype first.")
    lengths = [math.prod(shape) for shape, _ in metas]
    flats = _all_gather_flat(tr, tensor.reshape(-1), slice_size, keep=True, lengths=lengths)
    return [f.reshape(shape) for f, (shape, _) in zip(flats, metas)]


def sliced_gather(tensor: torch.Tensor, dst: int = 0, *, group=None, axis_name=None,
                  slice_size: int = DEFAULT_SLICE_SIZE, device=None) -> list[torch.Tensor] | None:
    """Gather every rank's tensor to ``dst`` over the device group, slice by slice (FEATURES.md 42).

    The device-group replacement of ``dist.gather`` on a gloo group: each round all-gathers one
    slice (HCCL has no gather), and only ``dst`` keeps the rows.

    Args:
        tensor: this rank's tensor, any shape (shapes may differ by rank; dtype must agree).
        dst: the receiving rank within the group.
        group, axis_name, slice_size, device: as for :func:`sliced_all_gather`.

    Returns:
        On ``dst``, ``d`` CPU tensors in rank order with their senders' shapes; elsewhere None.
    """
    api = "sliced_gather"
    _check_slice_size(api, slice_size)
    tr = _transport(api, group, axis_name, device)
    _check_rank(api, "dst", dst, tr.size)
    metas = _all_gather_objects(tr, (tuple(tensor.shape), str(tensor.dtype)), slice_size, keep=True)
    if len({m[1] for m in metas}) > 1:
        raise ValueError(f"{api}: ranks send different dtypes {[m[1] for m in metas]} (by rank); "
                         "cast every rank's tensor to one dtype first.")
    lengths = [math.prod(shape) for shape, _ in metas]
    flats = _all_gather_flat(tr, tensor.reshape(-1), slice_size, keep=tr.rank == dst, lengths=lengths)
    return None if flats is None else [f.reshape(shape) for f, (shape, _) in zip(flats, metas)]


def sliced_scatter(tensors: Sequence[torch.Tensor] | None, src: int = 0, *, group=None, axis_name=None,
                   slice_size: int = DEFAULT_SLICE_SIZE, device=None) -> torch.Tensor:
    """Scatter ``tensors[i]`` from ``src`` to rank ``i``, slice by slice (the mirror of :func:`sliced_gather`).

    Args:
        tensors: on ``src``, ``d`` tensors of one dtype (shapes may differ); ignored elsewhere.
        src: the sending rank within the group.
        group, axis_name, slice_size, device: as for :func:`sliced_all_gather`.

    Returns:
        This rank's tensor (CPU), with the shape it had on ``src``.
    """
    api = "sliced_scatter"
    _check_slice_size(api, slice_size)
    tr = _transport(api, group, axis_name, device)
    _check_rank(api, "src", src, tr.size)
    meta = None
    if tr.rank == src:
        tensors = list(tensors) if tensors is not None else []
        if len(tensors) != tr.size or len({t.dtype for t in tensors}) != 1:
            raise ValueError(f"{api}: src needs {tr.size} tensors of one dtype (one per rank); got "
                             f"{[(tuple(t.shape), str(t.dtype)) for t in tensors]}.")
        meta = [(tuple(t.shape), str(t.dtype)) for t in tensors]
    meta = _broadcast_object(tr, meta, src, slice_size)
    dtype = getattr(torch, meta[0][1].removeprefix("torch."))
    lengths = [math.prod(shape) for shape, _ in meta]
    flat = _scatter_flat(tr, [t.reshape(-1) for t in tensors] if tr.rank == src else None, src, slice_size, dtype,
                         lengths=lengths)
    return flat.reshape(meta[tr.rank][0])


def _all_gather_objects(tr, obj, slice_size, keep):
    flats = _all_gather_flat(tr, object_to_bytes(obj), slice_size, keep)
    return None if flats is None else [bytes_to_object(f) for f in flats]


def _broadcast_flat(tr, flat: torch.Tensor | None, src: int, slice_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``src``'s 1-d payload on every rank: its length, then one broadcast per slice."""
    (n,) = tr.broadcast(torch.tensor([flat.numel()], dtype=torch.int64) if tr.rank == src else None,
                        src, (1,), torch.int64).tolist()
    pieces = round_slices(flat.detach().cpu(), n, slice_size) if tr.rank == src else None
    parts = [tr.broadcast(pieces[r] if pieces is not None else None, src, (stop - start,), dtype)
             for r, (start, stop) in enumerate(slice_bounds(n, slice_size))]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)


def _broadcast_object(tr, obj, src, slice_size):
    flat = object_to_bytes(obj) if tr.rank == src else None
    return bytes_to_object(_broadcast_flat(tr, flat, src, slice_size, torch.uint8))


def all_gather_object(obj: Any, *, group=None, axis_name=None, slice_size: int = DEFAULT_SLICE_SIZE,
                      device=None) -> list[Any]:
    """Every rank's picklable object, on every rank, over the device group (no gloo group needed).

    Args:
        obj: this rank's object.
        group: torch.distributed group (default: the world); or
        axis_name: a mesh axis, inside shard_map.
        slice_size: bytes per round.
        device: where the slices go (default: the group's device).

    Returns:
        ``d`` objects in rank order (what ``dist.all_gather_object`` fills in).

    Example:
        On a dist mesh, with the HCCL settings' slice size:

        >>> all_gather_object({"step": 3}, group=device_group(mesh, "dp"), slice_size=opts.slice_size)
        [{'step': 3}, {'step': 3}]

        On a simulated mesh, inside shard_map:

        >>> def program(x):
        ...     names = all_gather_object(f"dev{int(axis_index('dp'))}", axis_name="dp")  # ['dev0', 'dev1']
        ...     return x
        >>> shard_map(program, mesh=make_mesh((2,), ("dp",), backend="sim"), in_specs=P("dp"),
        ...           out_specs=P("dp"))(torch.zeros(2))
    """
    api = "all_gather_object"
    tr = _transport(api, group, axis_name, device)
    return _all_gather_objects(tr, obj, _check_slice_size(api, slice_size), keep=True)


def gather_object(obj: Any, dst: int = 0, *, group=None, axis_name=None, slice_size: int = DEFAULT_SLICE_SIZE,
                  device=None) -> list[Any] | None:
    """Every rank's picklable object on ``dst`` (a list in rank order), None elsewhere.

    Same arguments as :func:`all_gather_object`, plus ``dst`` (rank within the group). Rounds
    all-gather the slices (HCCL has no gather); ranks other than ``dst`` drop them at once.
    """
    api = "gather_object"
    tr = _transport(api, group, axis_name, device)
    _check_rank(api, "dst", dst, tr.size)
    return _all_gather_objects(tr, obj, _check_slice_size(api, slice_size), keep=tr.rank == dst)


def scatter_object(objs: Sequence[Any] | None, src: int = 0, *, group=None, axis_name=None,
                   slice_size: int = DEFAULT_SLICE_SIZE, device=None) -> Any:
    """Rank ``i`` receives ``objs[i]`` from ``src`` (``dist.scatter_object_list``'s result).

    Args:
        objs: on ``src``, one picklable object per rank; ignored elsewhere.
        src: the sending rank within the group.
        group, axis_name, slice_size, device: as for :func:`all_gather_object`.

    Returns:
        This rank's object.
    """
    api = "scatter_object"
    _check_slice_size(api, slice_size)
    tr = _transport(api, group, axis_name, device)
    _check_rank(api, "src", src, tr.size)
    flats = None
    if tr.rank == src:
        objs = list(objs) if objs is not None else []
        if len(objs) != tr.size:
            raise ValueError(f"{api}: src needs {tr.size} objects (one per rank); got {len(objs)}.")
        flats = [object_to_bytes(o) for o in objs]
    return bytes_to_object(_scatter_flat(tr, flats, src, slice_size, torch.uint8))


def broadcast_object(obj: Any, src: int = 0, *, group=None, axis_name=None, slice_size: int = DEFAULT_SLICE_SIZE,
                     device=None) -> Any:
    """``src``'s picklable object on every rank (``dist.broadcast_object_list`` over the device group)."""
    api = "broadcast_object"
    _check_slice_size(api, slice_size)
    tr = _transport(api, group, axis_name, device)
    _check_rank(api, "src", src, tr.size)
    return _broadcast_object(tr, obj, src, slice_size)
