"""The main job: train a small MLP with dp x tp and check every step against one device.

    python -m shardfn.demo                                   # simulated 8-device mesh (dp 2 x tp 4)
    torchrun --nproc-per-node 2 -m shardfn.demo --backend dist   # real processes (gloo on CPU)

Each step prints the sharded loss, the single-device reference loss and the largest gradient
difference; the last line is a verdict, and the exit status is non-zero when they disagree.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import shardfn as sf
from shardfn import P


def mlp_loss(params, x, y):
    """Single-device reference: a two-layer GeLU MLP with a mean-squared-error loss."""
    h = F.gelu(x @ params["w1"] + params["b1"])
    return ((h @ params["w2"] + params["b2"] - y) ** 2).mean()


def sharded_mlp_loss(params, x, y):
    """Per-device program: Megatron column-parallel fc1, row-parallel fc2, batch split over dp.

    Shapes: x, y [b/dp, h]; w1 [h, f/tp]; b1 [f/tp]; w2 [f/tp, h]; b2 [h] (replicated).
    The replicated b2 and the dp-replicated weights get their gradients summed by the automatic
    pvary that vma tracking inserts; no manual all-reduce appears here.
    """
    h = F.gelu(x @ params["w1"] + params["b1"])  # [b/dp, f/tp]
    out = sf.psum(h @ params["w2"], "tp") + params["b2"]  # [b/dp, h]
    num = x.shape[0] * sf.axis_size("dp") * x.shape[1]
    return sf.psum(((out - y) ** 2).sum(), "dp") / num


PARAM_SPECS = {"w1": P(None, "tp"), "b1": P("tp"), "w2": P("tp", None), "b2": P()}


def init_params(generator, hidden, ffn):
    def normal(*shape, scale):
        return (torch.randn(*shape, generator=generator) * scale).requires_grad_()

    return {
        "w1": normal(hidden, ffn, scale=hidden**-0.5),
        "b1": normal(ffn, scale=0.1),
        "w2": normal(ffn, hidden, scale=ffn**-0.5),
        "b2": normal(hidden, scale=0.1),
    }


def full(x):
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("sim", "dist"), default="sim")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--ffn", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args(argv)

    if args.backend == "dist":
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")
        world = torch.distributed.get_world_size()
        tp = 2 if world % 2 == 0 else 1
        mesh = sf.make_mesh((world // tp, tp), ("dp", "tp"), backend="dist")
        rank = torch.distributed.get_rank()
    else:
        mesh = sf.make_mesh((2, 4), ("dp", "tp"), backend="sim")
        rank = 0
    say = print if rank == 0 else (lambda *a, **k: None)

    gen = torch.Generator().manual_seed(0)
    params = init_params(gen, args.hidden, args.ffn)
    ref_params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    teacher = torch.randn(args.hidden, args.hidden, generator=gen) / args.hidden**0.5
    step_fn = sf.shard_map(
        sharded_mlp_loss, mesh=mesh, in_specs=(PARAM_SPECS, P("dp"), P("dp")), out_specs=P()
    )

    say(f"shardfn demo: MLP {args.hidden}->{args.ffn}->{args.hidden} on {mesh}")
    say(f"{'step':>4s} {'sharded loss':>14s} {'reference loss':>15s} {'max |grad diff|':>16s}")
    worst_grad, worst_loss = 0.0, 0.0
    for step in range(args.steps):
        x = torch.randn(args.batch, args.hidden, generator=gen)
        y = torch.tanh(x @ teacher)
        loss = full(step_fn(params, x, y))
        grads = torch.autograd.grad(loss, list(params.values()))
        ref_loss = mlp_loss(ref_params, x, y)
        ref_grads = torch.autograd.grad(ref_loss, list(ref_params.values()))
        diff = max((g - r).abs().max().item() for g, r in zip(grads, ref_grads))
        worst_grad = max(worst_grad, diff)
        worst_loss = max(worst_loss, abs(loss.item() - ref_loss.item()))
        say(f"{step:4d} {loss.item():14.6f} {ref_loss.item():15.6f} {diff:16.3e}")
        with torch.no_grad():
            for p, g, rp, rg in zip(params.values(), grads, ref_params.values(), ref_grads):
                p -= args.lr * g
                rp -= args.lr * rg
    tol = 1e-5
    ok = worst_grad <= tol and worst_loss <= tol
    verdict = "OK" if ok else "MISMATCH"
    say(
        f"{verdict}: {args.steps} steps of dp{mesh.shape['dp']} x tp{mesh.shape['tp']} on the {mesh.backend} backend "
        f"{'match' if ok else 'do not match'} one device (max |loss diff| {worst_loss:.2e}, "
        f"max |grad diff| {worst_grad:.2e}, tolerance {tol:g})."
    )
    if args.backend == "dist":
        torch.distributed.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
