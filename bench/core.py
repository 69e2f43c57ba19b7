"""Core overhead benchmarks (issue 2). Ratios against baselines measured in the same run.

    python bench/core.py            # sim-mesh ratios
    python bench/core.py --dist     # also 2-process gloo collective wrappers vs raw torch.distributed

Targets (not gates): 1-device shard_map vs raw fn: 256x256 matmul fwd+bwd <= 1.05x, tiny Linear
fwd+bwd <= 1.5x; 8-device sim MLP step (dp x tp) vs one device <= 1.5x; check_vma True vs False
<= 1.3x; dist wrappers vs raw c10d <= +20 us below 64 KB and <= 1.05x at 1 MB and up.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import shardfn as sf
from shardfn import P


def timeit(fn, *, warmup=3, repeat=7, inner=None, budget_s=0.4):
    """Median seconds per call of fn() (inner calls per sample chosen to fill budget_s / repeat)."""
    for _ in range(warmup):
        fn()
    if inner is None:
        t0 = time.perf_counter()
        fn()
        one = max(time.perf_counter() - t0, 1e-7)
        inner = max(1, int(budget_s / repeat / one))
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def paired(fa, fb, rounds=5):
    """Median of per-round ratios time(fa)/time(fb), interleaved to cancel machine noise."""
    ratios, ta, tb = [], [], []
    for _ in range(rounds):
        a = timeit(fa)
        b = timeit(fb)
        ratios.append(a / b)
        ta.append(a)
        tb.append(b)
    return statistics.median(ratios), statistics.median(ta), statistics.median(tb)


def fwd_bwd(f, *args):
    def step():
        out = f(*args)
        torch.autograd.grad(out, [a for a in args if a.requires_grad])

    return step


def mlp(x, w1, w2):
    return torch.nn.functional.gelu(x @ w1) @ w2


def mlp_loss(x, w1, w2, y):
    return ((mlp(x, w1, w2) - y) ** 2).mean()


def sharded_mlp_loss(x, w1, w2, y, *, n):
    # x, y: [b/dp, h]; w1: [h, f/tp]; w2: [f/tp, h]   (Megatron column -> row, then a dp mean)
    out = sf.psum(torch.nn.functional.gelu(x @ w1) @ w2, "tp")
    return sf.psum(((out - y) ** 2).sum(), "dp") / n


def bench_one_device():
    mesh = sf.make_mesh((1,), ("dp",), backend="sim")
    rows = []
    for name, shape in (("256x256 matmul", (256, 256)), ("tiny Linear 8x16", (8, 16))):
        x = torch.randn(shape[0], shape[1], requires_grad=True)
        w = torch.randn(shape[1], shape[1], requires_grad=True)

        def raw(x, w):
            return (x @ w).sum()

        mapped = sf.shard_map(raw, mesh=mesh, in_specs=(P("dp"), P()), out_specs=P())
        r, ta, tb = paired(fwd_bwd(mapped, x, w), fwd_bwd(raw, x, w))
        rows.append((f"1-device shard_map vs raw: {name} fwd+bwd", r, ta, tb))
    return rows


def bench_mlp(b=256, h=1024, f=4096, dp=2, tp=4):
    torch.manual_seed(0)
    x, y = torch.randn(b, h), torch.randn(b, h)
    w1 = (torch.randn(h, f) / h**0.5).requires_grad_()
    w2 = (torch.randn(f, h) / f**0.5).requires_grad_()
    mesh = sf.make_mesh((dp, tp), ("dp", "tp"), backend="sim")
    n = b * h
    specs = dict(in_specs=(P("dp"), P(None, "tp"), P("tp"), P("dp")), out_specs=P())

    def body(x, w1, w2, y):
        return sharded_mlp_loss(x, w1, w2, y, n=n)

    def body_manual(x, w1, w2, y):
        w1, w2 = sf.pvary((w1, w2), "dp")
        x = sf.pvary(x, "tp")
        return body(x, w1, w2, y)

    on = sf.shard_map(body, mesh=mesh, check_vma=True, **specs)
    off = sf.shard_map(body_manual, mesh=mesh, check_vma=False, **specs)

    def ref_step():
        torch.autograd.grad(mlp_loss(x, w1, w2, y), (w1, w2))

    def sharded(fn):
        def step():
            torch.autograd.grad(fn(x, w1, w2, y), (w1, w2))

        return step

    ga = torch.autograd.grad(on(x, w1, w2, y), (w1, w2))
    gb = torch.autograd.grad(mlp_loss(x, w1, w2, y), (w1, w2))
    err = max((a - b_).abs().max().item() for a, b_ in zip(ga, gb))
    rows = []
    r, ta, tb = paired(sharded(on), ref_step)
    rows.append((f"8-device sim MLP step (dp{dp} x tp{tp}, b{b} h{h} f{f}) vs one device", r, ta, tb))
    r, ta, tb = paired(sharded(on), sharded(off))
    rows.append(("  same step, check_vma=True vs False", r, ta, tb))
    return rows, err


def _dist_worker(sizes, repeat):
    import torch.distributed as dist

    mesh = sf.make_mesh((2,), ("x",), backend="dist")
    rows = []
    for numel in sizes:
        local = torch.randn(numel // 2)
        from shardfn import context
        from shardfn.primitives.collectives import psum

        runtime = mesh.runtime
        ctx = context.DeviceContext(mesh, runtime.rank_index, runtime.comm, check_vma=False, recorders=None)

        def wrapped():
            with context.use(ctx):
                psum(local, "x")

        def raw():
            buf = local.clone()
            dist.all_reduce(buf)

        # loops of calls, the two paths alternated round by round: single calls are swamped by gloo jitter
        ta, tb = [], []
        for _ in range(repeat):
            for fn, acc in ((wrapped, ta), (raw, tb)):
                for _ in range(5):
                    fn()
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(50):
                    fn()
                acc.append((time.perf_counter() - t0) / 50)
        rows.append((numel // 2 * 4, statistics.median(ta), statistics.median(tb)))
    return rows


def bench_dist():
    from shardfn.testing import run_distributed

    sizes = [2 * 256, 2 * 4096, 2 * 262144, 2 * 1048576]
    rows = run_distributed(_dist_worker, sizes, 7, nprocs=2)[0]
    out = []
    for nbytes, ta, tb in rows:
        out.append((f"dist psum wrapper vs raw all_reduce, {nbytes / 1024:.0f} KiB", ta / tb, ta, tb, (ta - tb) * 1e6))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dist", action="store_true", help="also run the 2-process gloo comparison")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    rows = bench_one_device()
    mlp_rows, err = bench_mlp()
    rows += mlp_rows
    print(f"{'case':78s} {'ratio':>7s} {'shardfn':>10s} {'baseline':>10s}")
    for name, r, ta, tb in rows:
        print(f"{name:78s} {r:7.3f} {ta * 1e3:8.3f}ms {tb * 1e3:8.3f}ms")
    print(f"(MLP gradient max |diff| vs one device: {err:.2e})")
    if args.dist:
        for name, r, ta, tb, extra in bench_dist():
            print(f"{name:78s} {r:7.3f} {ta * 1e6:8.1f}us {tb * 1e6:8.1f}us  (+{extra:.1f} us)")


if __name__ == "__main__":
    main()
