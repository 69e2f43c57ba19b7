"""CoC / MC2 chunked collective + matmul (FEATURES.md 39, 56): equal to the unchunked path, in pipeline order.

Forward values are compared bitwise (each output row is the same dot product, each reduced
element is summed over the same devices in the same order); gradients against the single-device
reference with float64 defaults. The issue order of collectives and matmuls is recorded with a
torch function mode inside each device's program.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from shardfn import P, context, debug, shard_map
from shardfn.layers.tensor_parallel import column_parallel_linear, row_parallel_linear
from shardfn.primitives.overlap import all_gather_matmul, matmul_all_reduce, matmul_reduce_scatter, ring_all_gather_matmul
from shardfn.testing import assert_equivalent, cached_mesh

D64 = torch.float64


class _Order(TorchFunctionMode):
    """Records, at each linear, how many collectives this device had issued (read from a CommLog)."""

    def __init__(self, out, log):
        super().__init__()
        self.out, self.log = out, log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            dev = context.current().index
            self.out.append(sum(1 for r in list(self.log.records) if r.device == dev and r.phase == "forward"))
        return func(*args, **(kwargs or {}))


def _data(tp, rows_per, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows_per * tp, 3 * tp, generator=gen, dtype=D64)
    w = torch.randn(5, 3 * tp, generator=gen, dtype=D64)
    return x, w


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_all_gather_matmul_chunks(tp, k):
    mesh = cached_mesh((tp,), ("tp",))
    x, w = _data(tp, 4)
    w_col = w[:, : x.shape[-1]]
    orders = []

    def local(x, w):
        calls = []
        with _Order(calls, log):
            y, g = all_gather_matmul(x, w, "tp", dim=1, num_chunks=k, return_gathered=True)
        orders.append(calls)
        return y, g

    def sharded(x, w):
        return shard_map(local, mesh=mesh, in_specs=(P(None, "tp"), P()), out_specs=(P(None, None, "tp"), P(None, None, "tp")),
                         check_vma=False)(x, w)

    # each device's y is the full product; out_specs concatenate them along a new split of the last dim
    with debug.count_comms() as log:
        y, g = sharded(x, w_col)
    ref = F.linear(x, w_col)
    for r in range(tp):
        assert torch.equal(y[..., r * 5:(r + 1) * 5], ref)
        assert torch.equal(g[..., r * x.shape[-1]:(r + 1) * x.shape[-1]], x)
    # pipeline order C_0 M_0 C_1 M_1 ...: matmul j runs after j + 1 gathers, k gathers in all
    assert all(o == list(range(1, k + 1)) for o in orders)
    assert len(log.calls(0)) == k


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("reduce", ["psum_scatter", "psum"])
def test_matmul_reduce_chunks_bitwise_and_order(tp, k, reduce):
    mesh = cached_mesh((tp,), ("tp",))
    x, w = _data(tp, 4, seed=k)
    fn = matmul_reduce_scatter if reduce == "psum_scatter" else matmul_all_reduce
    orders = []

    def local(x, w, chunks):
        calls = []
        with _Order(calls, log):
            y = fn(x, w, "tp", dim=1, num_chunks=chunks)
        orders.append(calls)
        return y

    out_spec = P(None, "tp") if reduce == "psum_scatter" else P()
    run = lambda chunks: shard_map(lambda x, w: local(x, w, chunks), mesh=mesh,  # noqa: E731
                                   in_specs=(P(None, None, "tp"), P(None, "tp")), out_specs=out_spec)(x, w)
    with debug.count_comms() as log:
        chunked = run(k)
    assert torch.equal(chunked, run(1))
    # pipeline order M_0 C_0 M_1 C_1 ...: matmul j runs after j collectives, k collectives in all
    assert all(o == list(range(k)) for o in orders[:tp])
    assert len(log.calls(0)) == k
    torch.testing.assert_close(run(k), F.linear(x, w), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_coc_linears_equal_unchunked_sp_linears_with_gradients(k):
    """MC2/CoC contract: the chunked SP column and row linears equal the plain SP linears (values and grads)."""
    tp = 2
    mesh = cached_mesh((1, tp), ("dp", "tp"))
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4 * tp, 3, generator=gen, dtype=D64)
    p1 = {"weight": torch.randn(2 * tp, 3, generator=gen, dtype=D64), "bias": torch.randn(2 * tp, generator=gen, dtype=D64)}
    p2 = {"weight": torch.randn(3, 2 * tp, generator=gen, dtype=D64), "bias": torch.randn(3, generator=gen, dtype=D64)}

    def local(x, p1, p2, chunks):
        y = column_parallel_linear(p1, x, sequence_dim=1, num_chunks=chunks)
        return row_parallel_linear(p2, torch.tanh(y), reduce="psum_scatter", num_chunks=chunks)

    def sharded(chunks):
        return lambda x, p1, p2: shard_map(lambda *a: local(*a, chunks), mesh=mesh, in_specs=(
            P(None, "tp"), {"weight": P("tp", None), "bias": P("tp")}, {"weight": P(None, "tp"), "bias": P()}),
            out_specs=P(None, "tp"))(x, p1, p2)

    assert torch.equal(sharded(k)(x, p1, p2), sharded(1)(x, p1, p2))

    def ref(x, p1, p2):
        return F.linear(torch.tanh(F.linear(x, p1["weight"], p1["bias"])), p2["weight"], p2["bias"])

    assert_equivalent(sharded(k), ref, x, p1, p2)


def test_chunks_must_divide_rows():
    mesh = cached_mesh((2,), ("tp",))
    x, w = _data(2, 3)
    with pytest.raises(ValueError, match="not divisible by 2"):
        shard_map(lambda x, w: all_gather_matmul(x, w, "tp", dim=1, num_chunks=2), mesh=mesh,
                  in_specs=(P(None, "tp"), P()), out_specs=P(None, "tp"))(x, w[:, : x.shape[-1]])
    with pytest.raises(ValueError, match="num_chunks"):
        shard_map(lambda x, w: matmul_reduce_scatter(x, w, "tp", dim=1, num_chunks=0), mesh=mesh,
                  in_specs=(P(None, None, "tp"), P(None, "tp")), out_specs=P(None, "tp"))(x, w)
    with pytest.raises(ValueError, match="needs sequence_dim"):
        shard_map(lambda x, w: column_parallel_linear({"weight": w}, x, num_chunks=2), mesh=mesh,
                  in_specs=(P(), P("tp")), out_specs=P(None, None, "tp"))(x, torch.randn(4, 6, dtype=D64))


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_ring_all_gather_matmul_equals_all_gather_matmul(tp):
    mesh = cached_mesh((tp,), ("tp",))
    x, w = _data(tp, 2, seed=tp)
    w_col = w[:, : x.shape[-1]]

    def run(fn):
        return shard_map(lambda x, w: fn(x, w, "tp", dim=1), mesh=mesh, in_specs=(P(None, "tp"), P()),
                         out_specs=P(None, None, "tp"))

    with debug.count_comms() as log:
        ring = run(ring_all_gather_matmul)(x, w_col)
    # 1e-12, not bitwise: a block's GEMM may round its last bit differently from the full GEMM
    # (CPU BLAS blocking depends on the row count); the concatenation itself moves values exactly
    torch.testing.assert_close(ring, run(all_gather_matmul)(x, w_col), rtol=1e-12, atol=1e-12)
    local_bytes = x[:, : x.shape[1] // tp].numel() * 8
    assert log.bytes_sent(0) == (tp - 1) * local_bytes  # the all-gather's bytes, as t - 1 ring sends

    def ref_fn(x, w):  # every device's copy of the full product, side by side
        return torch.cat([F.linear(x, w)] * tp, dim=-1)

    assert_equivalent(run(ring_all_gather_matmul), ref_fn, x, w_col)
