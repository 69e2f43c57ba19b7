"""Tensor-parallel and sequence-parallel layers against the single-device reference (FEATURES.md 6, 8, 57).

Tolerances: float64 throughout. Column-split forward values are pure data movement plus the same
dot products, so they are compared bitwise; everything that sums over tp (row outputs, input
gradients, replicated-weight gradients) uses assert_equivalent's float64 defaults (rtol 1e-10).
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from shardfn import P, shard_map
from shardfn.layers.tensor_parallel import (
    column_parallel_linear,
    column_parallel_specs,
    row_parallel_linear,
    row_parallel_specs,
    vocab_parallel_cross_entropy,
    vocab_parallel_embedding,
    vocab_parallel_embedding_specs,
)
from shardfn.primitives.uneven import pad_blocks, split_sizes, trim_block, unpad_blocks
from shardfn.testing import assert_equivalent, cached_mesh

D64 = torch.float64
MESHES = [(1, 2), (1, 3), (1, 4), (2, 2)]


def _mesh(shape):
    return cached_mesh(shape, ("dp", "tp"))


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=D64)


@settings(max_examples=6)
@given(mesh_shape=st.sampled_from(MESHES), b=st.integers(1, 2), s=st.integers(1, 3), h=st.integers(1, 4),
       per=st.integers(1, 3), bias=st.booleans(), seed=st.integers(0, 99))
def test_column_then_row_tp_equals_reference(mesh_shape, b, s, h, per, bias, seed):
    mesh = _mesh(mesh_shape)
    dp, tp = mesh_shape
    gen = torch.Generator().manual_seed(seed)
    f = per * tp
    x = _rand(gen, b * dp, s, h)
    p1 = {"weight": _rand(gen, f, h)}
    p2 = {"weight": _rand(gen, h, f)}
    if bias:
        p1["bias"], p2["bias"] = _rand(gen, f), _rand(gen, h)

    def local(x, p1, p2):
        return row_parallel_linear(p2, torch.tanh(column_parallel_linear(p1, x)))

    sharded = shard_map(local, mesh=mesh, in_specs=(P("dp"), column_parallel_specs(p1), row_parallel_specs(p2)),
                        out_specs=P("dp"))

    def ref(x, p1, p2):
        return F.linear(torch.tanh(F.linear(x, p1["weight"], p1.get("bias"))), p2["weight"], p2.get("bias"))

    assert_equivalent(sharded, ref, x, p1, p2)


@settings(max_examples=6)
@given(mesh_shape=st.sampled_from(MESHES), s_per=st.integers(1, 3), h=st.integers(1, 3), per=st.integers(1, 2),
       seed=st.integers(0, 99))
def test_column_gather_output_is_bitwise(mesh_shape, s_per, h, per, seed):
    mesh = _mesh(mesh_shape)
    dp, tp = mesh_shape
    gen = torch.Generator().manual_seed(seed)
    x = _rand(gen, dp, s_per, h)
    p = {"weight": _rand(gen, per * tp, h), "bias": _rand(gen, per * tp)}
    sharded = shard_map(lambda x, p: column_parallel_linear(p, x, gather_output=True), mesh=mesh,
                        in_specs=(P("dp"), column_parallel_specs(p)), out_specs=P("dp"))
    assert torch.equal(sharded(x, p), F.linear(x, p["weight"], p["bias"]))


@settings(max_examples=6)
@given(mesh_shape=st.sampled_from(MESHES), s_per=st.integers(1, 3), h=st.integers(1, 3), per=st.integers(1, 2),
       bias=st.booleans(), seed=st.integers(0, 99))
def test_sequence_parallel_mlp_equals_reference(mesh_shape, s_per, h, per, bias, seed):
    mesh = _mesh(mesh_shape)
    dp, tp = mesh_shape
    gen = torch.Generator().manual_seed(seed)
    x = _rand(gen, dp, s_per * tp, h)
    nw = 1.0 + 0.1 * _rand(gen, h)
    p1 = {"weight": _rand(gen, per * tp, h)}
    p2 = {"weight": _rand(gen, h, per * tp)}
    if bias:
        p1["bias"], p2["bias"] = _rand(gen, per * tp), _rand(gen, h)

    def local(x, nw, p1, p2):  # x: [b/dp, s/tp, h]; the norm runs on the sequence shard
        hdn = F.rms_norm(x, (h,), nw, 1e-6)
        y = column_parallel_linear(p1, hdn, sequence_dim=1)
        return x + row_parallel_linear(p2, F.gelu(y), reduce="psum_scatter", sequence_dim=1)

    sharded = shard_map(local, mesh=mesh,
                        in_specs=(P("dp", "tp"), P(), column_parallel_specs(p1), row_parallel_specs(p2)),
                        out_specs=P("dp", "tp"))

    def ref(x, nw, p1, p2):
        y = F.linear(F.rms_norm(x, (h,), nw, 1e-6), p1["weight"], p1.get("bias"))
        return x + F.linear(F.gelu(y), p2["weight"], p2.get("bias"))

    assert_equivalent(sharded, ref, x, nw, p1, p2)


def _sp_norm_grad(check_vma, lift_by_hand):
    mesh = _mesh((1, 2))
    gen = torch.Generator().manual_seed(3)
    x = _rand(gen, 1, 4, 3)
    nw = (1.0 + 0.1 * _rand(gen, 3)).requires_grad_(True)

    def local(x, nw):
        if lift_by_hand:
            from shardfn import pvary

            nw = pvary(nw, "tp")
        return F.rms_norm(x, (3,), nw, 1e-6) * 2.0

    out = shard_map(local, mesh=mesh, in_specs=(P(None, "tp"), P()), out_specs=P(None, "tp"),
                    check_vma=check_vma)(x, nw)
    (g,) = torch.autograd.grad(out.sum(), nw)
    nw_ref = nw.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad((F.rms_norm(x, (3,), nw_ref, 1e-6) * 2.0).sum(), nw_ref)
    return g, g_ref


def test_sp_norm_gradient_is_reduced_over_tp_by_vma():
    g, g_ref = _sp_norm_grad(check_vma=True, lift_by_hand=False)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_sp_norm_gradient_is_wrong_without_the_tp_reduction():
    # Negative test (FEATURES.md 8): with vma tracking off and no pvary, the norm weight's
    # gradient is only device 0's sequence shard's share, so it must differ from the reference.
    g, g_ref = _sp_norm_grad(check_vma=False, lift_by_hand=False)
    assert not torch.allclose(g, g_ref, rtol=1e-6, atol=1e-8)
    g_fixed, _ = _sp_norm_grad(check_vma=False, lift_by_hand=True)
    torch.testing.assert_close(g_fixed, g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tp,out_features,seq", [(4, 10, 6), (3, 7, 5), (4, 25, 9), (2, 3, 3)])
def test_unaligned_linear_and_sequence(tp, out_features, seq):
    """Uneven output features and an uneven sequence (tensor_split sizes), gloo-safe pad-and-trim."""
    mesh = _mesh((1, tp))
    gen = torch.Generator().manual_seed(tp * 100 + out_features)
    h = 3
    x = _rand(gen, 2, seq, h)
    w1, b1 = _rand(gen, out_features, h), _rand(gen, out_features)
    w2, b2 = _rand(gen, h, out_features), _rand(gen, h)

    def local(x_pad, w1_pad, b1_pad, w2_pad, b2):
        xs = trim_block(x_pad, seq, "tp", dim=1)              # [2, s_r, h]
        p1 = {"weight": trim_block(w1_pad, out_features, "tp", dim=0),
              "bias": trim_block(b1_pad, out_features, "tp", dim=0)}
        p2 = {"weight": trim_block(w2_pad, out_features, "tp", dim=1), "bias": b2}
        y = column_parallel_linear(p1, xs, sequence_dim=1, sequence_length=seq)  # [2, s, f_r]
        full = column_parallel_linear(p1, xs, sequence_dim=1, sequence_length=seq, gather_output=True,
                                      out_features=out_features)               # [2, s, f]
        z = row_parallel_linear(p2, torch.tanh(y), reduce="psum_scatter", sequence_dim=1)  # [2, s_r, h]
        return pad_blocks_local(z, seq), full

    def pad_blocks_local(z, total):  # pad this device's rows to the common block size for out_specs
        width = -(-total // tp)
        return F.pad(z, (0, 0, 0, width - z.shape[1]))

    def sharded(x, w1, b1, w2, b2):
        z_pad, full = shard_map(local, mesh=mesh, in_specs=(P(None, "tp"), P("tp"), P("tp"), P(None, "tp"), P()),
                                out_specs=(P(None, "tp"), P()))(
            pad_blocks(x, tp, dim=1), pad_blocks(w1, tp, dim=0), pad_blocks(b1, tp, dim=0),
            pad_blocks(w2, tp, dim=1), b2)
        return unpad_blocks(z_pad, seq, tp, dim=1), full

    def ref(x, w1, b1, w2, b2):
        y = F.linear(x, w1, b1)
        return F.linear(torch.tanh(y), w2, b2), y

    assert_equivalent(sharded, ref, x, w1, b1, w2, b2)
    assert split_sizes(1026, 4) == (257, 257, 256, 256) and split_sizes(25, 4) == (7, 6, 6, 6)


@settings(max_examples=6)
@given(mesh_shape=st.sampled_from(MESHES), vocab_per=st.integers(1, 3), s=st.integers(1, 4), h=st.integers(1, 3),
       seed=st.integers(0, 99), sp=st.booleans())
def test_vocab_parallel_embedding_and_cross_entropy(mesh_shape, vocab_per, s, h, seed, sp):
    mesh = _mesh(mesh_shape)
    dp, tp = mesh_shape
    gen = torch.Generator().manual_seed(seed)
    vocab = vocab_per * tp
    seq = s * tp
    tokens = torch.randint(0, vocab, (dp, seq), generator=gen)
    targets = torch.randint(0, vocab, (dp, seq), generator=gen)
    emb = {"weight": _rand(gen, vocab, h)}
    head = {"weight": _rand(gen, vocab, h)}

    def local(emb, head, tokens, targets):
        if sp:
            x = vocab_parallel_embedding(emb, tokens, reduce="psum_scatter")       # [b, s/tp, h]
            logits = column_parallel_linear(head, torch.sin(x), sequence_dim=1)    # [b, s, V/tp]
        else:
            x = vocab_parallel_embedding(emb, tokens)                              # [b, s, h]
            logits = column_parallel_linear(head, torch.sin(x))
        return vocab_parallel_cross_entropy(logits, targets)

    sharded = shard_map(local, mesh=mesh, in_specs=(vocab_parallel_embedding_specs(emb),
                                                     column_parallel_specs(head), P("dp"), P("dp")),
                        out_specs=P("dp"))

    def ref(emb, head, tokens, targets):
        logits = F.linear(torch.sin(F.embedding(tokens, emb["weight"])), head["weight"])
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)

    assert_equivalent(sharded, ref, emb, head, tokens, targets)


def test_errors_name_the_argument():
    mesh = _mesh((1, 2))
    x = torch.randn(2, 4, 3)
    p = {"weight": torch.randn(4, 5)}
    with pytest.raises(ValueError, match="in_features"):
        shard_map(lambda p, x: column_parallel_linear(p, x), mesh=mesh, in_specs=(column_parallel_specs(p), P()),
                  out_specs=P(None, None, "tp"))(p, x)
    with pytest.raises(ValueError, match="reduce="):
        shard_map(lambda p, x: row_parallel_linear(p, x, reduce="sum"), mesh=mesh,
                  in_specs=({"weight": P(None, "tp")}, P(None, None, "tp")), out_specs=P())({"weight": torch.randn(3, 4)}, torch.randn(2, 2, 4))
    with pytest.raises(ValueError, match="unknown parameter keys"):
        column_parallel_specs({"weight": 1, "scale": 2})


def test_gradients_taken_inside_the_program_are_local_gradients():
    """torch.autograd.grad inside shard_map (as a training step does) must not be lifted by the vma mode."""
    mesh = _mesh((1, 2))
    gen = torch.Generator().manual_seed(11)
    x = _rand(gen, 2, 3, 4)
    w1, w2 = _rand(gen, 6, 4).requires_grad_(True), _rand(gen, 4, 6).requires_grad_(True)

    def local(w1, w2, x):
        y = row_parallel_linear({"weight": w2}, torch.tanh(column_parallel_linear({"weight": w1}, x)))
        loss = y.pow(2).mean()
        g1, g2 = torch.autograd.grad(loss, [w1, w2])
        return loss.detach(), g1.detach(), g2.detach()

    loss, g1, g2 = shard_map(local, mesh=mesh, in_specs=(P("tp", None), P(None, "tp"), P()),
                             out_specs=(P(), P("tp", None), P(None, "tp")))(w1, w2, x)
    ref = F.linear(torch.tanh(F.linear(x, w1)), w2).pow(2).mean()
    r1, r2 = torch.autograd.grad(ref, [w1, w2])
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, r1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g2, r2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tp,heads,kv_heads,sp", [(4, 25, 25, False), (2, 10, 5, True), (3, 4, 4, False)])
def test_unaligned_heads_attention(tp, heads, kv_heads, sp):
    """25 heads over 4 (7, 6, 6, 6) and GQA 5 groups over 2 (3, 2): weights follow the kv groups."""
    from shardfn.layers import attention_block
    from shardfn.layers.tensor_parallel import unaligned_attention_layout, unaligned_attention_local, unaligned_attention_specs
    from shardfn.primitives.tensor_parallel import tp_enter

    mesh = _mesh((1, tp))
    gen = torch.Generator().manual_seed(heads)
    d, hidden, s = 1, 3, 2 * tp
    params = attention_block.init(gen, hidden, heads, kv_heads, d, bias=True, dtype=D64)
    x = _rand(gen, 1, s, hidden)

    def local(p, x):
        lp = unaligned_attention_local(p, num_kv_heads=kv_heads)
        h = tp_enter(x, "tp", sequence_dim=1 if sp else None)
        row = lambda q, y: row_parallel_linear(q, y, reduce="psum_scatter" if sp else "psum")  # noqa: E731
        return attention_block.apply(lp, h, head_dim=d, column_linear=lambda q, y: F.linear(y, q["weight"], q.get("bias")),
                                     row_linear=row)

    def sharded(p, x):
        view = unaligned_attention_layout(p, num_heads=heads, num_kv_heads=kv_heads, head_dim=d, num_parts=tp)
        xs = P(None, "tp") if sp else P()
        return shard_map(local, mesh=mesh, in_specs=(unaligned_attention_specs(view), xs), out_specs=xs)(view, x)

    assert_equivalent(sharded, lambda p, x: attention_block.apply(p, x, head_dim=d), params, x)


@pytest.mark.parametrize("mesh_shape", [(1, 2), (2, 2), (1, 3)])
@pytest.mark.parametrize("keep", [True, False])
def test_sp_mlp_both_conventions_values_and_bytes(mesh_shape, keep):
    """SP MLP, gathered input kept (paper) or re-gathered in backward (Megatron-core): same values,
    bytes per device 4(t-1)/t * bsh or 5(t-1)/t * bsh (half of PERF.md 2.2's 8 and 10 per layer),
    plus the norm weight's gradient all-reduce."""
    from shardfn import debug

    mesh = _mesh(mesh_shape)
    dp, tp = mesh_shape
    gen = torch.Generator().manual_seed(tp + 10 * dp)
    b, s, h, f = 2 * dp, 2 * tp, 3, 2 * tp
    x = _rand(gen, b, s, h)
    nw = 1.0 + 0.1 * _rand(gen, h)
    p1 = {"weight": _rand(gen, f, h), "bias": _rand(gen, f)}
    p2 = {"weight": _rand(gen, h, f)}

    def local(x, nw, p1, p2):
        y = column_parallel_linear(p1, F.rms_norm(x, (h,), nw, 1e-6), sequence_dim=1, keep_gathered_input=keep)
        return x + row_parallel_linear(p2, F.gelu(y), reduce="psum_scatter")

    sharded = shard_map(local, mesh=mesh, in_specs=(P("dp", "tp"), P(), column_parallel_specs(p1), row_parallel_specs(p2)),
                        out_specs=P("dp", "tp"))

    def ref(x, nw, p1, p2):
        return x + F.linear(F.gelu(F.linear(F.rms_norm(x, (h,), nw, 1e-6), p1["weight"], p1["bias"])), p2["weight"])

    assert_equivalent(sharded, ref, x, nw, p1, p2)
    with debug.count_comms() as log:
        args = [x, nw, p1, p2]
        args = torch.utils._pytree.tree_map(lambda t: t.detach().clone().requires_grad_(True), args)
        sharded(*args).pow(2).sum().backward()
    from fractions import Fraction

    bsh = (b // dp) * s * h * 8
    tp_only = sum(r.bytes_sent for r in log.records if r.device == 0 and r.axis_name == ("tp",))
    assert tp_only == Fraction((4 if keep else 5) * (tp - 1), tp) * bsh
    n = dp * tp  # the norm weight meets x split over dp and tp: one all-reduce of its gradient over both
    both = sum(r.bytes_sent for r in log.records if r.device == 0 and r.axis_name == ("dp", "tp"))
    assert both == Fraction(2 * (n - 1), n) * h * 8
