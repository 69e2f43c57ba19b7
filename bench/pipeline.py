"""Benchmark B2 (PERF.md section 7): the pipeline executor against the schedule simulator.

1. Sleep-based stages on a sim mesh pp=4 (sleeping uses no CPU, so four device threads overlap
   as four devices would): every action sleeps F = I = W = 20 ms, B = 40 ms (a full backward is
   the I sleep plus the W sleep, as separate autograd nodes, so ``autograd.grad`` for the inputs
   only runs the I sleep). The first stage has no input gradient (its input is data), so there
   I costs 0 and B costs W, in the executor and in the simulated cost table alike. Printed:
   measured makespan (wall time of the shard_map call, best of 2) / simulated makespan, for
   1F1B, interleaved (v=2), ZB-H1 and DualPipeV; target [0.9, 1.15].
2. Real compute on pp=2 (a small MLP per stage, one thread per device): the per-action costs
   are measured on one device first, then the simulated makespan with those costs is compared
   with the measured one. Report only: the 2-core VM is shared and noisy.

Run from the repository root: ``python bench/pipeline.py``. Nothing here is asserted.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from shardfn import P, make_mesh, shard_map  # noqa: E402
from shardfn.schedules import (  # noqa: E402
    dualpipev,
    interleaved_1f1b,
    one_f_one_b,
    simulate,
    zero_bubble_h1,
)
from shardfn.schedules.executor import run_pipeline  # noqa: E402
from shardfn.schedules.stages import stack_stages  # noqa: E402

T = 0.020  # seconds: F = I = W = T, B = 2T


class _SleepInput(torch.autograd.Function):
    """Forward sleeps F; backward (the input-gradient path) sleeps I."""

    @staticmethod
    def forward(ctx, x):
        time.sleep(T)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        time.sleep(T)
        return g


class _SleepWeight(torch.autograd.Function):
    """No forward cost; backward (the weight-gradient path) sleeps W."""

    @staticmethod
    def forward(ctx, w):
        return w.clone()

    @staticmethod
    def backward(ctx, g):
        time.sleep(T)
        return g


def sleep_stage(w, chunk, x):
    return _SleepInput.apply(x) + _SleepWeight.apply(w[0, chunk])


def sleep_costs(num_stages):
    """The durations the executor really runs: stage 0 has no input gradient to compute."""
    first = [0] + [T] * (num_stages - 1)
    return {"F": T, "I": first, "W": T, "B": [T + i for i in first]}


def timed_run(schedule, stage_fn, params, mbs, mesh, repeats=2):
    def body(w, mbs):
        return run_pipeline(schedule, stage_fn, w, mbs, lambda y, mb: y.square().mean())

    mapped = shard_map(body, mesh=mesh, in_specs=(P("pp"), P()), out_specs=(P(), P("pp")))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mapped(params, mbs)
        best = min(best, time.perf_counter() - start)
    return best


def sleep_table(p=4, m=8):
    mesh = make_mesh((p,), ("pp",), backend="sim")
    mesh.runtime.max_running = p  # sleeping threads all run at once, as devices would
    print(f"Sleep-based stages, sim mesh pp={p}, m={m}: F = I = W = {T * 1e3:.0f} ms, B = {2 * T * 1e3:.0f} ms")
    print(f"{'schedule':<22}{'measured s':>12}{'simulated s':>13}{'ratio':>8}")
    schedules = [one_f_one_b(p, m), interleaved_1f1b(p, m, num_chunks=2), zero_bubble_h1(p, m), dualpipev(p, m)]
    for schedule in schedules:
        params = stack_stages([torch.zeros(2) for _ in range(schedule.num_stages)], p, schedule.placement)
        mbs = [torch.ones(2) for _ in range(m)]
        measured = timed_run(schedule, sleep_stage, params, mbs, mesh)
        simulated = float(simulate(schedule, sleep_costs(schedule.num_stages)).makespan)
        print(f"{schedule.name:<22}{measured:>12.3f}{simulated:>13.3f}{measured / simulated:>8.3f}")


# ---- real compute ----------------------------------------------------------------------------
HIDDEN, BATCH = 512, 128


def mlp_stage(w, chunk, x):
    return torch.tanh(x @ w[0, chunk, 0]) @ w[0, chunk, 1]


def measure_costs(repeats=5):
    """Median per-action durations of one MLP stage on this thread: F, I, W, B, and B without dX."""
    w = torch.randn(1, 1, 2, HIDDEN, HIDDEN) / HIDDEN**0.5
    w.requires_grad_(True)
    x = torch.randn(BATCH, HIDDEN)

    def median(fn):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    def fwd(need_x):
        xi = x.clone().requires_grad_(need_x)
        return xi, mlp_stage(w, 0, xi)

    f = median(lambda: fwd(True))

    def timed_backward(inputs_of):
        xi, y = fwd(True)
        g = torch.ones_like(y)
        start = time.perf_counter()
        torch.autograd.grad(y, inputs_of(xi), g)
        return time.perf_counter() - start

    def med(values):
        return sorted(values)[len(values) // 2]

    b = med([timed_backward(lambda xi: [xi, w]) for _ in range(repeats)])
    i = med([timed_backward(lambda xi: [xi]) for _ in range(repeats)])
    b0 = med([timed_backward(lambda xi: [w]) for _ in range(repeats)])
    return f, i, b - i, b, b0


def real_table(p=2, m=8):
    torch.set_num_threads(1)
    mesh = make_mesh((p,), ("pp",), backend="sim")
    f, i, w, b, b0 = measure_costs()
    print(f"\nReal compute, sim mesh pp={p}, m={m}, MLP stage [{BATCH}x{HIDDEN}] x 2 layers; "
          f"measured F={f * 1e3:.2f} I={i * 1e3:.2f} W={w * 1e3:.2f} B={b * 1e3:.2f} ms (report only)")
    print(f"{'schedule':<22}{'measured s':>12}{'simulated s':>13}{'ratio':>8}")
    for schedule in (one_f_one_b(p, m), interleaved_1f1b(p, m, num_chunks=2), zero_bubble_h1(p, m)):
        stages = schedule.num_stages
        params = stack_stages([torch.randn(2, HIDDEN, HIDDEN) / HIDDEN**0.5 for _ in range(stages)], p,
                              schedule.placement)
        mbs = [torch.randn(BATCH, HIDDEN) for _ in range(m)]
        measured = timed_run(schedule, mlp_stage, params, mbs, mesh)
        cost = {"F": f, "I": [0.0] + [i] * (stages - 1), "W": w, "B": [b0] + [b] * (stages - 1)}
        simulated = float(simulate(schedule, cost).makespan)
        print(f"{schedule.name:<22}{measured:>12.3f}{simulated:>13.3f}{measured / simulated:>8.3f}")


if __name__ == "__main__":
    sleep_table()
    real_table()
