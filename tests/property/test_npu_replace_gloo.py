"""Replace gloo (FEATURES.md 42): the slicing and padding pieces, and the object/tensor gathers on the sim mesh.

The pure pieces are checked exactly against a single-process reference of the all-gather (stack
the ranks' round slices), for payload sizes and slice sizes drawn independently (so most sizes are
not divisible by the slice). The collectives then run inside shard_map on a simulated mesh with
``axis_name=`` and are compared with the values each rank should receive.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import shardfn
from shardfn import P, shard_map
from shardfn.npu import replace_gloo as rg
from shardfn.testing import cached_mesh


@given(max_len=st.integers(0, 200), slice_size=st.integers(1, 50))
def test_slice_bounds_cover_the_payload_in_ceil_rounds(max_len, slice_size):
    bounds = rg.slice_bounds(max_len, slice_size)
    assert len(bounds) == math.ceil(max_len / slice_size)
    covered = [i for start, stop in bounds for i in range(start, stop)]
    assert covered == list(range(max_len))
    assert all(stop - start == slice_size for start, stop in bounds[:-1])


def _payloads(lengths):
    # distinct non-zero values per rank and position, so a misplaced or padded element is caught
    return [torch.arange(1, n + 1, dtype=torch.int64) + 1000 * (i + 1) for i, n in enumerate(lengths)]


@given(lengths=st.lists(st.integers(0, 60), min_size=1, max_size=4), slice_size=st.integers(1, 17))
def test_round_slices_pad_and_unpack_round_trips(lengths, slice_size):
    flats = _payloads(lengths)
    max_len = max(lengths)
    per_rank = [rg.round_slices(f, max_len, slice_size) for f in flats]
    parts = [[] for _ in lengths]
    for r, (start, stop) in enumerate(rg.slice_bounds(max_len, slice_size)):
        rows = torch.stack([s[r] for s in per_rank])  # the all-gather of round r, [d, w]
        assert rows.shape == (len(lengths), stop - start)
        for i, n in enumerate(lengths):  # padding is zeros, only past the rank's own length
            assert torch.equal(rows[i, max(0, n - start):], torch.zeros_like(rows[i, max(0, n - start):]))
        for i, p in enumerate(rg.unpack_round(rows, start, lengths)):
            parts[i].append(p)
    for i, f in enumerate(flats):
        got = torch.cat(parts[i]) if parts[i] else f.new_zeros(0)
        assert torch.equal(got, f)


objects = st.recursive(
    st.none() | st.integers(-2**40, 2**40) | st.text(max_size=20) | st.binary(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@given(obj=objects)
def test_object_bytes_round_trip(obj):
    data = rg.object_to_bytes(obj)
    assert data.dtype == torch.uint8 and data.dim() == 1
    assert rg.bytes_to_object(data) == obj


def test_bad_arguments_name_the_rule():
    with pytest.raises(ValueError, match="slice_size=0 must be a positive int"):
        rg.slice_bounds(10, 0)
    with pytest.raises(ValueError, match="at most max_len=3"):
        rg.round_slices(torch.zeros(5), 3, 2)
    with pytest.raises(TypeError, match="1-d uint8"):
        rg.bytes_to_object(torch.zeros(3))
    with pytest.raises(ValueError, match="not both"):
        rg.all_gather_object(1, group=object(), axis_name="a")


# ---- on the simulated mesh, inside shard_map -----------------------------------------------------
def _obj(i):
    # sizes differ by rank and their pickles are not multiples of the slice sizes used below
    return {"rank": i, "data": list(range(7 * i + 3)), "name": "r" * (i + 1)}


def _tensor(i, dtype=torch.float64):
    return (torch.arange(13 + 5 * i, dtype=dtype) + 100 * i).reshape(-1, 1)


def _program(x, slice_size, dst, axis):
    i = int(shardfn.axis_index(axis))
    d = shardfn.axis_size(axis)
    kw = dict(axis_name=axis, slice_size=slice_size)
    everyone = [_obj(j) for j in range(d)]
    ok = [
        rg.all_gather_object(_obj(i), **kw) == everyone,
        rg.gather_object(_obj(i), dst, **kw) == (everyone if i == dst else None),
        rg.scatter_object([_obj(10 + j) for j in range(d)] if i == dst else None, dst, **kw) == _obj(10 + i),
        rg.broadcast_object(_obj(5) if i == dst else None, dst, **kw) == _obj(5),
    ]
    gathered = rg.sliced_gather(_tensor(i), dst, **kw)
    ok.append(gathered is None if i != dst else all(torch.equal(g, _tensor(j)) for j, g in enumerate(gathered)))
    ok.append(all(torch.equal(g, _tensor(j)) for j, g in enumerate(rg.sliced_all_gather(_tensor(i), **kw))))
    mine = rg.sliced_scatter([_tensor(j + 3) for j in range(d)] if i == dst else None, dst, **kw)
    ok.append(torch.equal(mine, _tensor(i + 3)))
    return x + torch.tensor(ok, dtype=x.dtype)


@settings(max_examples=3)
@given(slice_size=st.sampled_from([3, 7, 64, 10_000]), dst=st.integers(0, 2))
def test_object_and_tensor_gathers_on_the_sim_mesh(slice_size, dst):
    mesh = cached_mesh((3,), ("a",))
    fn = shard_map(lambda x: _program(x, slice_size, dst, "a"), mesh=mesh, in_specs=P("a"), out_specs=P("a"))
    flags = fn(torch.zeros(3 * 7)).reshape(3, 7)
    assert torch.equal(flags, torch.ones(3, 7)), f"per-rank checks failed (rows: ranks): {flags}"


def test_gathers_over_a_tuple_axis_on_the_sim_mesh():
    mesh = cached_mesh((2, 2), ("a", "b"))
    fn = shard_map(lambda x: _program(x, 5, 1, ("a", "b")), mesh=mesh, in_specs=P(("a", "b")),
                   out_specs=P(("a", "b")))
    assert torch.equal(fn(torch.zeros(4 * 7)), torch.ones(4 * 7))


def test_mismatched_dtypes_are_named():
    mesh = cached_mesh((2,), ("a",))

    def program(x):
        i = int(shardfn.axis_index("a"))
        rg.sliced_all_gather(_tensor(i, torch.float32 if i else torch.float64), axis_name="a", slice_size=4)
        return x

    with pytest.raises(Exception, match="different dtypes"):
        shard_map(program, mesh=mesh, in_specs=P("a"), out_specs=P("a"))(torch.zeros(2))
