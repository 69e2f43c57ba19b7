"""Recompute overhead and saved activations per policy for an 8-layer stack (PERF.md B4/B5).

Prints, for each recompute policy, the median step time (forward + backward) relative to no
recompute, measured interleaved in one process, and ``(T_full - T_none) / T_forward``: how many
extra forwards full recompute costs (target [0.9, 1.1]; torch's checkpoint stops re-running at
the last saved tensor, so slightly under 1 is expected; ``--no-early-stop`` re-runs it all).
T_forward is the training forward (recording the graph); the ratio is also given against a
no_grad forward, which pays no activation allocation. Then a table of saved activation bytes.
Times are never asserted.

Usage:
  python bench/recompute.py            # PERF.md B5 size: s=256 b=4 h=256 a=8, fp32, 2 threads
  python bench/recompute.py --quick    # smoke size
  python bench/recompute.py --layer llama   # RMSNorm/SwiGLU/RoPE block with the CPU flash core
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import optree
import torch

from shardfn.layers import LayerRecompute, LlamaConfig, attention, block, explicit_attention
from shardfn.memory import saved_activation_bytes

POLICIES = {
    "none": LayerRecompute(),
    "selective": LayerRecompute(selective=True),
    "norm": LayerRecompute(norm=True),
    "activation": LayerRecompute(activation=True),
    "norm+activation": LayerRecompute(norm=True, activation=True),
    "full": LayerRecompute(full=True),
}


def build(layer: str, s: int, b: int, h: int, a: int, num_layers: int):
    if layer == "gpt":
        cfg = LlamaConfig(vocab_size=8, hidden=h, num_layers=num_layers, num_heads=a, norm="layer", mlp="gelu",
                          position="none", bias=True, ffn_hidden=4 * h)
        attn_fn = explicit_attention
    else:
        cfg = LlamaConfig(vocab_size=8, hidden=h, num_layers=num_layers, num_heads=a, ffn_hidden=8 * h // 3)
        attn_fn = attention
    gen = torch.Generator().manual_seed(0)
    params = [block.init(gen, cfg, i) for i in range(num_layers)]
    for t in optree.tree_leaves(params):
        t.requires_grad_()
    x = torch.randn(b, s, h, generator=gen)
    rope = None
    if cfg.position == "rope":
        from shardfn.layers import rope_cache

        rope = rope_cache(s, cfg.rope_dim)
    return cfg, attn_fn, params, x, rope


def forward(cfg, attn_fn, params, x, rope, policy):
    for p in params:
        x = block.apply(p, x, config=cfg, rope=rope, recompute=policy, attn_fn=attn_fn)
    return x


def step(cfg, attn_fn, params, x, rope, policy):
    y = forward(cfg, attn_fn, params, x, rope, policy)
    torch.autograd.grad(y.square().mean(), optree.tree_leaves(params))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layer", choices=["gpt", "llama"], default="gpt")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-early-stop", action="store_true",
                    help="make torch's checkpoint re-run the whole forward (no early stop)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.no_early_stop:  # held for the whole run (the flag is read at forward time)
        stack = contextlib.ExitStack()
        stack.enter_context(torch.utils.checkpoint.set_checkpoint_early_stop(False))
    s, b, h, a = (64, 2, 64, 4) if args.quick else (256, 4, 256, 8)
    reps = args.reps or (3 if args.quick else 12)
    cfg, attn_fn, params, x, rope = build(args.layer, s, b, h, a, 8)
    print(f"8-layer {args.layer} stack, s={s} b={b} h={h} a={a}, fp32, {args.threads} threads, {reps} reps")

    runs = {name: (lambda pol=pol: step(cfg, attn_fn, params, x, rope, pol)) for name, pol in POLICIES.items()}
    runs["forward"] = lambda: forward(cfg, attn_fn, params, x, rope, POLICIES["none"])

    def forward_no_grad():
        with torch.no_grad():
            forward(cfg, attn_fn, params, x, rope, POLICIES["none"])

    runs["forward_no_grad"] = forward_no_grad
    for fn in runs.values():  # warm-up
        fn()
        fn()
    # Noise guard (PERF.md 7): a fixed in-place kernel timed before and after every round; a
    # round whose reference ran >30% slower than the running median (a busy neighbour) is dropped.
    ra, rb, rc = (torch.rand(1 << 22) for _ in range(3))
    reference = lambda: ra.addcmul_(rb, rc, value=1e-9)  # noqa: E731
    ref_times, kept, dropped = [], [], 0
    names = list(runs)
    for r in range(reps):
        before = min(timed(reference) for _ in range(3))
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: no fixed position
        round_times = {name: timed(runs[name]) for name in order}
        ref_times.append(max(before, min(timed(reference) for _ in range(3))))
        if ref_times[-1] > 1.3 * statistics.median(ref_times):
            dropped += 1
            continue
        kept.append(round_times)
    if not kept:
        print("every round was disturbed by neighbours; rerun when the machine is quieter")
        return
    print(f"kept {len(kept)} of {reps} rounds ({dropped} dropped by the noise guard)")
    med = {name: statistics.median(t[name] for t in kept) for name in runs}
    print(f"{'policy':<18}{'median step':>12}{'ratio (median per round)':>27}{'min ratio':>11}")
    for name in POLICIES:
        r = [t[name] / t["none"] for t in kept]
        print(f"{name:<18}{med[name] * 1e3:>10.1f}ms{statistics.median(r):>27.3f}{min(r):>11.3f}")
    print(f"forward only      {med['forward'] * 1e3:>10.1f}ms  (no_grad: {med['forward_no_grad'] * 1e3:.1f}ms)")
    for key, label in (("forward", "T_forward"), ("forward_no_grad", "T_forward(no_grad)")):
        extra = [(t["full"] - t["none"]) / t[key] for t in kept]
        print(f"(T_full - T_none) / {label}: median per round {statistics.median(extra):.3f},"
              f" from medians {(med['full'] - med['none']) / med[key]:.3f}; target [0.9, 1.1]")

    print()
    print(f"{'policy':<18}{'saved bytes':>14}{'/ none':>9}")
    base = None
    for name, pol in POLICIES.items():
        n = saved_activation_bytes(forward, cfg, attn_fn, params, x, rope, pol)
        base = base or n
        print(f"{name:<18}{n:>14,}{n / base:>9.3f}")


if __name__ == "__main__":
    main()
