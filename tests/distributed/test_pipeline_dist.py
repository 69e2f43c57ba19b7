"""run_pipeline on 2 real gloo processes (one launch) equals the sequential reference bitwise.

Covers 1F1B and interleaved (FEATURES.md 1, 2), DualPipeV, and ZB-V, whose rank 0 sends rank 1
activations and gradients in an order rank 1 does not read them in (the receiver reads in the
sender's order and stashes), with multi-tensor messages of variable lengths (the header). Sends
never block: on gloo a blocking send waits for the peer's receive.
"""

import torch

from shardfn import P, make_mesh, shard_map
from shardfn.schedules import dualpipev, interleaved_1f1b, one_f_one_b, zbv
from shardfn.schedules import sequential_reference
from shardfn.schedules.executor import run_pipeline
from shardfn.schedules.stages import stack_stages, unstack_stages
from shardfn.testing import run_distributed

H, B = 3, 2


def layer(w, x):
    n = x["h"].shape[1]
    h = torch.tanh(x["h"] @ w["a"] + w["b"]).cumsum(dim=1) / n
    return {"h": h, "mask": x["mask"], "aux": x["aux"] * w["c"]}


def loss_fn(y, mb):
    return (y["h"] - mb["t"]).square().mean() + y["aux"].to(torch.float64).square().mean()


def make(num_stages, lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [{"a": torch.randn(H, H, generator=gen, dtype=torch.float64),
               "b": torch.randn(H, generator=gen, dtype=torch.float64),
               "c": torch.randn((), generator=gen, dtype=torch.float32)} for _ in range(num_stages)]
    mbs = [{"h": torch.randn(B, n, H, generator=gen, dtype=torch.float64),
            "mask": torch.ones(B, n, dtype=torch.bool),
            "aux": torch.randn(n, generator=gen, dtype=torch.float32),
            "t": torch.randn(B, n, H, generator=gen, dtype=torch.float64)} for n in lengths]
    return params, mbs


CASES = [
    (one_f_one_b(2, 4), [3, 3, 3, 3]),
    (interleaved_1f1b(2, 4, num_chunks=2), [3, 3, 3, 3]),
    (interleaved_1f1b(2, 4, num_chunks=2), [2, 4, 3, 4]),
    (dualpipev(2, 4), [2, 3, 2, 4]),
    (zbv(2, 4), [2, 3, 2, 4]),
]


def reference(params, mbs):
    return sequential_reference(lambda w, _stage, x: layer(w, x), params, mbs, loss_fn)


def worker():
    mesh = make_mesh((2,), ("pp",), backend="dist")
    out = []
    for i, (schedule, lengths) in enumerate(CASES):
        params, mbs = make(schedule.num_stages, lengths, seed=i)

        def stage_fn(w, chunk, x):
            return layer({k: t[0, chunk] for k, t in w.items()}, x)

        def body(w, mbs, schedule=schedule):
            return run_pipeline(schedule, stage_fn, w, mbs, loss_fn)

        loss, grads = shard_map(body, mesh=mesh, in_specs=(P("pp"), P()), out_specs=(P(), P("pp")))(
            stack_stages(params, 2, schedule.placement), mbs
        )
        out.append((loss.full_tensor(), {k: g.full_tensor() for k, g in grads.items()}))
    return out


def test_pipeline_on_two_gloo_processes_equals_the_reference():
    results = run_distributed(worker, nprocs=2, timeout=120)
    for i, (schedule, lengths) in enumerate(CASES):
        params, mbs = make(schedule.num_stages, lengths, seed=i)
        want_loss, want = reference(params, mbs)
        for rank, per_rank in enumerate(results):
            loss, grads = per_rank[i]
            assert torch.equal(loss, want_loss), (schedule.name, rank)
            for s, (g, w) in enumerate(zip(unstack_stages(grads, schedule.placement), want)):
                for k in w:
                    assert torch.equal(g[k], w[k]), f"{schedule.name} lengths {lengths} rank {rank} stage {s} {k}"
