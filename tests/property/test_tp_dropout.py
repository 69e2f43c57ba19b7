"""Dropout inside TP regions (Megatron's two streams) equals the single-device model fed the assembled masks.

Rule under test (FEATURES.md 6, 8): attention-probability dropout (this rank's heads) draws from the
per-rank model-parallel stream (seed + 2718 + tp rank); the hidden dropout before each residual add
draws from the stream shared by the tp group under plain TP (replicated activation) and from the
per-rank stream under SP (this rank's sequence block). The reference is the unsharded block / model
run with ``MaskFeed(assemble_tp_dropout_masks(...))``; an MLP hidden (features split over tp) uses the
per-rank stream too. Data-parallel replicas share the streams (Megatron's default). float64 with
assert_equivalent's float64 defaults (rtol 1e-10, atol 1e-12): only the tp reductions reorder sums.
"""
import functools

import attrs
import pytest
import torch
import torch.nn.functional as F

from shardfn import P, shard_map
from shardfn.layers import block, model
from shardfn.layers.activations import gelu
from shardfn.layers.config import LlamaConfig
from shardfn.layers.drop import MaskFeed, dropout
from shardfn.layers.recompute import checkpoint
from shardfn.layers.rotary import rope_cache
from shardfn.layers.tp_rng import (
    MODEL_PARALLEL_SEED_OFFSET,
    assemble_tp_dropout_masks,
    rank_streams,
    tp_dropout,
    tp_rng_streams,
)
from shardfn.layers.tensor_parallel import (
    column_parallel_linear,
    column_parallel_specs,
    row_parallel_linear,
    row_parallel_specs,
)
from shardfn.layers.tp_model import tp_block_apply, tp_block_specs, tp_layout, tp_model_loss, tp_specs
from shardfn.primitives.uneven import split_sizes
from shardfn.testing import assert_equivalent, cached_mesh

D64 = torch.float64
SEED = 1234


def _config(tp, **kw):
    base = dict(vocab_size=4 * tp, hidden=8, num_layers=1, num_heads=2 * tp, num_kv_heads=tp, head_dim=2,
                ffn_hidden=2 * tp, dtype=D64, attention_dropout=0.3, hidden_dropout=0.25, init_std=0.3)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.mark.parametrize("tp", [2, 4])
def test_streams_differ_for_sharded_and_agree_for_replicated(tp):
    mesh = cached_mesh((1, tp), ("dp", "tp"))
    x = torch.ones(1, 256, dtype=D64)

    def local(x):
        streams = tp_rng_streams(SEED)
        return torch.cat([tp_dropout(x, 0.5, streams, sharded=True), tp_dropout(x, 0.5, streams, sharded=False)])

    out = shard_map(local, mesh=mesh, in_specs=(P(),), out_specs=P("tp"), check_vma=False)(x)  # [2 tp, 256]
    sharded, replicated = out[0::2], out[1::2]
    for r in range(tp):
        assert torch.equal(replicated[r], replicated[0])  # one mask on every rank
        for q in range(r):
            assert not torch.equal(sharded[r], sharded[q]), (r, q)  # own mask per rank
        own = torch.Generator().manual_seed(SEED + MODEL_PARALLEL_SEED_OFFSET + r)
        torch.testing.assert_close(sharded[r], dropout(x[0], 0.5, generator=own), rtol=0, atol=0)
    torch.testing.assert_close(replicated[0], dropout(x[0], 0.5, generator=torch.Generator().manual_seed(SEED)),
                               rtol=0, atol=0)


@pytest.mark.parametrize("tp,sp", [(2, False), (2, True), (4, False), (4, True)])
def test_block_dropout_equals_reference_with_assembled_masks(tp, sp):
    mesh = cached_mesh((1, tp), ("dp", "tp"))
    cfg = _config(tp, mlp="swiglu" if tp == 2 else "gelu")
    gen = torch.Generator().manual_seed(tp)
    params = block.init(gen, cfg)
    b, s = 2, 2 * tp
    x = torch.randn(b, s, cfg.hidden, generator=gen, dtype=D64)
    rope = rope_cache(s, cfg.rope_dim, dtype=D64)
    xspec = P(None, "tp") if sp else P()

    def sharded(p, x):
        def local(p, x):
            return tp_block_apply(p, x, config=cfg, sequence_parallel=sp, rope=rope, rng=tp_rng_streams(SEED))

        f = shard_map(local, mesh=mesh, in_specs=(tp_block_specs(p, cfg), xspec), out_specs=xspec)
        return f(tp_layout(p, cfg), x)

    masks = assemble_tp_dropout_masks(SEED, cfg, b, s, tp=tp, sequence_parallel=sp)
    assert [tuple(m.shape) for m in masks] == [(b, cfg.num_heads, s, s), (b, s, cfg.hidden), (b, s, cfg.hidden)]

    def ref(p, x):
        feed = MaskFeed(masks)
        out = block.apply(p, x, config=cfg, rope=rope, generator=feed)
        assert feed.remaining == 0
        return out

    assert_equivalent(sharded, ref, params, x)
    # the masks matter: the block without dropout gives another output
    plain = block.apply(params, x, config=attrs.evolve(cfg, attention_dropout=0.0, hidden_dropout=0.0), rope=rope)
    assert (plain - ref(params, x)).abs().max() > 1e-3

    # per-rank parts of the masks: attention head blocks differ between ranks; hidden masks are one
    # shared mask (TP) or sequence blocks from the ranks' own streams (SP)
    heads = masks[0].chunk(tp, dim=1)
    assert all(not torch.equal(heads[r], heads[0]) for r in range(1, tp))
    hidden = masks[1]
    if sp:
        blocks = hidden.split(split_sizes(s, tp), dim=1)
        for r in range(tp):
            own = rank_streams(SEED, r).model_parallel
            torch.empty_like(heads[r]).bernoulli_(1 - cfg.attention_dropout, generator=own)  # its attention draw
            torch.testing.assert_close(blocks[r], torch.empty_like(blocks[r]).bernoulli_(1 - cfg.hidden_dropout,
                                                                                         generator=own), rtol=0, atol=0)
    else:
        shared = rank_streams(SEED, 0).shared
        torch.testing.assert_close(hidden, torch.empty_like(hidden).bernoulli_(1 - cfg.hidden_dropout,
                                                                               generator=shared), rtol=0, atol=0)


@pytest.mark.parametrize("mesh_shape,sp,s", [((2, 2), False, 4), ((2, 2), True, 4), ((1, 4), True, 6),
                                             ((1, 4), False, 4)])
def test_model_loss_dp_tp_dropout_equals_reference(mesh_shape, sp, s):
    """Whole model, 2 layers (one noop), dp x tp; s = 6 over tp 4 is an uneven SP split (2, 2, 1, 1)."""
    dp, tp = mesh_shape
    mesh = cached_mesh(mesh_shape, ("dp", "tp"))
    cfg = _config(tp, num_layers=3, noop_layers=(1,))
    gen = torch.Generator().manual_seed(10 * dp + tp)
    params = model.init(gen, cfg)
    b = 2 * dp
    tokens = torch.randint(0, cfg.vocab_size, (b, s), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (b, s), generator=gen)
    specs = tp_specs(params, cfg)

    def local(p, tokens, targets):
        return tp_model_loss(p, tokens, targets, config=cfg, dp_axis="dp", sequence_parallel=sp,
                             rng=tp_rng_streams(SEED))

    def sharded(params, tokens, targets):
        f = shard_map(local, mesh=mesh, in_specs=(specs, P("dp"), P("dp")), out_specs=P())
        return f(tp_layout(params, cfg), tokens, targets)

    masks = assemble_tp_dropout_masks([SEED] * dp, cfg, b, s, tp=tp, sequence_parallel=sp)
    assert len(masks) == 2 * 3  # 2 non-noop layers x (attention, 2 hidden)

    def ref(params, tokens, targets):
        feed = MaskFeed(masks)
        loss = model.loss(params, tokens, targets, config=cfg, generator=feed)
        assert feed.remaining == 0
        return loss

    assert_equivalent(sharded, ref, params, tokens, targets)


@pytest.mark.parametrize("tp,sp", [(2, False), (4, True)])
def test_recompute_with_dropout_is_bitwise(tp, sp):
    """checkpoint(tp_block_apply) replays both streams: output and every gradient bitwise equal."""
    mesh = cached_mesh((1, tp), ("dp", "tp"))
    cfg = _config(tp)
    gen = torch.Generator().manual_seed(3 + tp)
    params = block.init(gen, cfg)
    b, s = 2, 2 * tp
    x = torch.randn(b, s, cfg.hidden, generator=gen, dtype=D64)
    rope = rope_cache(s, cfg.rope_dim, dtype=D64)
    xspec = P(None, "tp") if sp else P()
    apply = functools.partial(tp_block_apply, config=cfg, sequence_parallel=sp, rope=rope)

    def run(recompute):
        def local(p, x):
            streams = tp_rng_streams(SEED)
            y = checkpoint(apply, p, x, rng=streams) if recompute else apply(p, x, rng=streams)
            # draw again after the block: the streams must have advanced exactly as without recompute
            return y + tp_dropout(torch.ones_like(y), 0.5, streams, sharded=True)

        p = torch.utils._pytree.tree_map(lambda t: t.detach().clone().requires_grad_(True), tp_layout(params, cfg))
        xx = x.detach().clone().requires_grad_(True)
        f = shard_map(local, mesh=mesh, in_specs=(tp_block_specs(params, cfg), xspec), out_specs=xspec,
                      check_vma=False)
        y = f(p, xx)
        (y * torch.linspace(-1, 1, y.numel(), dtype=D64).reshape(y.shape)).sum().backward()
        return y.detach(), xx.grad, torch.utils._pytree.tree_leaves(torch.utils._pytree.tree_map(lambda t: t.grad, p))

    y0, gx0, gp0 = run(False)
    y1, gx1, gp1 = run(True)
    assert torch.equal(y0, y1)
    assert torch.equal(gx0, gx1)
    assert len(gp0) == len(gp1) and all(torch.equal(a, b) for a, b in zip(gp0, gp1))


def test_dropout_needs_streams_and_zero_p_path_is_unchanged():
    mesh = cached_mesh((1, 2), ("dp", "tp"))
    cfg = _config(2)
    params = model.init(torch.Generator().manual_seed(0), cfg)
    tokens = torch.zeros(1, 2, dtype=torch.long)
    f = shard_map(functools.partial(tp_model_loss, config=cfg), mesh=mesh, in_specs=(tp_specs(params, cfg), P(), P()),
                  out_specs=P())
    with pytest.raises(ValueError, match="tp_rng_streams"):
        f(tp_layout(params, cfg), tokens, tokens)
    # p = 0: the streams are not touched (no draw), and the result equals the run without streams
    cfg0 = attrs.evolve(cfg, attention_dropout=0.0, hidden_dropout=0.0)

    def local(p, t, rng_used):
        streams = tp_rng_streams(SEED)
        loss = tp_model_loss(p, t, t, config=cfg0, rng=streams if rng_used else None)
        state = torch.stack([streams.shared.get_state().double().sum(), streams.model_parallel.get_state().double().sum()])
        fresh = tp_rng_streams(SEED)
        same = torch.stack([fresh.shared.get_state().double().sum(), fresh.model_parallel.get_state().double().sum()])
        return loss, torch.equal(state, same) * torch.ones((), dtype=D64)

    g = functools.partial(shard_map, mesh=mesh, in_specs=(tp_specs(params, cfg0), P()), out_specs=(P(), P()),
                          check_vma=False)
    with_rng, untouched = g(functools.partial(local, rng_used=True))(tp_layout(params, cfg0), tokens)
    without, _ = g(functools.partial(local, rng_used=False))(tp_layout(params, cfg0), tokens)
    assert torch.equal(with_rng, without) and untouched.item() == 1.0
    with pytest.raises(ValueError, match="masks were given"):
        dropout(torch.ones(2), 0.5, generator=MaskFeed([]))
    with pytest.raises(ValueError, match="needs \\(3,\\)"):
        dropout(torch.ones(3), 0.5, generator=MaskFeed([torch.ones(2)]))


@pytest.mark.parametrize("tp", [2, 4])
def test_mlp_hidden_dropout_per_feature_shard_dp_tp(tp):
    """Dropout on the MLP hidden (features split over tp) draws per rank; dp replicas share the streams."""
    dp = 2
    mesh = cached_mesh((dp, tp), ("dp", "tp"))
    gen = torch.Generator().manual_seed(20 + tp)
    h, f, p = 6, 2 * tp, 0.4
    fc1 = {"weight": torch.randn(f, h, generator=gen, dtype=D64), "bias": torch.randn(f, generator=gen, dtype=D64)}
    fc2 = {"weight": torch.randn(h, f, generator=gen, dtype=D64)}
    x = torch.randn(2 * dp, 3, h, generator=gen, dtype=D64)

    def local(p1, p2, x):
        hidden = gelu(column_parallel_linear(p1, x))  # [b/dp, 3, f/t], this rank's features
        return row_parallel_linear(p2, tp_dropout(hidden, p, tp_rng_streams(SEED), sharded=True))

    def sharded(p1, p2, x):
        return shard_map(local, mesh=mesh, in_specs=(column_parallel_specs(p1), row_parallel_specs(p2), P("dp")),
                         out_specs=P("dp"))(p1, p2, x)

    local_shape = (2, 3, f // tp)
    feature_mask = torch.cat([torch.empty(local_shape, dtype=D64).bernoulli_(1 - p, generator=rank_streams(SEED, r)
                                                                            .model_parallel) for r in range(tp)], dim=-1)
    mask = torch.cat([feature_mask] * dp, dim=0)

    def ref(p1, p2, x):
        hidden = gelu(F.linear(x, p1["weight"], p1["bias"]))
        return F.linear(dropout(hidden, p, generator=MaskFeed([mask])), p2["weight"])

    assert_equivalent(sharded, ref, fc1, fc2, x)
    blocks = feature_mask.chunk(tp, dim=-1)
    assert all(not torch.equal(blocks[r], blocks[0]) for r in range(1, tp))
