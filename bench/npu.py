"""Cost of shardfn.npu's portable references against the plain torch ops they stand in for.

Prints, per op, the reference's time divided by the baseline's, both measured in this run on
this machine (CPU, one intra-op thread by default). The references trade speed for the exact
NPU semantics (layouts, masks, statistics); this shows what that costs. Not a test: nothing is
asserted on a time. Run: ``python bench/npu.py [--threads N]``.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import shardfn.npu as npu


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _attention_pair(b, n, s, d, causal):
    q, k, v = (torch.randn(b, n, s, d, requires_grad=True) for _ in range(3))
    dy = torch.randn(b, n, s, d)
    kw = dict(atten_mask=npu.causal_mask_2048(), sparse_mode=2) if causal else {}

    def reference():
        out = npu.npu_fusion_attention(q, k, v, n, "BNSD", scale=d**-0.5, **kw)[0]
        torch.autograd.grad(out, (q, k, v), dy)

    def baseline():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=d**-0.5)
        torch.autograd.grad(out, (q, k, v), dy)

    return reference, baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, g = torch.randn(2048, 1024), torch.randn(1024)
    xs = torch.randn(2048, 2048)
    cos, sin = torch.randn(1, 512, 1, 128), torch.randn(1, 512, 1, 128)
    xr = torch.randn(2, 512, 8, 128)
    cases = {
        "fusion_attention fwd+bwd (b1 n4 s256 d64, causal) vs SDPA math": _attention_pair(1, 4, 256, 64, True),
        "fusion_attention fwd+bwd (b1 n4 s256 d64, no mask) vs SDPA math": _attention_pair(1, 4, 256, 64, False),
        "rms_norm [2048,1024] vs F.rms_norm": (lambda: npu.npu_rms_norm(x, g), lambda: F.rms_norm(x, (1024,), g)),
        "swiglu [2048,2048] vs silu(a)*b": (lambda: npu.npu_swiglu(xs),
                                           lambda: F.silu(xs[:, :1024]) * xs[:, 1024:]),
        "rotary mode 0 [2,512,8,128] vs eager": (
            lambda: npu.npu_rotary_position_embedding(xr, cos, sin),
            lambda: xr * cos + torch.cat((-xr[..., 64:], xr[..., :64]), -1) * sin),
    }
    print(f"threads={args.threads}; ratio = reference time / baseline time (best of {args.repeats})")
    for name, (reference, baseline) in cases.items():
        t_ref, t_base = _time(reference, args.repeats), _time(baseline, args.repeats)
        print(f"  {name:70s} {t_ref / t_base:5.2f}x  ({t_ref * 1e3:.2f} ms vs {t_base * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()
