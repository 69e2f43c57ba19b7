"""Bad input gets a clear error (STYLE.md): the API, the argument with its path, the values, a fix."""
from __future__ import annotations

import pytest
import torch

import shardfn
from shardfn import P, make_mesh, psum, shard_map
from shardfn.testing import cached_mesh


def _mesh():
    return cached_mesh((2, 2), ("a", "b"))


def _call(in_specs, *args, out_specs=P(), f=lambda *a: a[0].sum() * 0):
    return shard_map(f, mesh=_mesh(), in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


def test_unknown_axis_in_spec():
    with pytest.raises(ValueError) as err:
        _call((P("z"),), torch.ones(4))
    msg = str(err.value)
    assert "in_specs[0]" in msg and "'z'" in msg and "('a', 'b')" in msg


def test_axis_used_twice_in_a_spec():
    with pytest.raises(ValueError) as err:
        _call((P("a", "a"),), torch.ones(4, 4))
    assert "more than once" in str(err.value) and "'a'" in str(err.value)
    with pytest.raises(ValueError, match="more than once"):
        _call((P(("a", "b"), "b"),), torch.ones(4, 4))


def test_spec_longer_than_rank():
    with pytest.raises(ValueError) as err:
        _call((P("a", None, None),), torch.ones(4, 4))
    msg = str(err.value)
    assert "3 entries" in msg and "rank 2" in msg and "(4, 4)" in msg


def test_dim_not_divisible():
    with pytest.raises(ValueError) as err:
        _call((P(None, ("a", "b")),), torch.ones(2, 6))
    msg = str(err.value)
    assert "dim 1" in msg and "6" in msg and "not divisible by 4" in msg


def test_every_bad_leaf_is_listed():
    with pytest.raises(ValueError) as err:
        _call(({"x": P("z"), "y": P("a")},), {"x": torch.ones(4), "y": torch.ones(3)}, f=lambda d: d["x"].sum() * 0)
    msg = str(err.value)
    assert "in_specs[0]['x']" in msg and "in_specs[0]['y']" in msg


def test_in_specs_not_a_prefix_of_the_arguments():
    with pytest.raises(ValueError) as err:
        _call((P(), P()), torch.ones(4))
    assert "in_specs" in str(err.value) and "prefix" in str(err.value)
    with pytest.raises(ValueError, match="in_specs"):
        _call(({"w": P()},), {"v": torch.ones(4)}, f=lambda d: d["v"].sum() * 0)


def test_out_specs_not_a_prefix_of_the_result():
    with pytest.raises(ValueError, match="out_specs"):
        _call(P(), torch.ones(4), out_specs=(P(), P()))


def test_non_p_spec_leaves():
    with pytest.raises(TypeError) as err:
        _call(("a",), torch.ones(4))
    assert "in_specs[0] = 'a'" in str(err.value) and "P(" in str(err.value)
    with pytest.raises(TypeError, match="out_specs"):
        _call(P(), torch.ones(4), out_specs=["a"])


def test_split_non_tensor_leaf():
    with pytest.raises(ValueError) as err:
        _call((P(), P("a")), torch.ones(4), 3)
    assert "in_specs[1]" in str(err.value) and "non-tensor" in str(err.value)


def test_bad_p_entries_and_missing_mesh():
    with pytest.raises(TypeError, match="P:"):
        P(0)
    with pytest.raises(ValueError, match="no mesh"):
        shard_map(lambda x: x, in_specs=P(), out_specs=P())(torch.ones(2))
    with pytest.raises(TypeError, match="callable"):
        shard_map(3, mesh=_mesh(), in_specs=P(), out_specs=P())


def test_with_mesh_sets_the_current_mesh():
    mesh = _mesh()
    with mesh:
        assert shardfn.current_mesh() is mesh
        y = shard_map(lambda x: psum(x, ("a", "b")), in_specs=P(("a", "b")), out_specs=P())(torch.arange(4.0))
    assert shardfn.current_mesh() is None
    assert y.item() == 6.0


@pytest.mark.parametrize(
    "call",
    [
        lambda: shardfn.psum(torch.ones(1), "a"),
        lambda: shardfn.pmean(torch.ones(1), "a"),
        lambda: shardfn.pmax(torch.ones(1), "a"),
        lambda: shardfn.pmin(torch.ones(1), "a"),
        lambda: shardfn.pvary(torch.ones(1), "a"),
        lambda: shardfn.all_gather(torch.ones(1), "a"),
        lambda: shardfn.all_gather_invariant(torch.ones(1), "a"),
        lambda: shardfn.psum_scatter(torch.ones(2), "a"),
        lambda: shardfn.all_to_all(torch.ones(2), "a", 0, 0),
        lambda: shardfn.ppermute(torch.ones(1), "a", [(0, 1)]),
        lambda: shardfn.axis_index("a"),
        lambda: shardfn.axis_size("a"),
    ],
)
def test_collective_outside_shard_map(call):
    with pytest.raises(RuntimeError, match="only inside a function mapped by shard_map"):
        call()


def _inside(f):
    return shard_map(f, mesh=_mesh(), in_specs=P(("a", "b")), out_specs=P(("a", "b")))(torch.ones(8))


def test_unknown_axis_in_a_collective():
    with pytest.raises(ValueError) as err:
        _inside(lambda x: psum(x, "z"))
    assert "psum" in str(err.value) and "'z'" in str(err.value) and "('a', 'b')" in str(err.value)
    with pytest.raises(TypeError, match="axis_name"):
        _inside(lambda x: psum(x, 0))
    with pytest.raises(ValueError, match="repeats"):
        _inside(lambda x: psum(x, ("a", "a")))


@pytest.mark.parametrize(
    "perm, error, words",
    [
        ([(0, 4)], ValueError, "outside the axis size 4"),
        ([(-1, 0)], ValueError, "outside"),
        ([(0, 1), (0, 2)], ValueError, "repeats a source"),
        ([(0, 1), (2, 1)], ValueError, "repeats a source or a destination"),
        ([0, 1], TypeError, "pairs"),
    ],
)
def test_bad_ppermute_perms(perm, error, words):
    with pytest.raises(error, match=words):
        _inside(lambda x: shardfn.ppermute(x, ("a", "b"), perm))


def test_bad_collective_dims():
    with pytest.raises(ValueError, match="not divisible"):
        _inside(lambda x: shardfn.psum_scatter(torch.ones(3), ("a", "b"), tiled=True).expand(2))
    with pytest.raises(ValueError, match="tiled=False"):
        _inside(lambda x: shardfn.psum_scatter(torch.ones(3), "a").expand(2))
    with pytest.raises(ValueError, match="split_dim"):
        _inside(lambda x: shardfn.all_to_all(torch.ones(3, 2), "a", 0, 1, tiled=True)[0])
    with pytest.raises(ValueError, match="out of range"):
        _inside(lambda x: shardfn.all_gather(x, "a", dim=2))


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="different lengths"):
        make_mesh((2, 2), ("a",), backend="sim")
    with pytest.raises(ValueError, match="positive ints"):
        make_mesh((0,), ("a",), backend="sim")
    with pytest.raises(TypeError, match="non-empty strings"):
        make_mesh((2,), (1,), backend="sim")
    with pytest.raises(ValueError, match="repeat"):
        make_mesh((2, 2), ("a", "a"), backend="sim")
    with pytest.raises(ValueError, match="backend"):
        make_mesh((2,), ("a",), backend="tpu")
    with pytest.raises(ValueError, match="timeout"):
        make_mesh((2,), ("a",), backend="sim", timeout=0)
    if not torch.distributed.is_initialized():
        with pytest.raises(ValueError, match="torchrun"):
            make_mesh((2,), ("a",), backend="dist")


def test_mesh_attributes():
    mesh = make_mesh((2, 3), ("dp", "tp"), backend="sim")
    assert mesh.axis_names == ("dp", "tp") and dict(mesh.shape) == {"dp": 2, "tp": 3}
    assert list(mesh.shape) == ["dp", "tp"] and mesh.size == 6 and mesh.backend == "sim"
    assert mesh.device_type == "cpu"
    with pytest.raises(TypeError):
        mesh.shape["dp"] = 4  # read-only
    assert repr(P("dp", None)) == "P('dp', None)" and P("a") == P(("a",)) and hash(P("a", None)) == hash(P("a", None))


def test_second_backward_through_a_sim_call_is_a_clear_error():
    mesh = _mesh()
    f = shard_map(lambda x: x * 2, mesh=mesh, in_specs=P(("a", "b")), out_specs=P(("a", "b")))
    x = torch.ones(4, requires_grad=True)
    y = f(x).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"retain_graph=True\) twice"):
        y.backward()
    f(x).sum().backward()  # a fresh call is fine
    assert torch.equal(x.grad, torch.full((4,), 4.0))
