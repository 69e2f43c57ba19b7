"""Uneven (tensor_split-sized) collectives: exact data movement on arange inputs and the dot-product
transpose test <AG(x), y> = <x, RS(y)> summed over devices, both computed without autograd."""
import torch
from hypothesis import given
from hypothesis import strategies as st

from shardfn import P, shard_map
from shardfn.primitives.uneven import (
    block_range,
    pad_blocks,
    split_offsets,
    split_sizes,
    trim_block,
    uneven_all_gather,
    uneven_psum_scatter,
    unpad_blocks,
)
from shardfn.testing import cached_mesh


@given(tp=st.sampled_from([2, 3, 4]), total=st.integers(1, 11), width=st.integers(1, 3))
def test_uneven_all_gather_moves_blocks_exactly(tp, total, width):
    mesh = cached_mesh((tp,), ("tp",))
    x = torch.arange(total * width, dtype=torch.float64).reshape(total, width)

    def local(xp):
        mine = trim_block(xp, total, "tp", dim=0)  # this device's tensor_split block
        offset, size = block_range(total, "tp")
        assert mine.shape[0] == size
        full = uneven_all_gather(mine, "tp", dim=0, total=total, invariant=True)
        mine_sum = uneven_psum_scatter(full, "tp", dim=0)  # [size, width] -> pad to a common block
        return full, torch.nn.functional.pad(mine_sum, (0, 0, 0, -(-total // tp) - size))[None]

    full, scattered = shard_map(local, mesh=mesh, in_specs=P("tp"), out_specs=(P(), P("tp")))(pad_blocks(x, tp))
    assert torch.equal(full, x)
    sizes = split_sizes(total, tp)
    blocks = [scattered[r, : sizes[r]] for r in range(tp)]
    assert torch.equal(torch.cat(blocks), tp * x)  # every device summed the same full value
    assert split_offsets(total, tp) == tuple(sum(sizes[:r]) for r in range(tp))
    assert torch.equal(unpad_blocks(pad_blocks(x, tp), total, tp), x)


@given(tp=st.sampled_from([2, 3, 4]), total=st.integers(1, 9), seed=st.integers(0, 99))
def test_uneven_gather_and_scatter_are_transposes(tp, total, seed):
    mesh = cached_mesh((tp,), ("tp",))
    gen = torch.Generator().manual_seed(seed)
    width = -(-total // tp)
    xs = torch.randn(tp * width, 2, generator=gen, dtype=torch.float64)   # per-device x (padded blocks)
    ys = torch.randn(tp, total, 2, generator=gen, dtype=torch.float64)    # per-device y, full length

    def local(xp, y):
        x = trim_block(xp, total, "tp", dim=0)
        lhs = (uneven_all_gather(x, "tp", dim=0, total=total) * y[0]).sum()
        rhs = (x * uneven_psum_scatter(y[0], "tp", dim=0)).sum()
        return torch.stack([lhs, rhs])[None]

    out = shard_map(local, mesh=mesh, in_specs=(P("tp"), P("tp")), out_specs=P("tp"), check_vma=False)(xs, ys)
    lhs, rhs = out.sum(0)
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
