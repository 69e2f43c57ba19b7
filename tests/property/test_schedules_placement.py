"""Layer partitioning and the layer -> (rank, chunk) map against brute-force enumeration."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

from shardfn.schedules import (
    layer_to_rank_chunk,
    partition_layers,
    rank_chunk_of_stage,
    stage_of_rank_chunk,
    stage_to_rank,
)


def _brute_force_walk(num_ranks, num_chunks, placement):
    """The (rank, chunk) of each stage in model order, by walking the pipeline."""
    walk = []
    for chunk in range(num_chunks):
        order = range(num_ranks)
        if placement == "v" and chunk % 2 == 1:
            order = reversed(range(num_ranks))
        walk += [(rank, chunk) for rank in order]
    return walk


@st.composite
def layouts(draw):
    p = draw(st.integers(1, 8))
    v = draw(st.integers(1, 4))
    placement = draw(st.sampled_from(["loop", "v"]))
    counts = draw(st.lists(st.integers(0, 3), min_size=p * v, max_size=p * v))
    return p, v, placement, counts


@given(layouts())
def test_layer_map_matches_brute_force(layout):
    p, v, placement, counts = layout
    walk = _brute_force_walk(p, v, placement)
    expected = [walk[stage] for stage, count in enumerate(counts) for _ in range(count)]
    num_layers = len(expected)
    got = [
        layer_to_rank_chunk(i, num_layers, p, num_chunks=v, placement=placement, layers_per_stage=counts)
        for i in range(num_layers)
    ]
    assert got == expected
    # Even split: the closed-form path (no prefix sums).
    per = 2
    even = [walk[stage] for stage in range(p * v) for _ in range(per)]
    total = per * p * v
    assert [layer_to_rank_chunk(i, total, p, num_chunks=v, placement=placement) for i in range(total)] == even
    # Stage maps invert each other and agree with torch's own stage -> rank mapping.
    for stage, (rank, chunk) in enumerate(walk):
        assert rank_chunk_of_stage(stage, p, placement) == (rank, chunk)
        assert stage_of_rank_chunk(rank, chunk, p, placement) == stage
    if v > 1 or placement == "loop":
        theirs = generate_stage_to_rank_mapping(p, p * v, style=placement)
        assert stage_to_rank(p * v, p, placement) == tuple(theirs[s] for s in range(p * v))


@given(layouts(), st.data())
def test_partition_layers(layout, data):
    p, v, placement, counts = layout
    num_layers = sum(counts)
    noops = data.draw(st.lists(st.integers(0, max(num_layers - 1, 0)), max_size=3)) if num_layers else []
    part = partition_layers(num_layers, p * v, layers_per_stage=counts, noop_layers=noops)
    assert part.layers_per_stage == tuple(counts)
    assert [i for layers in part.stage_layers for i in layers] == list(range(num_layers))
    for stage, layers in enumerate(part.stage_layers):
        for i in layers:
            assert part.stage_of(i) == stage
        assert part.real_layers(stage) == tuple(i for i in layers if i not in set(noops))


def test_documented_examples():
    # FEATURES.md 2: L=16, p=4, v=2: rank 0 holds layers {1,2} and {9,10} (1-based).
    on_rank0 = [i + 1 for i in range(16) if layer_to_rank_chunk(i, 16, 4, num_chunks=2)[0] == 0]
    assert on_rank0 == [1, 2, 9, 10]
    # FEATURES.md 52: DualPipeV master offset r*L/(2P), slave offset L - (r+1)*L/(2P).
    L, P = 16, 4
    for r in range(P):
        layers = [i for i in range(L) if layer_to_rank_chunk(i, L, P, num_chunks=2, placement="v") == (r, 1)]
        assert layers[0] == L - (r + 1) * L // (2 * P)
        master = [i for i in range(L) if layer_to_rank_chunk(i, L, P, num_chunks=2, placement="v") == (r, 0)]
        assert master[0] == r * L // (2 * P)
    # Unaligned table with zero entries (FEATURES.md 3), noop layers (FEATURES.md 38).
    part = partition_layers(6, 4, layers_per_stage=[0, 3, 3, 0], noop_layers=[5])
    assert part.stage_layers == ((), (0, 1, 2), (3, 4, 5), ())
    assert part.real_layers(2) == (3, 4)


def test_partition_errors():
    with pytest.raises(ValueError, match="not divisible by num_stages=4"):
        partition_layers(6, 4)
    with pytest.raises(ValueError, match="summing to num_layers=6"):
        partition_layers(6, 2, layers_per_stage=[3, 2])
    with pytest.raises(ValueError, match=r"layers_per_stage\[1\]=-1"):
        partition_layers(2, 2, layers_per_stage=[3, -1])
    with pytest.raises(ValueError, match="noop_layers"):
        partition_layers(4, 2, noop_layers=[4])
    with pytest.raises(ValueError, match="outside"):
        layer_to_rank_chunk(8, 8, 2)
    with pytest.raises(ValueError, match="placement"):
        layer_to_rank_chunk(0, 8, 2, placement="zigzag")
    with pytest.raises(ValueError, match="multiple of num_ranks"):
        stage_to_rank(5, 2)
