"""Replace gloo on 2 real gloo processes: the sliced device-group gathers equal torch.distributed's.

One launch. On CPU the "device group" is itself gloo (FEATURES.md 42, CPU test E0), so each rank
runs shardfn.npu's ``gather_object`` / ``all_gather_object`` / ``scatter_object`` /
``broadcast_object`` and ``sliced_gather`` / ``sliced_scatter`` over the mesh axis's device group
(``device_group``) with slice sizes that divide none of the payloads, next to
``dist.gather_object`` / ``all_gather_object`` / ``scatter_object_list`` /
``broadcast_object_list`` and ``dist.gather`` / ``dist.scatter`` on the same inputs, and returns
both; the parent compares them exactly and against the inputs.
"""
from __future__ import annotations

import torch

from shardfn.testing import run_distributed

OBJ_SLICE = 7  # bytes per round: the pickles below are 30-300 bytes, none a multiple of 7
TENSOR_SLICE = 5  # elements per round; tensors have 23 elements


def _obj(i):
    return {"rank": i, "data": list(range(11 * i + 4)), "tag": "x" * (3 * i + 1)}


def _tensor(i):
    return (torch.arange(23, dtype=torch.float32) * (i + 1) + 0.5).reshape(23)


def _on_rank():
    import torch.distributed as dist

    import shardfn.npu as npu
    from shardfn import make_mesh

    rank, d = dist.get_rank(), dist.get_world_size()
    mesh = make_mesh((d,), ("dp",), backend="dist")
    group = npu.device_group(mesh, "dp")
    kw = dict(group=group, slice_size=OBJ_SLICE)
    out = {}

    ref = [None] * d
    dist.all_gather_object(ref, _obj(rank))
    out["all_gather_object"] = (npu.all_gather_object(_obj(rank), **kw), ref)

    ref = [None] * d if rank == 1 else None
    dist.gather_object(_obj(rank), ref, dst=1)
    out["gather_object"] = (npu.gather_object(_obj(rank), 1, **kw), ref)

    sent = [_obj(20 + j) for j in range(d)]
    ref = [None]
    dist.scatter_object_list(ref, sent if rank == 0 else None, src=0)
    out["scatter_object"] = (npu.scatter_object(sent if rank == 0 else None, 0, **kw), ref[0])

    ref = [_obj(9) if rank == 1 else None]
    dist.broadcast_object_list(ref, src=1)
    out["broadcast_object"] = (npu.broadcast_object(_obj(9) if rank == 1 else None, 1, **kw), ref[0])

    kw = dict(group=group, slice_size=TENSOR_SLICE)
    ref = [torch.empty(23) for _ in range(d)] if rank == 0 else None
    dist.gather(_tensor(rank), ref, dst=0)
    out["gather"] = (npu.sliced_gather(_tensor(rank), 0, **kw), ref)

    ref = torch.empty(23)
    dist.scatter(ref, [_tensor(5 + j) for j in range(d)] if rank == 1 else None, src=1)
    out["scatter"] = (npu.sliced_scatter([_tensor(5 + j) for j in range(d)] if rank == 1 else None, 1, **kw), ref)
    return out


def test_sliced_device_group_gathers_equal_torch_distributed():
    results = run_distributed(_on_rank, nprocs=2)
    d = len(results)
    for rank, out in enumerate(results):
        ours, ref = out["all_gather_object"]
        assert ours == ref == [_obj(j) for j in range(d)]
        ours, ref = out["gather_object"]
        assert ours == ref and (ours == [_obj(j) for j in range(d)] if rank == 1 else ours is None)
        ours, ref = out["scatter_object"]
        assert ours == ref == _obj(20 + rank)
        ours, ref = out["broadcast_object"]
        assert ours == ref == _obj(9)
        ours, ref = out["gather"]
        if rank == 0:
            assert len(ours) == len(ref) == d
            for j in range(d):
                assert torch.equal(ours[j], ref[j]) and torch.equal(ours[j], _tensor(j))
        else:
            assert ours is None and ref is None
        ours, ref = out["scatter"]
        assert torch.equal(ours, ref) and torch.equal(ours, _tensor(5 + rank))
