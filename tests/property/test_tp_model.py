"""The layers issue's block and model sharded dp x tp (+SP) equal the single-device model; comm volume.

float64 everywhere; tolerance: assert_equivalent's float64 defaults (rtol 1e-10, atol 1e-12), the
reductions over tp reorder sums. Communication: bytes per device from count_comms equal PERF.md 2.2
exactly. Convention: shardfn keeps the gathered SP input for the column linears' weight gradient,
so Megatron-core's extra backward all-gather is *out*: TP and TP+SP both move 8(t-1)/t * bsh
elements per block (fwd+bwd), and SP adds the all-reduce of the two norm weights' gradients
(2 * 2(t-1)/t * h elements) that the vma rule inserts.
"""
import functools
from fractions import Fraction

import pytest
import torch

from shardfn import P, debug, shard_map
from shardfn.layers import block, model
from shardfn.layers.config import LlamaConfig
from shardfn.layers.rotary import rope_cache
from shardfn.layers.tp_model import tp_block_apply, tp_block_specs, tp_layout, tp_model_loss, tp_specs
from shardfn.testing import assert_equivalent, cached_mesh

D64 = torch.float64


def _config(tp, **kw):
    base = dict(vocab_size=4 * tp, hidden=8, num_layers=2, num_heads=2 * tp, num_kv_heads=tp, head_dim=2,
                ffn_hidden=2 * tp, dtype=D64)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.mark.parametrize("tp", [2, 3, 4])
@pytest.mark.parametrize("sp", [False, True])
def test_block_equals_reference_and_comm_volume(tp, sp):
    mesh = cached_mesh((1, tp), ("dp", "tp"))
    cfg = _config(tp, mlp="swiglu" if tp != 3 else "gelu", norm="rms" if tp != 4 else "layer")
    gen = torch.Generator().manual_seed(tp)
    params = block.init(gen, cfg)
    b, s, h = 2, 2 * tp, cfg.hidden
    x = torch.randn(b, s, h, generator=gen, dtype=D64)
    rope = rope_cache(s, cfg.rope_dim, dtype=D64)
    xspec = P(None, "tp") if sp else P()

    def local(p, x):
        return tp_block_apply(p, x, config=cfg, sequence_parallel=sp, rope=rope)

    def sharded(p, x):
        f = shard_map(local, mesh=mesh, in_specs=(tp_block_specs(p, cfg), xspec), out_specs=xspec)
        return f(tp_layout(p, cfg), x)

    def ref(p, x):
        return block.apply(p, x, config=cfg, rope=rope)

    assert_equivalent(sharded, ref, params, x)

    with debug.count_comms() as log:
        p = {k: v for k, v in params.items()}
        p = torch.utils._pytree.tree_map(lambda t: t.detach().requires_grad_(True), p)
        sharded(p, x.requires_grad_(True)).sum().backward()
    bsh = b * s * h * 8  # bytes of one [b, s, h] float64 activation
    t = tp
    expected = Fraction(8 * (t - 1), t) * bsh
    if sp:
        norm_params = sum(v.numel() for k in ("attn_norm", "mlp_norm") for v in params[k].values())
        expected += Fraction(2 * (t - 1), t) * norm_params * 8
    for dev in range(tp):
        assert log.bytes_sent(dev) == expected, (dev, log.calls(dev))
    names = sorted({n for n, _, _ in log.calls(0)})
    assert names == (["all_gather", "psum", "psum_scatter"] if sp else ["psum"])


@pytest.mark.parametrize("mesh_shape,sp,tie", [((2, 2), False, False), ((2, 2), True, True), ((1, 3), True, False),
                                              ((1, 4), False, True)])
def test_model_loss_dp_tp_equals_reference(mesh_shape, sp, tie):
    dp, tp = mesh_shape
    mesh = cached_mesh(mesh_shape, ("dp", "tp"))
    cfg = _config(tp, tie_embeddings=tie, position="rope" if tp != 4 else "alibi", num_kv_heads=2 * tp if tie else tp)
    gen = torch.Generator().manual_seed(10 * dp + tp)
    params = model.init(gen, cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2 * dp, 2 * tp), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (2 * dp, 2 * tp), generator=gen)
    specs = tp_specs(params, cfg)
    loss_fn = functools.partial(tp_model_loss, config=cfg, dp_axis="dp", sequence_parallel=sp)

    def sharded(params, tokens, targets):
        f = shard_map(loss_fn, mesh=mesh, in_specs=(specs, P("dp"), P("dp")), out_specs=P())
        return f(tp_layout(params, cfg), tokens, targets)

    def ref(params, tokens, targets):
        return model.loss(params, tokens, targets, config=cfg)

    # atol 1e-10: a whole model's gradients sum over tp, dp, heads and tokens in another order
    # (observed max error ~1e-11 on O(0.1) values); still ~1e5 below fp32 rounding.
    assert_equivalent(sharded, ref, params, tokens, targets, atol=1e-10)


def test_model_uneven_sequence_parallel():
    """SP with s = 5 over tp = 2 (blocks 3 and 2): gloo-safe pad-and-trim gathers and scatters."""
    mesh = cached_mesh((1, 2), ("dp", "tp"))
    cfg = _config(2, num_layers=1)
    gen = torch.Generator().manual_seed(5)
    params = model.init(gen, cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 5), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (2, 5), generator=gen)
    loss_fn = functools.partial(tp_model_loss, config=cfg, sequence_parallel=True)

    def sharded(params, tokens, targets):
        f = shard_map(loss_fn, mesh=mesh, in_specs=(tp_specs(params, cfg), P(), P()), out_specs=P())
        return f(tp_layout(params, cfg), tokens, targets)

    assert_equivalent(sharded, lambda p, a, b: model.loss(p, a, b, config=cfg), params, tokens, targets, atol=1e-10)


def test_config_errors():
    with pytest.raises(ValueError, match="not divisible by the tp size 2"):
        mesh = cached_mesh((1, 2), ("dp", "tp"))
        cfg = LlamaConfig(vocab_size=4, hidden=6, num_layers=1, num_heads=3, ffn_hidden=4)
        params = model.init(None, cfg)
        shard_map(functools.partial(tp_model_loss, config=cfg), mesh=mesh,
                  in_specs=(tp_specs(params, cfg), P(), P()), out_specs=P())(
            tp_layout(params, cfg), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="MoE"):
        tp_specs({}, LlamaConfig(vocab_size=4, hidden=4, num_layers=1, num_heads=2, num_experts=2))


@pytest.mark.parametrize("sp", [False, True])
def test_block_with_coc_chunks_equals_unchunked(sp):
    """CoC in the block (row linears as k pipelined chunks) equals the unchunked block and the reference.

    Not compared bitwise: inside the block the chunks are strided row subsets whose GEMMs the CPU
    BLAS may block differently from the whole (last-bit differences); 1e-12 in float64.
    """
    tp, k = 2, 2
    mesh = cached_mesh((1, tp), ("dp", "tp"))
    cfg = _config(tp, num_layers=1)
    gen = torch.Generator().manual_seed(21)
    params = block.init(gen, cfg)
    x = torch.randn(2, 2 * tp * k, cfg.hidden, generator=gen, dtype=D64)
    rope = rope_cache(x.shape[1], cfg.rope_dim, dtype=D64)
    xspec = P(None, "tp") if sp else P()

    def run(chunks):
        def fn(p, x):
            f = shard_map(lambda p, x: tp_block_apply(p, x, config=cfg, sequence_parallel=sp, rope=rope, num_chunks=chunks),
                          mesh=mesh, in_specs=(tp_block_specs(p, cfg), xspec), out_specs=xspec)
            return f(tp_layout(p, cfg), x)
        return fn

    torch.testing.assert_close(run(k)(params, x), run(1)(params, x), rtol=1e-12, atol=1e-12)
    assert_equivalent(run(k), lambda p, x: block.apply(p, x, config=cfg, rope=rope), params, x)


@pytest.mark.parametrize("sp", [False, True])
def test_model_without_vma_tracking(sp):
    """check_vma=False (no tracking cost): the explicit pvary of the TP entry, SP norms and SP row
    biases still give the reference gradients (the dp reduction is on the user, so dp = 1 here)."""
    mesh = cached_mesh((1, 2), ("dp", "tp"))
    cfg = _config(2, num_layers=1, bias=True)
    gen = torch.Generator().manual_seed(8)
    params = model.init(gen, cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 4), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (2, 4), generator=gen)
    loss_fn = functools.partial(tp_model_loss, config=cfg, sequence_parallel=sp)

    def sharded(params, tokens, targets):
        f = shard_map(loss_fn, mesh=mesh, in_specs=(tp_specs(params, cfg), P(), P()), out_specs=P(), check_vma=False)
        return f(tp_layout(params, cfg), tokens, targets)

    assert_equivalent(sharded, lambda p, a, b: model.loss(p, a, b, config=cfg), params, tokens, targets, atol=1e-10)
