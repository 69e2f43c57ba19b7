"""Context-parallel attention benchmarks (issue 7). Ratios against baselines measured in the same run.

    python bench/cp.py            # sim mesh cp=4 (and 2x2 hybrid), bytes, error vs ring size
    python bench/cp.py --dist     # also 2 gloo processes

Reports, for one causal attention layer fwd+bwd on the same global problem:
  * time of Ulysses, ring (zigzag, contiguous), hybrid on a simulated cp=4 mesh divided by one-device
    torch SDPA (and by shardfn's one-device `local_attention`, the kernel the CP paths run per block);
  * bytes each rank sent (count_comms) next to the PERF.md 2.3 formula;
  * max error vs a float64 reference as the ring grows (c = 1, 2, 4, 8) for fp32 and bf16 inputs.
Nothing here is a gate: the 2-core VM is noisy and the sim mesh runs c threads on 2 cores.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from shardfn import P, debug, make_mesh, shard_map
from shardfn.primitives.block_attention import local_attention
from shardfn.primitives.hybrid import hybrid_attention, hybrid_bytes, hybrid_shard, hybrid_unshard
from shardfn.primitives.ring_attention import ring_attention, ring_bytes
from shardfn.primitives.ulysses import ulysses_attention, ulysses_bytes
from shardfn.primitives.zigzag import zigzag_shard, zigzag_unshard


def timeit(fn, *, warmup=1, repeat=5, clock=time.perf_counter):
    """Median seconds per call on `clock` (wall time, or time.process_time for CPU of all threads)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    return statistics.median(samples)


def paired(fa, fb, rounds=3, clock=time.perf_counter):
    """(median of per-round ratios time(fa)/time(fb), median time(fa)), interleaved to cancel machine noise."""
    ratios, times = [], []
    for _ in range(rounds):
        a, b = timeit(fa, repeat=3, clock=clock), timeit(fb, repeat=3, clock=clock)
        ratios.append(a / b)
        times.append(a)
    return statistics.median(ratios), statistics.median(times)


def fwd_bwd(f, q, k, v):
    def step():
        out = f(q, k, v)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    return step


def sdpa(q, k, v):
    rep = q.shape[2] // k.shape[2]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)))
    return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).transpose(1, 2)


def explicit(q, k, v):
    """shardfn's one-device attention: the block kernel the CP paths call (flash on CPU, fp32 accumulation)."""
    return local_attention(q, k, v, causal=True)


def problem(b, s, h, g, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, n, d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
            for n in (h, g, g)]


def cp_functions(c, mesh, hybrid_mesh):
    seq = P(None, "cp")
    uly = shard_map(lambda q, k, v: ulysses_attention(q, k, v, causal=True), mesh=mesh, in_specs=seq, out_specs=seq)
    zz = shard_map(lambda q, k, v: ring_attention(q, k, v, causal=True), mesh=mesh, in_specs=seq, out_specs=seq)
    contig = shard_map(lambda q, k, v: ring_attention(q, k, v, causal=True, layout="contiguous"), mesh=mesh,
                       in_specs=seq, out_specs=seq)
    hyb_axes = ("ring", "ulysses")
    hyb = shard_map(lambda q, k, v: hybrid_attention(q, k, v, causal=True), mesh=hybrid_mesh,
                    in_specs=P(None, hyb_axes), out_specs=P(None, hyb_axes))
    r = hybrid_mesh.shape["ring"]
    return {
        "ulysses": uly,
        "ring zigzag": lambda q, k, v: zigzag_unshard(zz(*(zigzag_shard(t, c) for t in (q, k, v))), c),
        "ring contiguous": contig,
        "hybrid u2 x r2": lambda q, k, v: hybrid_unshard(hyb(*(hybrid_shard(t, r) for t in (q, k, v))), r),
    }


def bench_sim(b, s, h, g, d):
    c = 4
    mesh = make_mesh((c,), ("cp",), backend="sim")
    hmesh = make_mesh((2, 2), ("ring", "ulysses"), backend="sim")
    q, k, v = problem(b, s, h, g, d)
    base = timeit(fwd_bwd(sdpa, q, k, v))
    base_x = timeit(fwd_bwd(explicit, q, k, v))
    print(f"\n== sim mesh cp={c}: causal attention fwd+bwd, b={b} s={s} h={h} g={g} d={d} fp32 ==")
    print(f"one-device SDPA: {base * 1e3:.1f} ms; one-device shardfn local_attention: {base_x * 1e3:.1f} ms "
          f"({base_x / base:.2f}x SDPA)")
    itemsize = 4
    formulas = {
        "ulysses": ulysses_bytes(b, s, h, g, d, c, itemsize),
        "ring zigzag": ring_bytes(b, s, g, d, c, itemsize),
        "ring contiguous": ring_bytes(b, s, g, d, c, itemsize),
        "hybrid u2 x r2": hybrid_bytes(b, s, h, g, d, 2, 2, itemsize),
    }
    print("(ratios: median over 3 interleaved rounds of method vs baseline; wall time, and CPU time summed over")
    print(" the device threads, which other load on the machine disturbs less)")
    print(f"{'method':<16} {'ms':>8} {'/SDPA':>7} {'/local':>7} {'cpu/SDPA':>9} {'bytes/rank':>11} {'formula':>9}")
    for name, f in cp_functions(c, mesh, hmesh).items():
        r_sdpa, t = paired(fwd_bwd(f, q, k, v), fwd_bwd(sdpa, q, k, v))
        r_local, _ = paired(fwd_bwd(f, q, k, v), fwd_bwd(explicit, q, k, v))
        r_cpu, _ = paired(fwd_bwd(f, q, k, v), fwd_bwd(sdpa, q, k, v), clock=time.process_time)
        with debug.count_comms() as log:
            fwd_bwd(f, q, k, v)()
        sent = log.bytes_sent(0)
        print(f"{name:<16} {t * 1e3:8.1f} {r_sdpa:7.2f} {r_local:7.2f} {r_cpu:9.2f} {int(sent):>11} "
              f"{int(formulas[name]):>9}"
              + ("" if sent == formulas[name] else "  MISMATCH"))


def bench_error(b, s, h, d):
    print(f"\n== max |error| vs float64 as the ring grows (ring zigzag, causal, b={b} s={s} h={h} d={d}) ==")
    print(f"{'c':>3} {'fp32 out':>10} {'fp32 dq':>10} {'bf16 out':>10} {'bf16 dq':>10}")
    ref_in = problem(b, s, h, h, d, torch.float64, seed=1)
    ref = explicit(*ref_in)
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref_dq = torch.autograd.grad(ref, ref_in[0], cot)[0]
    for c in (1, 2, 4, 8):
        mesh = make_mesh((c,), ("cp",), backend="sim")
        f = shard_map(lambda q, k, v: ring_attention(q, k, v, causal=True), mesh=mesh, in_specs=P(None, "cp"),
                      out_specs=P(None, "cp"))
        row = []
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (t.detach().to(dtype).requires_grad_(True) for t in ref_in)
            out = zigzag_unshard(f(*(zigzag_shard(t, c) for t in (q, k, v))), c)
            dq = torch.autograd.grad(out, q, cot.to(dtype))[0]
            row += [(out.double() - ref).abs().max().item(), (dq.double() - ref_dq).abs().max().item()]
        print(f"{c:>3} " + " ".join(f"{e:10.2e}" for e in row))


def _dist_worker(b, s, h, g, d):
    torch.set_num_threads(1)
    mesh = make_mesh((2,), ("cp",), backend="dist")
    q, k, v = problem(b, s, h, g, d)
    seq = P(None, "cp")
    out = {"sdpa": timeit(fwd_bwd(sdpa, q, k, v)), "explicit": timeit(fwd_bwd(explicit, q, k, v))}
    uly = shard_map(lambda q, k, v: ulysses_attention(q, k, v, causal=True), mesh=mesh, in_specs=seq, out_specs=seq)
    zz = shard_map(lambda q, k, v: ring_attention(q, k, v, causal=True), mesh=mesh, in_specs=seq, out_specs=seq)
    full = (lambda x: x.full_tensor())
    out["ulysses"] = timeit(fwd_bwd(lambda q, k, v: full(uly(q, k, v)), q, k, v))
    ring = (lambda q, k, v: zigzag_unshard(full(zz(*(zigzag_shard(t, 2) for t in (q, k, v)))), 2))
    out["ring zigzag"] = timeit(fwd_bwd(ring, q, k, v))
    return out


def bench_dist(b, s, h, g, d):
    from shardfn.testing import run_distributed

    results = run_distributed(_dist_worker, b, s, h, g, d, nprocs=2, timeout=600)
    print(f"\n== 2 gloo processes (1 thread each): causal fwd+bwd, b={b} s={s} h={h} g={g} d={d} fp32 ==")
    print("(baselines measured in each process on the full problem while the other process also runs)")
    for name in ("ulysses", "ring zigzag"):
        ratios = [r[name] / r["sdpa"] for r in results]
        ratios_x = [r[name] / r["explicit"] for r in results]
        print(f"{name:<12} {results[0][name] * 1e3:8.1f} ms  /SDPA {max(ratios):5.2f}  /local {max(ratios_x):5.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", action="store_true", help="also run on 2 gloo processes")
    parser.add_argument("--seq", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(2)
    bench_sim(1, args.seq, 8, 8, 32)
    bench_error(1, 256, 4, 32)
    if args.dist:
        bench_dist(1, args.seq, 8, 8, 32)


if __name__ == "__main__":
    main()
