"""Recompute overhead and saved activations per policy for an 8-layer stack (PERF.md B4/B5).

Prints, for each recompute policy, the median step time (forward + backward) relative to no
recompute, measured interleaved in one process, and ``(T_full - T_none) / T_forward``: how many
extra forwards full recompute costs (target [0.9, 1.1]; torch's checkpoint stops re-running at
the last saved tensor, so slightly under 1 is expected). Then a table of saved activation bytes.
Times are never asserted.

Usage:
  python bench/recompute.py            # PERF.md B5 size: s=256 b=4 h=256 a=8, fp32, 2 threads
  python bench/recompute.py --quick    # smoke size
  python bench/recompute.py --layer llama   # RMSNorm/SwiGLU/RoPE block with the CPU flash core
"""
from __future__ import annotations

import argparse
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s, b, h, a = (64, 2, 64, 4) if args.quick else (256, 4, 256, 8)
    reps = args.reps or (3 if args.quick else 12)
    cfg, attn_fn, params, x, rope = build(args.layer, s, b, h, a, 8)
    print(f"8-layer {args.layer} stack, s={s} b={b} h={h} a={a}, fp32, {args.threads} threads, {reps} reps")

    runs = {name: (lambda pol=pol: step(cfg, attn_fn, params, x, rope, pol)) for name, pol in POLICIES.items()}
    runs["forward"] = lambda: forward(cfg, attn_fn, params, x, rope, POLICIES["none"])
    for fn in runs.values():  # warm-up
        fn()
        fn()
    times = {name: [] for name in runs}
    for _ in range(reps):  # interleaved: every policy once per round
        for name, fn in runs.items():
            times[name].append(timed(fn))
    med = {name: statistics.median(v) for name, v in times.items()}
    ratios_per_round = {name: [t / n for t, n in zip(times[name], times["none"])] for name in POLICIES}
    print(f"{'policy':<18}{'median step':>12}{'ratio (median of per-round)':>30}{'min ratio':>11}")
    for name in POLICIES:
        r = ratios_per_round[name]
        print(f"{name:<18}{med[name] * 1e3:>10.1f}ms{statistics.median(r):>30.3f}{min(r):>11.3f}")
    extra = [(f - n) / fw for f, n, fw in zip(times["full"], times["none"], times["forward"])]
    print(f"forward only      {med['forward'] * 1e3:>10.1f}ms")
    print(f"(T_full - T_none) / T_forward: median {statistics.median(extra):.3f}"
          f" (per-round min {min(extra):.3f}, max {max(extra):.3f}); target [0.9, 1.1]")

    print()
    print(f"{'policy':<18}{'saved bytes':>14}{'/ none':>9}")
    base = None
    for name, pol in POLICIES.items():
        n = saved_activation_bytes(forward, cfg, attn_fn, params, x, rope, pol)
        base = base or n
        print(f"{name:<18}{n:>14,}{n / base:>9.3f}")


if __name__ == "__main__":
    main()
