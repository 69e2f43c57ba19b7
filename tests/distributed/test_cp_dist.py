"""Ulysses and ring attention on 2 real gloo processes, and hybrid (Ulysses x ring, 2x2) and double ring
(cp=4, window 2) on 4, equal full-sequence attention computed in the parent (one launch each)."""
import torch

from shardfn import P, make_mesh, shard_map
from shardfn.primitives.hybrid import hybrid_attention, hybrid_shard, hybrid_unshard
from shardfn.primitives.ring_attention import ring_attention
from shardfn.primitives.ulysses import gather_uneven, split_uneven, ulysses_attention
from shardfn.primitives.zigzag import zigzag_shard, zigzag_unshard
from shardfn.testing import run_distributed
from tests.property.cp_helpers import TOL, qkv, reference_attention

S, H, G, D = 8, 2, 1, 3
S_UNEVEN = 7


def _inputs(s=S, h=H, g=G):
    return qkv(2, s, h, g, D, torch.float64)


def _run(f, q, k, v, to_global):
    out = to_global(f(q, k, v))
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), cot)
    return [out.detach(), *grads]


def _full(x):
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def _all_cases():
    mesh = make_mesh((2,), ("cp",), backend="dist")
    seq = P(None, "cp")
    results = {}
    uly = shard_map(lambda q, k, v: ulysses_attention(q, k, v, causal=True), mesh=mesh, in_specs=seq, out_specs=seq)
    results["ulysses"] = _run(uly, *_inputs(), _full)

    ring = shard_map(lambda q, k, v: ring_attention(q, k, v, causal=True), mesh=mesh, in_specs=seq, out_specs=seq)
    results["ring_zigzag"] = _run(lambda q, k, v: ring(*(zigzag_shard(t, 2) for t in (q, k, v))), *_inputs(),
                                  lambda o: zigzag_unshard(_full(o), 2))

    cached = shard_map(lambda q, k, v: ring_attention(q, k, v, causal=True, layout="contiguous", kv_cache="full"),
                       mesh=mesh, in_specs=seq, out_specs=seq)
    results["ring_contiguous_cache"] = _run(cached, *_inputs(), _full)

    def uneven(q, k, v):
        parts = [split_uneven(t, "cp", dim=1) for t in (q, k, v)]
        out = ulysses_attention(*parts, causal=True, seq_len=S_UNEVEN, uneven=True)
        return gather_uneven(out, "cp", 1, S_UNEVEN)

    uneven_f = shard_map(uneven, mesh=mesh, in_specs=P(), out_specs=P())
    results["ulysses_uneven"] = _run(uneven_f, *_inputs(S_UNEVEN, 3, 1), _full)
    return results


def test_ulysses_and_ring_on_two_gloo_processes():
    per_rank = run_distributed(_all_cases, nprocs=2)
    for name, shapes in [("ulysses", (S, H, G)), ("ring_zigzag", (S, H, G)), ("ring_contiguous_cache", (S, H, G)),
                         ("ulysses_uneven", (S_UNEVEN, 3, 1))]:
        ref_inputs = [t.detach().requires_grad_(True) for t in _inputs(*shapes)]
        ref = reference_attention(*ref_inputs, causal=True)
        cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # as in _run
        want = [ref.detach(), *torch.autograd.grad(ref, ref_inputs, cot)]
        for other in per_rank[1:]:  # every rank holds the same global result
            for a, b in zip(per_rank[0][name], other[name]):
                assert torch.equal(a, b), name
        rtol, atol = TOL[torch.float64]
        for what, got, expected in zip(("out", "dq", "dk", "dv"), per_rank[0][name], want):
            torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=lambda m, w=what: f"{name} {w}: {m}")


# 4 processes share 2 cores: tiny problems (s = 8 = 2 * cp, GQA 4 q heads on 2 kv heads)
S4, H4, G4 = 8, 4, 2


def _four_rank_cases():
    results = {}
    hyb_axes = ("ring", "ulysses")
    hyb_mesh = make_mesh((2, 2), hyb_axes, backend="dist")
    hyb = shard_map(lambda q, k, v: hybrid_attention(q, k, v, ulysses_axis="ulysses", ring_axis="ring", causal=True),
                    mesh=hyb_mesh, in_specs=P(None, hyb_axes), out_specs=P(None, hyb_axes))
    results["hybrid_2x2"] = _run(lambda q, k, v: hyb(*(hybrid_shard(t, 2) for t in (q, k, v))),
                                 *_inputs(S4, H4, G4), lambda o: hybrid_unshard(_full(o), 2))

    ring_mesh = make_mesh((4,), ("cp",), backend="dist")
    double = shard_map(lambda q, k, v: ring_attention(q, k, v, causal=True, window_size=2), mesh=ring_mesh,
                       in_specs=P(None, "cp"), out_specs=P(None, "cp"))
    results["double_ring_4_w2"] = _run(lambda q, k, v: double(*(zigzag_shard(t, 4) for t in (q, k, v))),
                                       *_inputs(S4, H4, G4), lambda o: zigzag_unshard(_full(o), 4))
    return results


def test_hybrid_and_double_ring_on_four_gloo_processes():
    per_rank = run_distributed(_four_rank_cases, nprocs=4)
    assert len(per_rank) == 4
    ref_inputs = [t.detach().requires_grad_(True) for t in _inputs(S4, H4, G4)]
    ref = reference_attention(*ref_inputs, causal=True)
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # as in _run
    want = [ref.detach(), *torch.autograd.grad(ref, ref_inputs, cot)]
    rtol, atol = TOL[torch.float64]
    for name in ("hybrid_2x2", "double_ring_4_w2"):
        for other in per_rank[1:]:  # every rank holds the same global result
            for a, b in zip(per_rank[0][name], other[name]):
                assert torch.equal(a, b), name
        for what, got, expected in zip(("out", "dq", "dk", "dv"), per_rank[0][name], want):
            torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=lambda m, w=what: f"{name} {w}: {m}")
