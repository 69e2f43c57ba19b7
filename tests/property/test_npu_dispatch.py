"""Dispatch routing: torch_npu's kernel when importable, else the reference.

These tests only check the ROUTING. The module injected as ``torch_npu`` below is a TEST
STAND-IN that records its calls; it is not torch_npu and computes nothing real. No NPU result is
produced or claimed anywhere in this file.
"""
import sys
import types

import pytest
import torch

import shardfn.npu as npu
from shardfn.npu import hccl


def _make_torch_npu_stand_in(device_present=True):
    """A fake ``torch_npu`` module (TEST STAND-IN) whose ops record (name, args, kwargs)."""
    stand_in = types.ModuleType("torch_npu")
    stand_in.__doc__ = "TEST STAND-IN for torch_npu: records calls, computes nothing."
    stand_in.calls = []
    stand_in.npu = types.SimpleNamespace(is_available=lambda: device_present)

    def recorder(name):
        def op(*args, **kwargs):
            stand_in.calls.append((name, args, kwargs))
            return f"stand-in:{name}"
        return op

    for name in ("npu_fusion_attention", "npu_fusion_attention_grad", "npu_rms_norm", "npu_rms_norm_backward",
                 "npu_swiglu", "npu_rotary_mul", "npu_rotary_position_embedding"):
        setattr(stand_in, name, recorder(name))

    class Options:  # stand-in for torch_npu._C._distributed_c10d.ProcessGroupHCCL.Options
        hccl_config = None

    stand_in._C = types.SimpleNamespace(_distributed_c10d=types.SimpleNamespace(
        ProcessGroupHCCL=types.SimpleNamespace(Options=Options)))
    return stand_in


@pytest.fixture
def stand_in(monkeypatch):
    module = _make_torch_npu_stand_in()
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    return module


def test_without_torch_npu_everything_routes_to_the_reference():
    assert "torch_npu" not in sys.modules
    assert not npu.is_available()
    assert npu.native_op(npu.npu_rms_norm.native_sources) is None
    x, g = torch.randn(2, 4), torch.randn(4)
    y, rstd = npu.npu_rms_norm(x, g, epsilon=1e-5)
    y_ref, rstd_ref = npu.npu_rms_norm.reference(x, g, epsilon=1e-5)
    assert torch.equal(y, y_ref) and torch.equal(rstd, rstd_ref)


def test_with_the_stand_in_calls_route_with_the_same_arguments(stand_in):
    assert npu.is_available()
    q = torch.randn(1, 2, 3, 4)
    mask = npu.causal_mask_2048()
    out = npu.npu_fusion_attention(q, q, q, 2, "BNSD", atten_mask=mask, scale=0.5, sparse_mode=2)
    assert out == "stand-in:npu_fusion_attention"
    name, args, kwargs = stand_in.calls[-1]
    assert name == "npu_fusion_attention" and args[3:] == (2, "BNSD") and args[0] is q
    assert kwargs == {"atten_mask": mask, "scale": 0.5, "sparse_mode": 2}
    x = torch.randn(2, 4)
    assert npu.npu_swiglu(x, dim=-1) == "stand-in:npu_swiglu"
    assert stand_in.calls[-1][1] == (x,) and stand_in.calls[-1][2] == {"dim": -1}
    assert npu.npu_rotary_position_embedding(q, q, q, 1) == "stand-in:npu_rotary_position_embedding"
    assert stand_in.calls[-1][1][3] == 1


def test_mindspeed_only_kernels_fall_back_without_mindspeed(stand_in):
    """matmul_add lives in mindspeed.ops, not torch_npu: absent here, so the reference runs."""
    x, go, grad = torch.randn(3, 2), torch.randn(3, 5), torch.zeros(5, 2)
    npu.npu_matmul_add_fp32(x, go, grad)
    torch.testing.assert_close(grad, go.t() @ x)
    assert not stand_in.calls


def test_mindspeed_stand_in_is_found(stand_in, monkeypatch):
    ops = types.ModuleType("mindspeed.ops.npu_matmul_add")
    seen = []
    ops.npu_matmul_add_fp32 = lambda *a: seen.append(a)
    monkeypatch.setitem(sys.modules, "mindspeed.ops.npu_matmul_add", ops)
    x, go, grad = torch.randn(3, 2), torch.randn(3, 5), torch.zeros(5, 2)
    npu.npu_matmul_add_fp32(x, go, grad)
    assert seen == [(x, go, grad)] and torch.equal(grad, torch.zeros(5, 2))


def test_stand_in_without_a_device_routes_to_the_reference(monkeypatch):
    module = _make_torch_npu_stand_in(device_present=False)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    assert not npu.is_available()
    x = torch.randn(2, 6)
    assert torch.equal(npu.npu_swiglu(x), npu.npu_swiglu.reference(x))
    assert not module.calls


def test_npu_mesh_group_options_go_through_the_stand_in(stand_in):
    assert npu.default_device_type() == "npu" and npu.dist_backend("npu") == "hccl"
    opts = npu.HcclOptions.from_string("tp:300;dp_cp:64")
    built = hccl.mesh_group_options(["tp", ("dp", "cp"), "pp"], opts, device_type="npu")
    assert sorted(built) == ["dp_cp", "tp"]
    assert built["tp"].hccl_config == {"hccl_buffer_size": 300}
    assert built["dp_cp"].hccl_config == {"hccl_buffer_size": 64}
