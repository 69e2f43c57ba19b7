"""2D tensor parallelism (FEATURES.md 7) on (tp_x, tp_y) in {(2, 2), (3, 2)}: values, gradients, bytes.

float64; tolerance assert_equivalent's float64 defaults (the reduce-scatters and the norm statistics
reorder sums, E1 in FEATURES.md's terms). Bytes per device from count_comms equal FEATURES.md 7's
per-linear formula summed over the block, forward and backward (the backward of every collective
is its transpose, same bytes; the gathered input is kept for dW, no re-gather).
"""
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from shardfn import P, debug, shard_map
from shardfn.layers import block, mlp
from shardfn.layers.config import LlamaConfig
from shardfn.layers.rotary import rope_cache
from shardfn.layers.tp2d import block_2d_apply, layer_norm_2d, mlp_2d, rms_norm_2d, tp2d_block_specs
from shardfn.layers.tp_model import tp_layout
from shardfn.testing import assert_equivalent, cached_mesh

D64 = torch.float64
GRIDS = [(2, 2), (3, 2)]
ACT = P(None, "tpx", "tpy")  # [b, s/x, h/y]


def _mesh(grid):
    return cached_mesh(grid, ("tpx", "tpy"))


@settings(max_examples=6)
@given(grid=st.sampled_from(GRIDS), b=st.integers(1, 2), s_per=st.integers(1, 2), h_per=st.integers(1, 3),
       kind=st.sampled_from(["rms", "layer"]), seed=st.integers(0, 99))
def test_distributed_norms_equal_torch(grid, b, s_per, h_per, kind, seed):
    X, Y = grid
    gen = torch.Generator().manual_seed(seed)
    s, h = s_per * X, h_per * Y
    x = torch.randn(b, s, h, generator=gen, dtype=D64)
    w = 1.0 + 0.1 * torch.randn(h, generator=gen, dtype=D64)
    bias = 0.1 * torch.randn(h, generator=gen, dtype=D64)
    if kind == "rms":
        local = lambda x, w, bias: rms_norm_2d(x, w, axis_name="tpy", hidden=h) + bias  # noqa: E731
        ref = lambda x, w, bias: F.rms_norm(x, (h,), w, 1e-6) + bias  # noqa: E731
    else:
        local = lambda x, w, bias: layer_norm_2d(x, w, bias, axis_name="tpy", hidden=h)  # noqa: E731
        ref = lambda x, w, bias: F.layer_norm(x, (h,), w, bias, 1e-5)  # noqa: E731
    sharded = shard_map(local, mesh=_mesh(grid), in_specs=(ACT, P("tpy"), P("tpy")), out_specs=ACT)
    assert_equivalent(sharded, ref, x, w, bias)


def _mlp_bytes(b, s, h, e_in, e_out, X, Y, itemsize):
    """FEATURES.md 7 per linear, fwd + bwd: fc1 (AG=x, RS=y, h -> e_out), fc2 (AG=y, RS=x, e_in -> h)."""
    fc1 = Fraction((X - 1) * b * s * h, X * Y) + Fraction((Y - 1) * b * s * e_out, X * Y)
    fc2 = Fraction((Y - 1) * b * s * e_in, X * Y) + Fraction((X - 1) * b * s * h, X * Y)
    return 2 * (fc1 + fc2) * itemsize


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
def test_mlp_2d_equals_reference_and_formula_bytes(grid, kind):
    X, Y = grid
    gen = torch.Generator().manual_seed(X * 10 + Y)
    b, s, h, f = 2, 2 * X * Y, 2 * Y, 2 * X
    x = torch.randn(b, s, h, generator=gen, dtype=D64)
    params = mlp.init(gen, h, f, kind=kind, bias=True, dtype=D64)
    fc1 = {"weight": P(None, "tpx", "tpy"), "bias": P(None, "tpx")} if kind == "swiglu" else {"weight": P("tpx", "tpy"), "bias": P("tpx")}
    specs = {"fc1": fc1, "fc2": {"weight": P("tpy", "tpx"), "bias": P("tpy")}}
    cfg = LlamaConfig(vocab_size=4, hidden=h, num_layers=1, num_heads=1, ffn_hidden=f, mlp=kind, dtype=D64)

    def sharded(params, x):
        view = tp_layout({"mlp": params}, cfg)["mlp"] if kind == "swiglu" else params
        return shard_map(lambda p, x: mlp_2d(p, x, x_axis="tpx", y_axis="tpy", kind=kind), mesh=_mesh(grid),
                         in_specs=(specs, ACT), out_specs=ACT)(view, x)

    assert_equivalent(sharded, lambda p, x: mlp.apply(p, x, kind=kind), params, x)

    with debug.count_comms() as log:
        p = {k: {n: t.detach().requires_grad_(True) for n, t in v.items()} for k, v in params.items()}
        sharded(p, x.detach().requires_grad_(True)).pow(2).sum().backward()
    e_out = 2 * f if kind == "swiglu" else f
    expected = _mlp_bytes(b, s, h, f, e_out, X, Y, 8)
    # the fc1 bias P(x) meets rows split over y, the fc2 bias P(y) rows split over x: their gradients
    # are summed by the vma rule's pvary (all-reduce of the local bias slice)
    expected += Fraction(2 * (Y - 1), Y) * (e_out // X) * 8 + Fraction(2 * (X - 1), X) * (h // Y) * 8
    for dev in range(X * Y):
        assert log.bytes_sent(dev) == expected, (dev, log.calls(dev))
    if kind == "gelu":  # the two-matmul block formula, forward: 2bs[h(x-1) + E(y-1)] / (xy) elements
        assert log.bytes_sent(0, phase="forward") == Fraction(2 * b * s * (h * (X - 1) + f * (Y - 1)), X * Y) * 8


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_block_2d_equals_reference(grid, norm):
    X, Y = grid
    heads = X * Y
    cfg = LlamaConfig(vocab_size=4, hidden=2 * Y, num_layers=1, num_heads=heads, num_kv_heads=heads, head_dim=2,
                      ffn_hidden=2 * X, norm=norm, mlp="swiglu" if norm == "rms" else "gelu", dtype=D64)
    gen = torch.Generator().manual_seed(X + Y)
    params = block.init(gen, cfg)
    b, s = 1, X * Y
    x = torch.randn(b, s, cfg.hidden, generator=gen, dtype=D64)
    rope = rope_cache(s, cfg.rope_dim, dtype=D64)

    def sharded(params, x):
        f = shard_map(lambda p, x: block_2d_apply(p, x, config=cfg, rope=rope), mesh=_mesh(grid),
                      in_specs=(tp2d_block_specs(params, cfg), ACT), out_specs=ACT)
        return f(tp_layout(params, cfg), x)

    assert_equivalent(sharded, lambda p, x: block.apply(p, x, config=cfg, rope=rope), params, x)

    with debug.count_comms() as log:
        p = torch.utils._pytree.tree_map(lambda t: t.detach().requires_grad_(True), params)
        sharded(p, x.detach().requires_grad_(True)).pow(2).sum().backward()
    H, hd, f = cfg.hidden, heads * cfg.dim_per_head, cfg.ffn
    e_out = 2 * f if cfg.mlp == "swiglu" else f
    xy = X * Y
    fwd = (3 * (Fraction((X - 1) * b * s * H, xy) + Fraction((Y - 1) * b * s * hd, xy))   # q, k, v (AG=x, RS=y)
           + Fraction((Y - 1) * b * s * hd, xy) + Fraction((X - 1) * b * s * H, xy)       # o (AG=y, RS=x)
           + 4 * Fraction(Y - 1, Y) * Fraction(b * s * hd, xy))                           # Ulysses all-to-alls over y
    stats = 1 if norm == "rms" else 2
    per_norm = (2 * Fraction(2 * (Y - 1), Y) * (b * s // X) * stats                        # stats psum fwd + bwd
                + Fraction(2 * (X - 1), X) * (H // Y) * stats)                              # weight (+bias) grad over x
    expected = (2 * fwd + 2 * per_norm) * 8 + _mlp_bytes(b, s, H, f, e_out, X, Y, 8)
    for dev in range(xy):
        assert log.bytes_sent(dev) == expected, (dev, log.calls(dev))


def test_attention_2d_rejects_indivisible_heads():
    cfg = LlamaConfig(vocab_size=4, hidden=4, num_layers=1, num_heads=2, head_dim=2, ffn_hidden=4, mlp="gelu", dtype=D64)
    params = block.init(torch.Generator().manual_seed(0), cfg)
    x = torch.randn(1, 4, 4, dtype=D64)
    f = shard_map(lambda p, x: block_2d_apply(p, x, config=cfg), mesh=_mesh((2, 2)),
                  in_specs=(tp2d_block_specs(params, cfg), ACT), out_specs=ACT)
    with pytest.raises(ValueError, match="divisible by tp_x \\* tp_y"):
        f(params, x)
