"""TP MLP block step on 2 gloo processes: shardfn pure functions vs torch DTensor tensor parallelism.

    python bench/tp.py [--batch 4 --seq 64 --hidden 256 --ffn 1024 --steps 20 --rounds 5]

The same step on the same shapes, both on a 1-d "tp" mesh of 2 processes:

* shardfn: ``row_parallel_linear(gelu(column_parallel_linear(x)))`` inside shard_map (dist
  backend), loss and weight gradients computed in the per-device program (check_vma on and off);
* DTensor: an ``nn.Sequential(Linear, GELU, Linear)`` through ``parallelize_module`` with
  ``ColwiseParallel`` / ``RowwiseParallel``, ``loss.backward()``.

Prints the median over rounds of the per-round time ratio shardfn / DTensor (rounds interleave the
two so machine noise cancels; every rank runs the same fixed number of steps so collectives stay
matched), and shardfn's bytes sent per device from ``count_comms`` against PERF.md 2.2's formula
for an MLP block (one all-reduce forward, one backward: ``4(t-1)/t * bsh`` elements), plus the
collectives DTensor issued (torch's CommDebugMode). A target, not a gate: ratio <= 0.9.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from fractions import Fraction

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench(batch, seq, hidden, ffn, steps, rounds):
    import warnings

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from shardfn import P, debug, make_mesh, shard_map
    from shardfn.layers.tensor_parallel import column_parallel_linear, row_parallel_linear

    t = dist.get_world_size()
    mesh = make_mesh((t,), ("tp",), backend="dist")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, hidden, generator=gen)
    w1 = torch.randn(ffn, hidden, generator=gen) * hidden ** -0.5
    w2 = torch.randn(hidden, ffn, generator=gen) * ffn ** -0.5

    # shardfn: weights as DTensors (sharded once), the whole step one pure per-device program
    dm = mesh.device_mesh
    p1 = {"weight": distribute_tensor(w1, dm, [Shard(0)])}
    p2 = {"weight": distribute_tensor(w2, dm, [Shard(1)])}

    def step_local(p1, p2, x):
        w1l = p1["weight"].requires_grad_(True)
        w2l = p2["weight"].requires_grad_(True)
        xl = x.detach().requires_grad_(True)  # an activation of a model: its gradient is all-reduced
        y = row_parallel_linear({"weight": w2l}, F.gelu(column_parallel_linear({"weight": w1l}, xl)))
        loss = y.pow(2).mean()
        g1, g2, _ = torch.autograd.grad(loss, [w1l, w2l, xl])
        return loss.detach(), g1, g2

    specs = ({"weight": P("tp", None)}, {"weight": P(None, "tp")}, P())
    outs = (P(), P("tp", None), P(None, "tp"))
    sf_vma = shard_map(step_local, mesh=mesh, in_specs=specs, out_specs=outs, check_vma=True)
    sf_fast = shard_map(step_local, mesh=mesh, in_specs=specs, out_specs=outs, check_vma=False)

    # DTensor tensor parallelism on the same shapes and values
    module = nn.Sequential(nn.Linear(hidden, ffn, bias=False), nn.GELU(), nn.Linear(ffn, hidden, bias=False))
    with torch.no_grad():
        module[0].weight.copy_(w1)
        module[2].weight.copy_(w2)
    module = parallelize_module(module, dm, {"0": ColwiseParallel(), "2": RowwiseParallel()})

    x_dt = x.clone().requires_grad_(True)

    def dtensor_step():
        module.zero_grad(set_to_none=True)
        x_dt.grad = None
        loss = module(x_dt).pow(2).mean()
        loss.backward()
        return loss

    # same numbers (a check that the two compute one thing)
    loss_sf, g1, _ = sf_vma(p1, p2, x)
    loss_dt = dtensor_step()
    loss_sf = loss_sf.full_tensor() if isinstance(loss_sf, DTensor) else loss_sf
    loss_dt = loss_dt.full_tensor() if isinstance(loss_dt, DTensor) else loss_dt
    g_dt = module[0].weight.grad.full_tensor()
    g_sf = g1.full_tensor() if isinstance(g1, DTensor) else g1
    agree = max(abs(loss_sf.item() - loss_dt.item()), (g_sf - g_dt).abs().max().item())

    def timed(fn):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - t0) / steps

    for fn in (lambda: sf_vma(p1, p2, x), lambda: sf_fast(p1, p2, x), dtensor_step):
        timed(fn)  # warm-up
    r_vma, r_fast, t_dt, t_vma, t_fast = [], [], [], [], []
    for _ in range(rounds):
        a = timed(lambda: sf_vma(p1, p2, x))
        b = timed(lambda: sf_fast(p1, p2, x))
        c = timed(dtensor_step)
        r_vma.append(a / c)
        r_fast.append(b / c)
        t_vma.append(a)
        t_fast.append(b)
        t_dt.append(c)

    with debug.count_comms() as log:
        sf_vma(p1, p2, x)
    measured = log.bytes_sent(mesh.runtime.rank_index)
    formula = Fraction(4 * (t - 1), t) * batch * seq * hidden * x.element_size()
    with CommDebugMode() as cdm:
        dtensor_step()
    dt_counts = {str(k): v for k, v in cdm.get_comm_counts().items()}
    return {
        "ratio_vma": statistics.median(r_vma), "ratio_novma": statistics.median(r_fast),
        "ms_shardfn_vma": 1e3 * statistics.median(t_vma), "ms_shardfn_novma": 1e3 * statistics.median(t_fast),
        "ms_dtensor": 1e3 * statistics.median(t_dt), "bytes_measured": float(measured),
        "bytes_formula": float(formula), "dtensor_comms": dt_counts, "max_abs_diff": agree,
        "calls": log.calls(mesh.runtime.rank_index),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    from shardfn.testing import run_distributed

    res = run_distributed(_bench, args.batch, args.seq, args.hidden, args.ffn, args.steps, args.rounds, nprocs=2,
                          timeout=600.0)
    r0 = res[0]
    print(f"TP MLP step b={args.batch} s={args.seq} h={args.hidden} f={args.ffn}, 2 gloo processes, "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"  shardfn (check_vma=True)  {r0['ms_shardfn_vma']:.3f} ms   ratio vs DTensor {r0['ratio_vma']:.3f}x")
    print(f"  shardfn (check_vma=False) {r0['ms_shardfn_novma']:.3f} ms   ratio vs DTensor {r0['ratio_novma']:.3f}x")
    print(f"  DTensor parallelize_module {r0['ms_dtensor']:.3f} ms   (target: shardfn <= 0.9x)")
    print(f"  bytes/device shardfn: measured {r0['bytes_measured']:.0f} vs formula 4(t-1)/t*bsh*4B = "
          f"{r0['bytes_formula']:.0f} (ratio {r0['bytes_measured'] / r0['bytes_formula']:.3f}); "
          f"collectives {r0['calls']}")
    print(f"  DTensor collectives per step: {r0['dtensor_comms']}")
    print(f"  max |shardfn - DTensor| over loss and fc1 grad: {r0['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
