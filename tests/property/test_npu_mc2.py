"""MC2 references on a sim mesh against the unfused sequence-parallel linears.

The unfused oracle is written here with shardfn's collectives directly (Megatron SP: all-gather
then matmul for the column linear, matmul then reduce-scatter for the row linear, matmul then
all-reduce without SP), and a float64 single-device matmul on the full tensors checks both.
"""
import pytest
import torch

from shardfn import P, all_gather, axis_size, psum, psum_scatter, shard_map
from shardfn.npu.mc2 import npu_all_gather_base_mm, npu_mm_all_reduce_base, npu_mm_reduce_scatter_base
from shardfn.testing import cached_mesh


def _grads(fn, *inputs):
    inputs = [t.clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    cot = [torch.ones_like(o) * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape) for o in outs]
    grads = torch.autograd.grad(outs, inputs, cot)
    return [o.detach() for o in outs], list(grads)


def _data(*shapes, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=dtype) for s in shapes]


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_all_gather_base_mm_equals_unfused_column_linear(tp, dtype):
    mesh = cached_mesh((tp,), ("tp",))
    s, h, f = 2 * tp, 3, 2 * tp
    x, w, b = _data((s, h), (h, f), (f,), dtype=dtype)

    def fused(x, w, b):  # x: [s/tp, h], w: [h, f/tp], b: [f/tp]
        return npu_all_gather_base_mm(x, w, "tp", axis_size("tp"), bias=b)

    def unfused(x, w, b):
        gathered = all_gather(x, "tp", dim=0, tiled=True)
        return gathered @ w + b, gathered

    # Each device's gathered input is the full x (typed varying), so P("tp") stacks tp copies of it.
    specs = dict(mesh=mesh, in_specs=(P("tp"), P(None, "tp"), P("tp")), out_specs=(P(None, "tp"), P("tp")))
    out_f, g_f = _grads(shard_map(fused, **specs), x, w, b)
    out_u, g_u = _grads(shard_map(unfused, **specs), x, w, b)
    for a, c in zip(out_f + g_f, out_u + g_u):
        assert torch.equal(a, c)  # E0: the same collectives and matmuls
    out_r, g_r = _grads(lambda x, w, b: (x @ w + b, x.repeat(tp, 1)), x.double(), w.double(), b.double())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, c in zip(out_f + g_f, out_r + g_r):
        torch.testing.assert_close(a.double(), c, rtol=tol, atol=tol)


@pytest.mark.parametrize("tp", [2, 4])
def test_mm_reduce_scatter_base_equals_unfused_row_linear(tp):
    mesh = cached_mesh((tp,), ("tp",))
    s, f, h = 2 * tp, 2 * tp, 3
    x, w = _data((s, f), (f, h), seed=1)

    def fused(x, w):  # x: [s, f/tp], w: [f/tp, h]
        return npu_mm_reduce_scatter_base(x, w, "tp", axis_size("tp"))

    def unfused(x, w):
        return psum_scatter(x @ w, "tp", dim=0, tiled=True)

    specs = dict(mesh=mesh, in_specs=(P(None, "tp"), P("tp")), out_specs=P("tp"))
    out_f, g_f = _grads(shard_map(fused, **specs), x, w)
    out_u, g_u = _grads(shard_map(unfused, **specs), x, w)
    for a, c in zip(out_f + g_f, out_u + g_u):
        assert torch.equal(a, c)
    out_r, g_r = _grads(lambda x, w: x @ w, x, w)
    for a, c in zip(out_f + g_f, out_r + g_r):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)  # E1: the sum order changes


def test_mm_all_reduce_base_equals_unfused_and_counts_bias_per_device():
    tp = 2
    mesh = cached_mesh((tp,), ("tp",))
    x, w, b, x3 = _data((2, 3, 4), (4, 5), (5,), (2, 3, 5), seed=2)

    def fused(x, w, b, x3):
        return npu_mm_all_reduce_base(x, w, "tp", bias=b, x3=x3)

    def unfused(x, w, b, x3):
        return psum(x @ w + b + x3, "tp")

    specs = dict(mesh=mesh, in_specs=(P(None, None, "tp"), P("tp"), P(), P()), out_specs=P())
    out_f, g_f = _grads(shard_map(fused, **specs), x, w, b, x3)
    out_u, g_u = _grads(shard_map(unfused, **specs), x, w, b, x3)
    for a, c in zip(out_f + g_f, out_u + g_u):
        assert torch.equal(a, c)
    # allreduce(x1 @ x2 + bias + x3): a replicated bias and x3 are summed over the tp devices.
    torch.testing.assert_close(out_f[0], x @ w + tp * (b + x3), rtol=1e-12, atol=1e-12)


def test_mc2_clear_errors():
    mesh = cached_mesh((2,), ("tp",))
    x, w = _data((4, 4), (4, 2))

    def wrong_world(x, w):
        return npu_all_gather_base_mm(x, w, "tp", 4)[0]

    with pytest.raises(Exception, match="world_size=4"):
        shard_map(wrong_world, mesh=mesh, in_specs=(P("tp"), P()), out_specs=P())(x, w)

    def quantised(x, w):
        return npu_mm_all_reduce_base(x, w, "tp", dequant_scale=torch.ones(1))

    with pytest.raises(Exception, match="quantised"):
        shard_map(quantised, mesh=mesh, in_specs=(P(None, "tp"), P("tp")), out_specs=P())(x, w)


def test_mc2_over_a_tuple_of_axes():
    """axis_name may be a tuple: the (a, b) group of a 2x2 mesh acts as one tp group of 4."""
    mesh = cached_mesh((2, 2), ("a", "b"))
    x, w = _data((8, 3), (3, 4), seed=3)

    def column(x, w):
        return npu_all_gather_base_mm(x, w, ("a", "b"), 4, gather_output=False)[0]

    specs = dict(mesh=mesh, in_specs=(P(("a", "b")), P(None, ("a", "b"))), out_specs=P(None, ("a", "b")))
    out, grads = _grads(shard_map(column, **specs), x, w)
    out_r, grads_r = _grads(lambda x, w: x @ w, x, w)
    for a, c in zip(out + grads, out_r + grads_r):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
