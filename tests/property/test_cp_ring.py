"""Ring attention (zigzag / contiguous, double ring, KV cache, packed documents) vs full-sequence attention."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardfn import P, shard_map
from shardfn.primitives.ring_attention import (
    _Plan,
    double_ring_groups,
    kv_cache_policy_for_layer,
    ring_attention,
    ring_visit_order,
)
from shardfn.primitives.zigzag import (
    layout_positions,
    varlen_zigzag_indices,
    varlen_zigzag_shard,
    varlen_zigzag_unshard,
    zigzag_indices,
    zigzag_shard,
    zigzag_unshard,
)
from shardfn.testing import cached_mesh
from tests.property.cp_helpers import (
    CP_SIZES,
    assert_matches_reference,
    document_keep_ref,
    gqa_heads,
    qkv,
    reference_attention,
)


def _ring(c, layout, **options):
    mesh = cached_mesh((c,), ("cp",))
    f = shard_map(lambda q, k, v: ring_attention(q, k, v, axis_name="cp", layout=layout, **options), mesh=mesh,
                  in_specs=P(None, "cp"), out_specs=P(None, "cp"))
    if layout == "contiguous":
        return f
    return lambda q, k, v: zigzag_unshard(f(*(zigzag_shard(t, c) for t in (q, k, v))), c)


@settings(max_examples=12)
@given(c=st.sampled_from(CP_SIZES), layout=st.sampled_from(["zigzag", "contiguous"]), causal=st.booleans(),
       heads=gqa_heads(), b=st.integers(1, 2), chunk=st.integers(1, 2), d=st.integers(1, 3),
       dtype=st.sampled_from([torch.float64, torch.float64, torch.float32]), data=st.data())
def test_ring_attention_equals_full_attention(c, layout, causal, heads, b, chunk, d, dtype, data):
    h, g = heads
    s = 2 * c * chunk
    w = data.draw(st.sampled_from([x for x in range(1, c + 1) if c % x == 0]), label="window_size")
    q, k, v = qkv(b, s, h, g, d, dtype)
    out = _ring(c, layout, causal=causal, window_size=w)(q, k, v)
    assert_matches_reference(out, q, k, v, lambda q, k, v: reference_attention(q, k, v, causal=causal), dtype=dtype)


@pytest.mark.parametrize("c,w", [(4, 2), (6, 2), (6, 3)])
def test_double_ring_equals_single_ring_and_full_attention(c, w):
    q, k, v = qkv(1, 2 * c, 2, 1, 2, torch.float64)
    out = _ring(c, "zigzag", causal=True, window_size=w)(q, k, v)
    single = _ring(c, "zigzag", causal=True, window_size=1)(*(t.detach() for t in (q, k, v)))
    torch.testing.assert_close(out, single, rtol=1e-13, atol=1e-14)
    assert_matches_reference(out, q, k, v, lambda q, k, v: reference_attention(q, k, v, causal=True),
                             dtype=torch.float64)


def test_double_ring_over_two_mesh_axes_and_without_vma_tracking():
    # windows = the inner mesh axis: axis_name=(outer, inner), window_size = size(inner)
    mesh = cached_mesh((2, 2), ("cpo", "cpi"))
    q, k, v = qkv(1, 8, 2, 2, 2, torch.float64)
    for check_vma in (True, False):
        f = shard_map(lambda q, k, v: ring_attention(q, k, v, axis_name=("cpo", "cpi"), window_size=2), mesh=mesh,
                      in_specs=P(None, ("cpo", "cpi")), out_specs=P(None, ("cpo", "cpi")), check_vma=check_vma)
        out = zigzag_unshard(f(*(zigzag_shard(t, 4) for t in (q, k, v))), 4)
        assert_matches_reference(out, q, k, v, lambda q, k, v: reference_attention(q, k, v, causal=True),
                                 dtype=torch.float64)


@pytest.mark.parametrize("cache", ["full", "half"])
@pytest.mark.parametrize("c,w,layout", [(2, None, "zigzag"), (4, 2, "zigzag"), (3, None, "contiguous")])
def test_kv_cache_is_bitwise_equal_to_no_cache(cache, c, w, layout):
    q, k, v = qkv(2, 2 * c, 2, 2, 3, torch.float32)
    cot = torch.randn(q.shape)
    results = []
    for policy in (None, cache):
        out = _ring(c, layout, window_size=w, kv_cache=policy)(q, k, v)
        results.append((out, *torch.autograd.grad(out, (q, k, v), cot)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _true_keep(i, kv_id, c, s_local):
    pos = layout_positions("zigzag", c * s_local, c)
    return pos[kv_id][None, :] <= pos[i][:, None]


@pytest.mark.parametrize("c", CP_SIZES)
def test_zigzag_three_case_rule_covers_the_causal_mask_with_half_a_block_pair(c):
    s_local = 4
    for i in range(c):
        plan = _Plan(("cp",), c, i, c, True, "zigzag", 1.0, None, None, None, dc=None)
        for kv_id in range(c):
            covered = torch.zeros(s_local, s_local, dtype=torch.bool)
            work = 0
            for qs, ks, keep, causal in plan.terms(kv_id, s_local, None):
                assert keep is None and causal == (kv_id == i)  # no mask tensors; causal only on the diagonal
                block = torch.ones(s_local, s_local, dtype=torch.bool)[qs, ks]
                block = block.tril() if causal else block
                covered[qs, ks] |= block
                work += block.numel()
            assert torch.equal(covered, _true_keep(i, kv_id, c, s_local)), (i, kv_id)
            # off-diagonal steps compute exactly half a block pair, unmasked
            assert work == (s_local * s_local if kv_id == i else s_local * s_local // 2)


@pytest.mark.parametrize("c,w", [(4, 2), (6, 2), (6, 3), (8, 4)])
def test_double_ring_groups_table_and_every_block_visited_once(c, w):
    inner, outer = double_ring_groups(c, w)
    assert inner == [list(range(k * w, (k + 1) * w)) for k in range(c // w)]
    assert outer == [list(range(j, c, w)) for j in range(w)]
    for i in range(c):
        order = ring_visit_order(i, c, w)
        assert sorted(order) == list(range(c)) and order[0] == i
    assert ring_visit_order(2, 4, 4) == [2, 1, 0, 3]  # the single ring: kv_id <- kv_id - 1 (mod c)


def test_kv_cache_interval_table():
    assert [kv_cache_policy_for_layer(layer, "full", 0) for layer in range(1, 5)] == ["full"] * 4
    every_other = [kv_cache_policy_for_layer(layer, "half", 1) for layer in range(1, 6)]
    assert every_other == ["half", None, "half", None, "half"]
    every_third = [kv_cache_policy_for_layer(layer, "full", 2) for layer in range(1, 8)]
    assert every_third == ["full", None, None, "full", None, None, "full"]
    assert kv_cache_policy_for_layer(3, None, 2) is None


@settings(max_examples=8)
@given(c=st.sampled_from((2, 3)), lengths=st.lists(st.integers(1, 7), min_size=1, max_size=3),
       layout=st.sampled_from(["zigzag", "contiguous"]), causal=st.booleans())
def test_ring_with_packed_documents_equals_per_document_attention(c, lengths, layout, causal):
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    s = int(cu[-1])
    q, k, v = qkv(1, s, 2, 1, 2, torch.float64)
    mesh = cached_mesh((c,), ("cp",))
    f = shard_map(lambda q, k, v: ring_attention(q, k, v, causal=causal, layout=layout, cu_seqlens=cu), mesh=mesh,
                  in_specs=P(None, "cp"), out_specs=P(None, "cp"))
    if layout == "zigzag":
        out = varlen_zigzag_unshard(f(*(varlen_zigzag_shard(t, cu, c) for t in (q, k, v))), cu, c)
    else:
        pad = -s % c
        out = f(*(torch.cat([t, t.new_zeros(1, pad, *t.shape[2:])], 1) for t in (q, k, v)))[:, :s]
    keep = document_keep_ref(cu, s)
    assert_matches_reference(out, q, k, v, lambda q, k, v: reference_attention(q, k, v, causal=causal, keep=keep),
                             dtype=torch.float64)


def test_zigzag_layout_tables():
    assert zigzag_indices(8, 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    assert zigzag_indices(12, 3).tolist() == [0, 1, 10, 11, 2, 3, 8, 9, 4, 5, 6, 7]
    x = torch.arange(24).view(2, 12)
    assert torch.equal(zigzag_unshard(zigzag_shard(x, 3), 3), x)
    # documents of 3 and 5 tokens over c = 2: padded to 4 and 8, cut in 4 pieces; rank r takes pieces
    # r and 3-r of each document: rank 0 [0, -1 | 3, 4, -1, -1], rank 1 [1, 2 | 5, 6, 7, -1]
    idx = varlen_zigzag_indices(torch.tensor([0, 3, 8]), 2)
    assert idx.tolist() == [0, -1, 3, 4, -1, -1, 1, 2, 5, 6, 7, -1]
    x = torch.arange(8)[None] + 10
    cu = torch.tensor([0, 3, 8])
    assert torch.equal(varlen_zigzag_unshard(varlen_zigzag_shard(x, cu, 2), cu, 2), x)


def test_zigzag_without_padding_is_a_clear_error():
    with pytest.raises(ValueError, match=r"not divisible by 6\. Pad the sequence"):
        zigzag_shard(torch.zeros(1, 9), 3)
    q, k, v = qkv(1, 3, 1, 1, 2, torch.float64)
    f = shard_map(lambda q, k, v: ring_attention(q, k, v, layout="zigzag"), mesh=cached_mesh((3,), ("cp",)),
                  in_specs=P(None, "cp"), out_specs=P(None, "cp"))
    with pytest.raises(ValueError, match=r"local sequence length must be even; got 1 \(global 3, not divisible by 6\)"):
        f(q, k, v)


def test_bad_ring_arguments_are_clear_errors():
    mesh = cached_mesh((4,), ("cp",))
    q, k, v = qkv(1, 8, 2, 2, 2, torch.float64)

    def run(**kw):
        return shard_map(lambda q, k, v: ring_attention(q, k, v, **kw), mesh=mesh, in_specs=P(None, "cp"),
                         out_specs=P(None, "cp"))(q, k, v)

    with pytest.raises(ValueError, match=r"window_size=3 must be a positive divisor of the ring size 4"):
        run(window_size=3)
    with pytest.raises(ValueError, match="layout='stripe' must be one of"):
        run(layout="stripe")
    with pytest.raises(NotImplementedError, match="dropout"):
        run(dropout_p=0.1)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        shard_map(lambda q, k: ring_attention(q, k, k), mesh=mesh, in_specs=P(None, "cp"),
                  out_specs=P(None, "cp"))(q, torch.zeros(1, 8, 3, 2))


@pytest.mark.parametrize("algo", ["ring", "ulysses", "ulysses_kv_cache"])
def test_kv_replicated_over_a_head_axis_gets_its_gradient_summed(algo):
    # q heads split over 'tp' (tensor parallel), one k/v head replicated over 'tp' (MQA): the CP
    # functions are autograd Functions, so they lift k/v over 'tp' themselves (pvary: psum of dk, dv).
    from shardfn.primitives.ulysses import ulysses_attention

    mesh = cached_mesh((2, 2), ("tp", "cp"))
    q, k, v = qkv(1, 8, 4, 1, 2, torch.float64)

    def local(q, k, v):
        if algo == "ring":
            return ring_attention(q, k, v, axis_name="cp", layout="contiguous")
        return ulysses_attention(q, k, v, axis_name="cp", causal=True, kv_cache=algo == "ulysses_kv_cache")

    f = shard_map(local, mesh=mesh, in_specs=(P(None, "cp", "tp"), P(None, "cp"), P(None, "cp")),
                  out_specs=P(None, "cp", "tp"))
    assert_matches_reference(f(q, k, v), q, k, v, lambda q, k, v: reference_attention(q, k, v, causal=True),
                             dtype=torch.float64)
