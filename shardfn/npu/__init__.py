"""shardfn.npu: torch_npu's fused ops and HCCL settings, with portable references.

When ``torch_npu`` is importable and reports a device, every op here calls its fused kernel
with the same arguments (one dispatch point: :func:`native_op`); otherwise it runs a plain-torch
reference with the same signature and semantics, so NPU-style code runs on CPU and CUDA. This is
the only package in shardfn that imports torch_npu, and it does so lazily.

- attention: ``npu_fusion_attention`` / ``_grad`` (V1), ``npu_fusion_attention_v2`` / ``_grad_v2``
  (ALiBi ``pse_type``), ``npu_ring_attention_update``, ``causal_mask_2048``, ``alibi_slopes``;
- kernels: ``npu_rms_norm`` (+ ``_backward``), ``npu_swiglu``, ``npu_rotary_mul``,
  ``npu_rotary_position_embedding``, ``npu_matmul_add_fp32``, ``npu_apply_fused_ema_adamw``;
- MC2 (inside ``shard_map``, a mesh axis instead of an HCCL group; reference only):
  ``npu_all_gather_base_mm``, ``npu_mm_reduce_scatter_base``, ``npu_mm_all_reduce_base``;
- settings: ``deterministic``, ``HcclOptions`` and the mesh hook ``mesh_group_options``;
- replace gloo (object and CPU-tensor gathers over the device group, sliced): ``all_gather_object``,
  ``gather_object``, ``scatter_object``, ``broadcast_object``, ``sliced_all_gather``,
  ``sliced_gather``, ``sliced_scatter``, ``device_group``.
"""
from shardfn.npu._dispatch import is_available, native_op, npu_op, torch_npu_module
from shardfn.npu._fa_layout import alibi_slopes, causal_mask_2048
from shardfn.npu.attention import (
    npu_fusion_attention,
    npu_fusion_attention_grad,
    npu_fusion_attention_grad_v2,
    npu_fusion_attention_v2,
)
from shardfn.npu.determinism import deterministic, is_deterministic
from shardfn.npu.hccl import (
    HcclOptions,
    adaptive_group_buffer_mb,
    default_device_type,
    dist_backend,
    group_options,
    mesh_group_options,
    uses_gloo_side_groups,
)
from shardfn.npu.mesh import make_npu_mesh
from shardfn.npu.mc2 import npu_all_gather_base_mm, npu_mm_all_reduce_base, npu_mm_reduce_scatter_base
from shardfn.npu.replace_gloo import (
    all_gather_object,
    broadcast_object,
    device_group,
    gather_object,
    scatter_object,
    sliced_all_gather,
    sliced_gather,
    sliced_scatter,
)
from shardfn.npu.ring_update import npu_ring_attention_update
from shardfn.npu.kernels import (
    npu_apply_fused_ema_adamw,
    npu_matmul_add_fp32,
    npu_rms_norm,
    npu_rms_norm_backward,
    npu_rotary_mul,
    npu_rotary_position_embedding,
    npu_swiglu,
)

__all__ = [
    "is_available",
    "native_op",
    "npu_op",
    "torch_npu_module",
    "alibi_slopes",
    "causal_mask_2048",
    "npu_fusion_attention",
    "npu_fusion_attention_grad",
    "npu_fusion_attention_v2",
    "npu_fusion_attention_grad_v2",
    "npu_ring_attention_update",
    "npu_all_gather_base_mm",
    "npu_mm_reduce_scatter_base",
    "npu_mm_all_reduce_base",
    "deterministic",
    "is_deterministic",
    "HcclOptions",
    "adaptive_group_buffer_mb",
    "default_device_type",
    "dist_backend",
    "group_options",
    "mesh_group_options",
    "make_npu_mesh",
    "uses_gloo_side_groups",
    "all_gather_object",
    "broadcast_object",
    "device_group",
    "gather_object",
    "scatter_object",
    "sliced_all_gather",
    "sliced_gather",
    "sliced_scatter",
    "npu_apply_fused_ema_adamw",
    "npu_matmul_add_fp32",
    "npu_rms_norm",
    "npu_rms_norm_backward",
    "npu_rotary_mul",
    "npu_rotary_position_embedding",
    "npu_swiglu",
]
