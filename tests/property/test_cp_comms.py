"""Bytes per device per attention layer (forward + backward) equal PERF.md 2.3 / FEATURES.md 14 exactly."""
from fractions import Fraction

import pytest
import torch

from shardfn import P, debug, shard_map
from shardfn.primitives.hybrid import hybrid_attention, hybrid_bytes, hybrid_shard
from shardfn.primitives.ring_attention import ring_attention, ring_bytes
from shardfn.primitives.ulysses import ulysses_attention, ulysses_bytes
from shardfn.testing import cached_mesh

B, D, ITEM = 1, 2, 4  # fp32


def _count(fn, mesh, spec, q, k, v):
    f = shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec)
    with debug.count_comms() as log:
        f(q, k, v).sum().backward()
    per_device = log.bytes_per_device()
    assert len(set(per_device.values())) == 1, per_device  # every rank sends the same
    return log


def _qkv(s, h, g):
    return [torch.randn(B, s, n, D, requires_grad=True) for n in (h, g, g)]


def _bsh(s, h):
    return B * s * h * D * ITEM  # one full-sequence activation of the layer, in bytes


@pytest.mark.parametrize("c,table", [(2, Fraction(2)), (4, Fraction(3, 2))])
def test_ulysses_volume_is_8_c_minus_1_over_c_squared_bsh(c, table):
    s, h = 4 * c, c
    log = _count(lambda q, k, v: ulysses_attention(q, k, v), cached_mesh((c,), ("cp",)), P(None, "cp"), *_qkv(s, h, h))
    assert log.bytes_sent(0) == Fraction(8 * (c - 1), c * c) * _bsh(s, h) == table * _bsh(s, h)
    assert log.bytes_sent(0, phase="forward") == log.bytes_sent(0, phase="backward")
    assert log.bytes_sent(0) == ulysses_bytes(B, s, h, h, D, c, ITEM)


@pytest.mark.parametrize("c,table", [(2, Fraction(3)), (4, Fraction(9, 2))])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ring_volume_is_6_c_minus_1_over_c_bsh(c, table, layout):
    s, h = 4 * c, 2
    log = _count(lambda q, k, v: ring_attention(q, k, v, layout=layout), cached_mesh((c,), ("cp",)), P(None, "cp"),
                 *_qkv(s, h, h))
    assert log.bytes_sent(0) == Fraction(6 * (c - 1), c) * _bsh(s, h) == table * _bsh(s, h)
    assert log.bytes_sent(0, phase="forward") == Fraction(2 * (c - 1), c) * _bsh(s, h)


@pytest.mark.parametrize("cache,blocks", [("full", 4), ("half", 5)])
@pytest.mark.parametrize("c,w", [(2, None), (4, None), (4, 2)])
def test_ring_kv_cache_cuts_backward_traffic(cache, blocks, c, w):
    s, h = 4 * c, 2
    mesh = cached_mesh((c,), ("cp",))
    log = _count(lambda q, k, v: ring_attention(q, k, v, kv_cache=cache, window_size=w), mesh, P(None, "cp"),
                 *_qkv(s, h, h))
    assert log.bytes_sent(0) == Fraction(blocks * (c - 1), c) * _bsh(s, h)
    # "full": only dK/dV travel in backward, half of the 4(c-1)/c without cache
    back = {"full": 2, "half": 3}[cache]
    assert log.bytes_sent(0, phase="backward") == Fraction(back * (c - 1), c) * _bsh(s, h)
    assert log.bytes_sent(0) == ring_bytes(B, s, h, D, c, ITEM, cache)


def test_ring_volume_with_gqa_scales_with_kv_heads():
    c, s, h, g = 4, 16, 4, 1
    log = _count(lambda q, k, v: ring_attention(q, k, v), cached_mesh((c,), ("cp",)), P(None, "cp"), *_qkv(s, h, g))
    assert log.bytes_sent(0) == Fraction(6 * (c - 1), c) * _bsh(s, h) * Fraction(g, h)


def test_double_ring_moves_the_same_bytes_as_one_ring():
    c, s, h = 4, 16, 2
    mesh = cached_mesh((c,), ("cp",))
    one = _count(lambda q, k, v: ring_attention(q, k, v), mesh, P(None, "cp"), *_qkv(s, h, h))
    two = _count(lambda q, k, v: ring_attention(q, k, v, window_size=2), mesh, P(None, "cp"), *_qkv(s, h, h))
    assert one.bytes_sent(0) == two.bytes_sent(0)


def test_hybrid_volume_matches_usp_formula():
    u, r, s, h = 2, 2, 16, 2
    axes = ("ring", "ulysses")
    q, k, v = _qkv(s, h, h)
    log = _count(lambda q, k, v: hybrid_attention(q, k, v), cached_mesh((r, u), axes), P(None, axes),
                 *(hybrid_shard(t.detach(), r).requires_grad_(True) for t in (q, k, v)))
    p = u * r
    assert log.bytes_sent(0) == (Fraction(8 * (u - 1), u) + 6 * (r - 1)) * _bsh(s, h) / p
    assert log.bytes_sent(0) == hybrid_bytes(B, s, h, h, D, u, r, ITEM)


@pytest.mark.parametrize("g", [4, 1])
def test_ulysses_volume_with_gqa(g):
    # PERF.md 2.3: q and o move at full h, k and v at h_kv: (2h + 2h_kv) / 4h of the MHA figure. With fewer
    # k/v heads than ranks (g=1 < c=4) k and v are first repeated to lcm(g, c) = 4 heads, which then move.
    c, s, h = 4, 16, 8
    log = _count(lambda q, k, v: ulysses_attention(q, k, v), cached_mesh((c,), ("cp",)), P(None, "cp"), *_qkv(s, h, g))
    moved_kv = max(g, c)
    assert log.bytes_sent(0) == Fraction(8 * (c - 1), c * c) * _bsh(s, h) * Fraction(2 * h + 2 * moved_kv, 4 * h)
    assert log.bytes_sent(0) == ulysses_bytes(B, s, h, g, D, c, ITEM)
