"""HCCL settings as data: per-group buffer sizes and "replace gloo" (FEATURES.md 41, 42).

:class:`HcclOptions` is a frozen record. The mesh constructor (``shardfn.make_mesh``) hands it,
with the mesh's axis groups and device type, to :func:`mesh_group_options`, which returns the
process-group options to create each group with: ``ProcessGroupHCCL.Options`` carrying
``hccl_config = {"hccl_buffer_size": MB}`` on an NPU mesh, nothing elsewhere. On a non-NPU mesh
non-default settings are accepted and ignored with one log line per mesh. :func:`uses_gloo_side_groups`
says whether gloo side groups should be created (not on an npu mesh with ``replace_gloo``: object
gathers then run over the device group).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from shardfn.npu._dispatch import is_available, torch_npu_module

__all__ = [
    "HcclOptions",
    "group_key",
    "group_options",
    "mesh_group_options",
    "uses_gloo_side_groups",
    "default_device_type",
    "dist_backend",
    "adaptive_group_buffer_mb",
]

_log = logging.getLogger(__name__)

def _to_pairs(value: Mapping[str, int] | Iterable[tuple[str, int]] | None) -> tuple[tuple[str, int], ...]:
    items = value.items() if isinstance(value, Mapping) else (value or ())
    pairs = tuple(sorted((str(k), int(v)) for k, v in items))
    bad = [f"{k}={v}" for k, v in pairs if v <= 0]
    if bad:
        raise ValueError(f"HcclOptions: group buffer sizes must be positive MB, got {', '.join(bad)}.")
    return pairs


@attrs.frozen(repr=False)
class HcclOptions:
    """HCCL communicator settings, per group.

    Attributes:
        group_buffer_mb: group name -> HCCL buffer size in MB (a mapping or pairs). A group name
            is a mesh axis name, or axis names joined by ``_`` for a group over several axes
            (``("dp", "cp") -> "dp_cp"``), so MindSpeed's names (dp, tp, cp, pp, exp, dp_cp,
            ...) apply to meshes whose axes carry them; groups not listed keep HCCL's default
            (200 MB).
        replace_gloo: create no gloo side groups on npu meshes; object gathers use the device group.
        slice_size: elements per slice of those device-group object gathers.
    """

    group_buffer_mb: tuple[tuple[str, int], ...] = attrs.field(default=(), converter=_to_pairs)
    replace_gloo: bool = False
    slice_size: int = 10 * 2**20

    @classmethod
    def from_string(cls, spec: str, **kwargs: Any) -> "HcclOptions":
        """Parse MindSpeed's ``--hccl-group-buffer`` form, e.g. ``"dp:200;tp:300;exp:400"``."""
        pairs = []
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            name, sep, mb = part.partition(":")
            if not sep or not name.strip() or not mb.strip().isdigit():
                raise ValueError(f"HcclOptions.from_string: {part!r} in {spec!r} is not 'group:MB' "
                                 "(e.g. 'dp:200;tp:300').")
            pairs.append((name.strip(), int(mb)))
        return cls(group_buffer_mb=pairs, **kwargs)

    def buffer_mb(self, axis_name: str | tuple[str, ...]) -> int | None:
        """The buffer size for a group over ``axis_name``, or None for HCCL's default."""
        return dict(self.group_buffer_mb).get(group_key(axis_name))

    @property
    def is_default(self) -> bool:
        return not self.group_buffer_mb and not self.replace_gloo

    def __repr__(self) -> str:
        parts = [f"{k}={v}MB" for k, v in self.group_buffer_mb]
        if self.replace_gloo:
            parts.append("replace_gloo")
        return f"HcclOptions({', '.join(parts)})"


def group_key(axis_name: str | tuple[str, ...]) -> str:
    """The HCCL group name of a mesh axis or tuple of axes: ``("dp", "cp") -> "dp_cp"``."""
    return axis_name if isinstance(axis_name, str) else "_".join(axis_name)


def default_device_type() -> str | None:
    """``"npu"`` when torch_npu reports a device (meshes then use HCCL), else None."""
    return "npu" if is_available() else None


def dist_backend(device_type: str) -> str:
    """The torch.distributed backend for a device type: npu -> hccl, cuda -> nccl, else gloo."""
    return {"npu": "hccl", "cuda": "nccl"}.get(device_type, "gloo")


def group_options(axis_name: str | tuple[str, ...], options: HcclOptions, *, device_type: str) -> Any | None:
    """Process-group options for one group, or None when there is nothing to set.

    Returns:
        On an npu mesh with a buffer size for this group, a ``ProcessGroupHCCL.Options`` with
        ``hccl_config = {"hccl_buffer_size": MB}``; otherwise None.
    """
    mb = options.buffer_mb(axis_name)
    if device_type != "npu" or mb is None:
        return None
    torch_npu = torch_npu_module()
    if torch_npu is None:
        raise RuntimeError(f"group_options: device_type='npu' but torch_npu is not importable; install "
                           f"torch_npu or build the mesh with another device type (group {group_key(axis_name)!r}).")
    pg_options = torch_npu._C._distributed_c10d.ProcessGroupHCCL.Options()
    pg_options.hccl_config = {"hccl_buffer_size": mb}
    return pg_options


def mesh_group_options(axis_names: Iterable[str | tuple[str, ...]], options: HcclOptions | None, *,
                       device_type: str | None) -> dict[str, Any]:
    """Options for every group of a mesh; for the core's ``make_mesh`` to call once per mesh.

    Args:
        axis_names: the groups the mesh creates (axis names, or tuples for multi-axis groups).
        options: the HCCL settings, or None.
        device_type: the mesh's device type ("npu", "cuda", "cpu", ...).

    Returns:
        ``{group_key: pg_options}`` for the groups that get options (empty off NPU). On a
        non-npu mesh with non-default options, logs one INFO line saying they are ignored.
        For single mesh axes the dict is what ``torch.distributed.device_mesh.init_device_mesh``
        takes as ``backend_override`` (axis name -> options).

    Example:
        >>> overrides = mesh_group_options(("dp", "tp"), HcclOptions.from_string("tp:300"),
        ...                                device_type=device_type)
        >>> init_device_mesh(device_type, (2, 4), mesh_dim_names=("dp", "tp"),
        ...                  backend_override=overrides or None)
    """
    if options is None or options.is_default:
        return {}
    groups = list(axis_names)
    if device_type != "npu":
        _log.info("shardfn.npu.hccl: %r ignored on a %r mesh (backend %s); HCCL buffer sizes and replace_gloo "
                  "apply only to npu meshes.", options, device_type, dist_backend(device_type or "cpu"))
        return {}
    built = {group_key(g): group_options(g, options, device_type=device_type) for g in groups}
    return {k: v for k, v in built.items() if v is not None}


def uses_gloo_side_groups(options: HcclOptions | None, *, device_type: str | None) -> bool:
    """Whether gloo side groups are created: always, except on npu meshes with ``replace_gloo``."""
    return not (device_type == "npu" and options is not None and options.replace_gloo)


def _mb(num_elements: float) -> int:
    # bf16 bytes, rounded up to whole MB (MindSpeed's adaptive rule).
    return 2 * math.ceil(num_elements / 2**20)


def adaptive_group_buffer_mb(*, seq_length: int, micro_batch_size: int, hidden_size: int, tensor_parallel: int = 1,
                             context_parallel: int = 1, sequence_parallel: bool = True,
                             num_attention_heads: int | None = None, num_query_groups: int | None = None,
                             moe_router_topk: int | None = None, ep_buffer_factor: float = 0.0,
                             alltoall_seq_dispatcher: bool = False) -> dict[str, int]:
    """Buffer sizes from the largest message each group carries (``--hccl-group-buffer-adaptive``).

    Sizes in MB of bf16 payloads (``2 * ceil(elements / 2^20)``), with ``s, b, h, t, c`` the
    sequence, micro-batch, hidden, TP and CP sizes: tp ``s/c*b*h`` (doubled without SP: an
    all-reduce); pp ``s/c/t*b*h`` with SP (``s/c*b*h`` without); cp_ulysses ``s/c*b*h/t``;
    cp2 one ring KV block ``s/c*b*(h/n*g)/t`` and cp twice that; exp ``s/c/t*b*h*topk`` when
    ``ep_buffer_factor > 0`` else 200; mp, mp_exp, tp_cp 10; dp, dp_cp 200.

    Returns:
        group name -> MB, ready for ``HcclOptions(group_buffer_mb=...)``.
    """
    s, b, h, t, c = seq_length, micro_batch_size, hidden_size, tensor_parallel, context_parallel
    sizes = {"dp": 200, "dp_cp": 200, "mp": 10, "mp_exp": 10, "tp_cp": 10}
    tp = _mb(s / c * b * h) * (1 if sequence_parallel else 2)
    if alltoall_seq_dispatcher and moe_router_topk:
        tp = max(tp, _mb(ep_buffer_factor * s / c / t * b * h * moe_router_topk))
    sizes["tp"] = tp
    sizes["pp"] = _mb(s / c / t * b * h) if sequence_parallel else _mb(s / c * b * h)
    sizes["cp_ulysses"] = _mb(s / c * b * h / t)
    n = num_attention_heads or 1
    g = num_query_groups or n
    sizes["cp2"] = _mb(s / c * b * (h / n * g) / t)
    sizes["cp"] = 2 * sizes["cp2"]
    if moe_router_topk:
        sizes["exp"] = _mb(s / c / t * b * h * moe_router_topk) if ep_buffer_factor > 0 else 200
    return sizes
