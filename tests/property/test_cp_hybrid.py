"""Hybrid Ulysses x ring attention (USP) on a 2x2 (ring, ulysses) mesh vs full-sequence attention."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardfn import P, shard_map
from shardfn.primitives.hybrid import hybrid_attention, hybrid_groups, hybrid_shard, hybrid_unshard
from shardfn.primitives.zigzag import varlen_zigzag_shard, varlen_zigzag_unshard
from shardfn.testing import cached_mesh
from tests.property.cp_helpers import assert_matches_reference, document_keep_ref, gqa_heads, qkv, reference_attention

AXES = ("ring", "ulysses")


def _hybrid(**options):
    return shard_map(lambda q, k, v: hybrid_attention(q, k, v, ulysses_axis="ulysses", ring_axis="ring", **options),
                     mesh=cached_mesh((2, 2), AXES), in_specs=P(None, AXES), out_specs=P(None, AXES))


@settings(max_examples=8)
@given(causal=st.booleans(), layout=st.sampled_from(["zigzag", "contiguous"]), heads=gqa_heads(multiple_of=2),
       b=st.integers(1, 2), chunk=st.integers(1, 2), d=st.integers(1, 3),
       kv_cache=st.sampled_from([None, "full"]), window=st.sampled_from([None, 1]),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_hybrid_equals_full_attention(causal, layout, heads, b, chunk, d, kv_cache, window, dtype):
    h, g = heads
    s = 8 * chunk
    q, k, v = qkv(b, s, h, g, d, dtype)
    f = _hybrid(causal=causal, layout=layout, kv_cache=kv_cache, window_size=window)
    out = hybrid_unshard(f(*(hybrid_shard(t, 2, layout=layout) for t in (q, k, v))), 2, layout=layout)
    assert_matches_reference(out, q, k, v, lambda q, k, v: reference_attention(q, k, v, causal=causal), dtype=dtype)


def test_hybrid_with_packed_documents():
    cu = torch.tensor([0, 5, 6, 13])
    s = 13
    q, k, v = qkv(1, s, 2, 2, 2, torch.float64)
    f = _hybrid(causal=True, cu_seqlens=cu)
    out = varlen_zigzag_unshard(f(*(varlen_zigzag_shard(t, cu, 2) for t in (q, k, v))), cu, 2)
    keep = document_keep_ref(cu, s)
    assert_matches_reference(out, q, k, v, lambda q, k, v: reference_attention(q, k, v, causal=True, keep=keep),
                             dtype=torch.float64)


def test_hybrid_group_table():
    assert hybrid_groups(2, 2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    assert hybrid_groups(2, 4) == ([[0, 1], [2, 3], [4, 5], [6, 7]], [[0, 2, 4, 6], [1, 3, 5, 7]])
    # the mesh's flat rank agrees: (ring=i, ulysses=j) is rank i*u + j
    mesh = cached_mesh((2, 2), AXES)
    assert [mesh.index_of({"ring": i, "ulysses": j}) for i in range(2) for j in range(2)] == [0, 1, 2, 3]


def test_hybrid_heads_not_divisible_by_ulysses_degree_is_a_clear_error():
    q, k, v = qkv(1, 8, 3, 3, 2, torch.float64)
    with pytest.raises(ValueError, match=r"3 query heads do not split over the Ulysses axis \('ulysses',\) of size 2"):
        _hybrid()(q, k, v)
