"""Ulysses attention (aligned, GQA, unaligned, all-gather KV, KV cache, packed documents) vs full attention."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardfn import P, all_to_all, shard_map
from shardfn.primitives.ulysses import gather_uneven, split_uneven, ulysses_attention, uneven_all_to_all
from shardfn.primitives.zigzag import split_sizes
from shardfn.testing import cached_mesh
from tests.property.cp_helpers import (
    CP_SIZES,
    assert_matches_reference,
    document_keep_ref,
    gqa_heads,
    qkv,
    reference_attention,
)


def _ulysses(c, **options):
    return shard_map(lambda q, k, v: ulysses_attention(q, k, v, axis_name="cp", **options),
                     mesh=cached_mesh((c,), ("cp",)), in_specs=P(None, "cp"), out_specs=P(None, "cp"))


@settings(max_examples=12)
@given(c=st.sampled_from(CP_SIZES), causal=st.booleans(), b=st.integers(1, 2), per_rank=st.integers(1, 3),
       d=st.integers(1, 3), kv_comm=st.sampled_from(["all_to_all", "all_gather"]), kv_cache=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float64, torch.float32]), data=st.data())
def test_ulysses_equals_full_attention(c, causal, b, per_rank, d, kv_comm, kv_cache, dtype, data):
    h, g = data.draw(gqa_heads(multiple_of=c, max_kv=4), label="heads")
    s = c * per_rank
    q, k, v = qkv(b, s, h, g, d, dtype)
    out = _ulysses(c, causal=causal, kv_comm=kv_comm, kv_cache=kv_cache)(q, k, v)
    assert_matches_reference(out, q, k, v, lambda q, k, v: reference_attention(q, k, v, causal=causal), dtype=dtype)


@pytest.mark.parametrize("c", CP_SIZES)
@pytest.mark.parametrize("kv_comm", ["all_to_all", "all_gather"])
def test_unaligned_ulysses_for_every_remainder(c, kv_comm):
    # s = c*k + r for every r, and head counts that do not divide c
    for r in range(c):
        s = 2 * c + r
        h, g = (c + 1, 1) if r % 2 else (2 * c, 2)
        q, k, v = qkv(1, s, h, g, 2, torch.float64, seed=r)

        def local(q, k, v):
            parts = [split_uneven(t, "cp", dim=1) for t in (q, k, v)]
            out = ulysses_attention(*parts, axis_name="cp", causal=True, seq_len=s, uneven=True, kv_comm=kv_comm)
            return gather_uneven(out, "cp", 1, s)

        out = shard_map(local, mesh=cached_mesh((c,), ("cp",)), in_specs=P(), out_specs=P())(q, k, v)
        assert_matches_reference(out, q, k, v, lambda q, k, v: reference_attention(q, k, v, causal=True),
                                 dtype=torch.float64)


@settings(max_examples=8)
@given(c=st.sampled_from(CP_SIZES), s=st.integers(1, 11), g=st.integers(1, 3), extra_rep=st.integers(0, 1),
       d=st.integers(1, 3), causal=st.booleans(), kv_comm=st.sampled_from(["all_to_all", "all_gather"]))
def test_unaligned_ulysses_any_sequence_and_head_count(c, s, g, extra_rep, d, causal, kv_comm):
    h = g * (-(-c // g) + extra_rep)  # GQA with at least one query head per device, any remainder
    q, k, v = qkv(1, s, h, g, d, torch.float64)

    def local(q, k, v):
        parts = [split_uneven(t, "cp", dim=1) for t in (q, k, v)]
        out = ulysses_attention(*parts, axis_name="cp", causal=causal, seq_len=s, uneven=True, kv_comm=kv_comm)
        return gather_uneven(out, "cp", 1, s)

    out = shard_map(local, mesh=cached_mesh((c,), ("cp",)), in_specs=P(), out_specs=P())(q, k, v)
    assert_matches_reference(out, q, k, v, lambda q, k, v: reference_attention(q, k, v, causal=causal),
                             dtype=torch.float64)


@pytest.mark.parametrize("c", CP_SIZES)
def test_all_to_all_twice_with_swapped_dims_is_the_identity(c):
    x = torch.arange(2 * 3 * c * (2 * c) * 2, dtype=torch.float64).view(2, 3 * c, 2 * c, 2)

    def round_trip(x):
        y = all_to_all(x, "cp", 2, 1, tiled=True)  # [b, s, h/c, d]
        return all_to_all(y, "cp", 1, 2, tiled=True)

    f = shard_map(round_trip, mesh=cached_mesh((c,), ("cp",)), in_specs=P(None, "cp"), out_specs=P(None, "cp"))
    assert torch.equal(f(x), x)


@pytest.mark.parametrize("c", CP_SIZES)
def test_uneven_all_to_all_round_trip_is_exact_and_layout_matches_split_and_cat(c):
    s, h = 2 * c + c - 1, c + 1
    seq, heads = split_sizes(s, c), split_sizes(h, c)
    x = torch.arange(s * h * 2, dtype=torch.float64).view(1, s, h, 2)

    def local(x):
        part = split_uneven(x, "cp", dim=1)
        y = uneven_all_to_all(part, "cp", 2, 1, heads, seq)  # [1, s, heads[me], 2]
        back = uneven_all_to_all(y, "cp", 1, 2, seq, heads)
        return gather_uneven(y.transpose(1, 2), "cp", 1, h).transpose(1, 2), gather_uneven(back, "cp", 1, s)

    heads_split, back = shard_map(local, mesh=cached_mesh((c,), ("cp",)), in_specs=P(), out_specs=(P(), P()))(x)
    assert torch.equal(back, x)
    assert torch.equal(heads_split, x)  # device j holds all tokens of heads block j, exactly


@settings(max_examples=6)
@given(c=st.sampled_from((2, 3)), lengths=st.lists(st.integers(1, 6), min_size=1, max_size=3), causal=st.booleans())
def test_ulysses_with_packed_documents_equals_per_document_attention(c, lengths, causal):
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    s = int(cu[-1])
    padded = s + (-s % c)
    q, k, v = qkv(1, padded, c, c, 2, torch.float64)
    out = _ulysses(c, causal=causal, cu_seqlens=cu)(q, k, v)[:, :s]
    keep = document_keep_ref(cu, s)
    assert_matches_reference(
        out, q, k, v, lambda q, k, v: reference_attention(q[:, :s], k[:, :s], v[:, :s], causal=causal, keep=keep),
        dtype=torch.float64,
    )


def test_ulysses_kv_cache_outputs_bitwise_equal_and_all_gather_kv_close():
    q, k, v = qkv(1, 8, 4, 1, 2, torch.float32)
    cot = torch.randn(q.shape)
    runs = {}
    for key in [("all_to_all", False), ("all_to_all", True), ("all_gather", False), ("all_gather", True)]:
        out = _ulysses(4, causal=True, kv_comm=key[0], kv_cache=key[1])(q, k, v)
        runs[key] = (out, *torch.autograd.grad(out, (q, k, v), cot))
    for kv_comm in ("all_to_all", "all_gather"):
        for a, b in zip(runs[(kv_comm, False)], runs[(kv_comm, True)]):
            assert torch.equal(a, b)
    # AllGather-KV vs repeat + all-to-all: E0 forward, E1 for dk/dv (reduce-scatter sums in another order)
    assert torch.equal(runs[("all_gather", False)][0], runs[("all_to_all", False)][0])
    for a, b in zip(runs[("all_gather", False)][1:], runs[("all_to_all", False)][1:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_bad_ulysses_inputs_are_clear_errors():
    mesh = cached_mesh((4,), ("cp",))

    def run(q, k, **kw):
        return shard_map(lambda q, k: ulysses_attention(q, k, k, **kw), mesh=mesh, in_specs=P(None, "cp"),
                         out_specs=P(None, "cp"))(q, k)

    with pytest.raises(ValueError, match=r"6 query heads do not split over the size 4 of \('cp',\).*uneven=True"):
        run(torch.zeros(1, 8, 6, 2), torch.zeros(1, 8, 6, 2))
    with pytest.raises(ValueError, match=r"seq_len=9 split over 4 devices gives it 3"):
        run(torch.zeros(1, 8, 4, 2), torch.zeros(1, 8, 4, 2), seq_len=9, uneven=True)
    with pytest.raises(ValueError, match=r"3 query heads over the 4 devices of \('cp',\) leave some devices without"):
        run(torch.zeros(1, 8, 3, 2), torch.zeros(1, 8, 3, 2), seq_len=8, uneven=True)
    with pytest.raises(ValueError, match=r"uneven=True needs seq_len"):
        run(torch.zeros(1, 8, 4, 2), torch.zeros(1, 8, 4, 2), uneven=True)
    with pytest.raises(ValueError, match="kv_comm='ring' must be one of"):
        run(torch.zeros(1, 8, 4, 2), torch.zeros(1, 8, 4, 2), kv_comm="ring")
