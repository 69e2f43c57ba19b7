"""The torch.distributed backend: one process per device, the groups of a DeviceMesh, c10d calls.

Groups come from torch's DeviceMesh (a single axis's group, or `_flatten` of several axes in mesh
order, made once when the runtime starts so every rank creates them in the same order). An axis
tuple given against the mesh order reuses the mesh-order group and reorders blocks, so the
mixed-radix index (first name major) is the same on both backends.
"""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from shardfn.spec import entry_axes, local_block

__all__ = ["DistRuntime", "DistComm", "to_local_input", "from_local_output"]

# torch 2.13 renamed the tensor-form collectives; keep working on releases before the rename
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class DistRuntime:
    """This process's place in a dist mesh and its communicator."""

    def __init__(self, mesh):
        self.mesh = mesh
        dm = mesh.device_mesh
        self.coords = {a: dm.get_local_rank(a) for a in mesh.axis_names}
        self.rank_index = mesh.index_of(self.coords)
        self.global_ranks = [int(r) for r in dm.mesh.flatten().tolist()]
        self.comm = DistComm(self)
        # every multi-axis group, in mesh order, created now and in the same order on every rank
        names = mesh.axis_names
        for k in range(2, len(names) + 1):
            for axes in itertools.combinations(names, k):
                self.comm.group(axes)


class DistComm:
    """The dist communicator (see shardfn.backends for the contract)."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.mesh = runtime.mesh
        self._groups = {}
        self._pending = []  # sends a p2p call with wait_sends=False left in flight

    def group(self, axes):
        """(process group, block order) for `axes`; order maps axis-tuple index -> group rank."""
        found = self._groups.get(axes)
        if found is None:
            names = self.mesh.axis_names
            ordered = tuple(a for a in names if a in axes)
            dm = self.mesh.device_mesh
            if ordered in self._groups:
                pg = self._groups[ordered][0]
            elif len(ordered) == 1:
                pg = dm.get_group(ordered[0])
            else:
                pg = dm[ordered]._flatten().get_group()
            order = None
            if ordered != axes:
                members = self.members(axes)
                ranks = sorted(members)
                order = [ranks.index(m) for m in members]
            found = self._groups[axes] = (pg, order)
        return found

    def members(self, axes):
        """Global ranks of this rank's group over `axes`, in axis-tuple index order."""
        mesh, coords = self.mesh, self.runtime.coords
        out = []
        for idx in itertools.product(*(range(mesh.shape[a]) for a in axes)):
            c = dict(coords)
            c.update(zip(axes, idx))
            out.append(self.runtime.global_ranks[mesh.index_of(c)])
        return out

    def all_reduce(self, x, axes, op):
        pg, _ = self.group(axes)
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, op=_OPS[op], group=pg)
        return y

    def all_gather(self, x, axes, dim):
        pg, order = self.group(axes)
        n = len(order) if order else dist.get_world_size(pg)
        xt = x.movedim(dim, 0).contiguous()
        out = torch.empty((n * xt.shape[0],) + tuple(xt.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_single(out, xt, group=pg)
        if order:
            blocks = out.chunk(n)
            out = torch.cat([blocks[order[j]] for j in range(n)])
        return out.movedim(0, dim)

    def reduce_scatter(self, x, axes, dim):
        pg, order = self.group(axes)
        n = len(order) if order else dist.get_world_size(pg)
        chunks = x.movedim(dim, 0).chunk(n)
        if order:
            by_rank = [None] * n
            for j in range(n):
                by_rank[order[j]] = chunks[j]
            chunks = by_rank
        inp = torch.cat(chunks).contiguous()
        out = torch.empty((inp.shape[0] // n,) + tuple(inp.shape[1:]), dtype=x.dtype, device=x.device)
        _reduce_scatter_single(out, inp, group=pg)
        return out.movedim(0, dim)

    def all_to_all(self, x, axes, split_dim, concat_dim):
        pg, order = self.group(axes)
        n = len(order) if order else dist.get_world_size(pg)
        chunks = x.chunk(n, split_dim)
        if order:
            by_rank = [None] * n
            for j in range(n):
                by_rank[order[j]] = chunks[j]
            chunks = by_rank
        inp = torch.stack(chunks).contiguous()
        out = torch.empty_like(inp)
        dist.all_to_all_single(out, inp, group=pg)
        received = out.unbind(0)
        if order:
            received = [received[order[j]] for j in range(n)]
        return torch.cat(received, concat_dim)

    def permute(self, x, axes, perm):
        members = self.members(axes)
        me = members.index(dist.get_rank())
        out = None
        ops = []
        xc = x.contiguous()
        for src, dst in perm:
            if src == me and dst == me:
                out = x.clone()
            elif src == me:
                ops.append(dist.P2POp(dist.isend, xc, members[dst]))
            elif dst == me:
                out = torch.empty_like(xc)
                ops.append(dist.P2POp(dist.irecv, out, members[src]))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return out if out is not None else torch.zeros_like(x)

    def p2p(self, axes, sends, recvs, wait_sends=True):
        members = self.members(axes)
        # Sends and receives go in separate batches: a backend that coalesces a batch into one
        # work could not finish the receives while a send of the same batch waits for its peer.
        send_ops = [dist.P2POp(dist.isend, t.detach().contiguous(), members[dst]) for dst, t in sends]
        device = self.mesh.device_type if self.mesh.device_type != "cpu" else "cpu"
        bufs = [torch.empty(shape, dtype=dtype, device=device) for _, shape, dtype in recvs]
        recv_ops = [dist.P2POp(dist.irecv, buf, members[src]) for buf, (src, _, _) in zip(bufs, recvs)]
        # in-flight sends keep their works (which hold the tensors) until a call that waits
        pending = [w for w in self._pending if not w.is_completed()]
        if send_ops:
            pending += list(dist.batch_isend_irecv(send_ops))
        if recv_ops:
            for work in dist.batch_isend_irecv(recv_ops):
                work.wait()
        if wait_sends:
            for work in pending:
                work.wait()
            pending = []
        self._pending = pending
        return bufs


def placements(spec, mesh):
    """DTensor placements for `spec` (Shard(dim) on each named mesh dim, Replicate elsewhere)."""
    out = [Replicate()] * len(mesh.axis_names)
    if spec is None:
        return out
    for dim, entry in enumerate(spec.entries):
        axes = entry_axes(entry)
        ordered = tuple(a for a in mesh.axis_names if a in axes)
        if axes != ordered:
            raise NotImplementedError(
                f"shard_map (dist backend): spec {spec!r} splits dim {dim} over {axes}, against the mesh "
                f"order {mesh.axis_names}; DTensor cannot express that layout. Write {ordered} instead."
            )
        for a in axes:
            out[mesh.axis_names.index(a)] = Shard(dim)
    return out


class _SliceInput(torch.autograd.Function):
    """A plain (full, same on every rank) input's local block; backward all-gathers the block grads."""

    @staticmethod
    def forward(ctx, x, spec, dctx):
        ctx.spec, ctx.dctx = spec, dctx
        return local_block(x, spec, dctx.coords, dctx.mesh).clone()

    @staticmethod
    def backward(ctx, g):
        comm = ctx.dctx.comm
        for dim, entry in enumerate(ctx.spec.entries if ctx.spec is not None else ()):
            axes = entry_axes(entry)
            if axes:
                g = comm.all_gather(g.contiguous(), axes, dim)
        return g, None, None


def to_local_input(x, spec, dctx):
    """This rank's local block of a global input (a DTensor or a plain tensor held by every rank)."""
    if isinstance(x, DTensor):
        return x.redistribute(dctx.mesh.device_mesh, placements(spec, dctx.mesh)).to_local()
    if spec is None or not any(entry_axes(e) for e in spec.entries):
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        return _SliceInput.apply(x, spec, dctx)
    return local_block(x, spec, dctx.coords, dctx.mesh)


def from_local_output(x, spec, dctx):
    """The global DTensor made of every rank's local block `x`."""
    mesh = dctx.mesh
    shape = list(x.shape)
    if spec is not None:
        for dim, entry in enumerate(spec.entries):
            for a in entry_axes(entry):
                shape[dim] *= mesh.shape[a]
    stride = []
    acc = 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return DTensor.from_local(
        x, mesh.device_mesh, placements(spec, mesh), run_check=False, shape=torch.Size(shape), stride=tuple(reversed(stride))
    )
