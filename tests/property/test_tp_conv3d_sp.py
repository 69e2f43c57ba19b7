"""Conv3D sequence parallelism (FEATURES.md 9) against F.conv3d on the full input, float64.

Depths and strides that do not divide evenly, k_d = 1, dilation; sp in {2, 3, 4}. Gradients of the
input (overlap-add of halos) and of the weight (summed over the conv's own axis only) within float64
defaults; a 2-axis mesh where the input is replicated over the other axis proves the weight
gradient is not reduced over the whole world.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from shardfn import P, debug, shard_map
from shardfn.primitives.conv3d_sp import conv3d_depth_ranges, conv3d_sequence_parallel
from shardfn.testing import assert_equivalent, cached_mesh

D64 = torch.float64


@settings(max_examples=8)
@given(sp=st.sampled_from([2, 3, 4]), depth=st.integers(5, 11), k_d=st.sampled_from([1, 2, 3]),
       s_d=st.sampled_from([1, 2, 3]), dil=st.sampled_from([1, 2]), bias=st.booleans(), seed=st.integers(0, 99))
def test_conv3d_sp_equals_conv3d(sp, depth, k_d, s_d, dil, bias, seed):
    mesh = cached_mesh((sp,), ("sp",))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, depth, 3, 3, generator=gen, dtype=D64)
    w = torch.randn(2, 2, k_d, 2, 1, generator=gen, dtype=D64)
    b = torch.randn(2, generator=gen, dtype=D64) if bias else None
    stride, dilation = (s_d, 1, 1), (dil, 1, 1)

    def local(x, w, b):
        return conv3d_sequence_parallel(x, w, b, axis_name="sp", stride=stride, dilation=dilation)

    sharded = shard_map(local, mesh=mesh, in_specs=(P(), P(), P()), out_specs=P())
    assert_equivalent(sharded, lambda x, w, b: F.conv3d(x, w, b, stride=stride, dilation=dilation), x, w, b)


def test_depth_ranges_cover_every_window_with_halos():
    for depth, k, s, n in [(10, 3, 1, 4), (10, 3, 2, 2), (9, 1, 2, 3), (17, 4, 3, 4)]:
        ranges = conv3d_depth_ranges(depth, k, s, n)
        d_out = (depth - k) // s + 1
        assert ranges[0][2] == 0 and ranges[-1][3] == d_out
        for (a0, a1, o0, o1), nxt in zip(ranges, ranges[1:] + (None,)):
            assert a0 == o0 * s and a1 == (o1 - 1) * s + k  # exactly the frames its windows read
            if nxt is not None:
                assert nxt[2] == o1 and a1 - nxt[0] == k - s  # halo of k - s frames
    assert conv3d_depth_ranges(10, 3, 2, 2) == ((0, 5, 0, 2), (4, 9, 2, 4))


def test_weight_gradient_is_reduced_over_the_conv_axis_only():
    mesh = cached_mesh((2, 2), ("tp", "sp"))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 7, 2, 2, generator=gen, dtype=D64)
    w = torch.randn(3, 2, 3, 1, 1, generator=gen, dtype=D64)
    sharded = shard_map(lambda x, w: conv3d_sequence_parallel(x, w, axis_name="sp"), mesh=mesh,
                        in_specs=(P(), P()), out_specs=P())
    assert_equivalent(sharded, lambda x, w: F.conv3d(x, w), x, w)
    with debug.count_comms() as log:
        sharded(x.clone().requires_grad_(True), w.clone().requires_grad_(True)).sum().backward()
    # D_out = 5 windows -> 3 + 2; input frames [0, 5) and [3, 7): halo of k - s = 2 frames
    assert log.calls(0) == [("all_gather", ("sp",), "forward"), ("psum", ("sp",), "backward"),
                            ("all_gather", ("sp",), "backward")]
    out_block, w_numel, in_block = 3 * 3 * 2 * 2, w.numel(), 5 * 2 * 2 * 2
    assert [r.bytes_sent for r in log.records if r.device == 0] == [out_block * 8, w_numel * 8, in_block * 8]


def test_short_depth_falls_back_to_unsplit_conv():
    mesh = cached_mesh((4,), ("sp",))
    x = torch.randn(1, 1, 4, 2, 2, dtype=D64)
    w = torch.randn(1, 1, 3, 1, 1, dtype=D64)  # D_out = 2 < 4 devices
    sharded = shard_map(lambda x, w: conv3d_sequence_parallel(x, w, axis_name="sp"), mesh=mesh,
                        in_specs=(P(), P()), out_specs=P())
    assert_equivalent(sharded, lambda x, w: F.conv3d(x, w), x, w)
    with pytest.raises(ValueError, match="smaller than the dilated depth kernel"):
        conv3d_depth_ranges(2, 3, 1, 2)
