"""One deterministic-mode switch that maps to each backend (FEATURES.md 45).

``deterministic(True)`` turns on ``torch.use_deterministic_algorithms``; on an NPU host it also
sets ``HCCL_DETERMINISTIC`` (fixed collective reduction order) and ``CLOSE_MATMUL_K_SHIFT``
(no K-axis split in matmul), and on CUDA ``CUBLAS_WORKSPACE_CONFIG`` (which cuBLAS needs for
reproducible GEMMs). Used as a plain call it stays in force; used as a context manager it puts
every setting back on exit. Those environment variables are written because the vendor runtimes
read them; shardfn itself never branches on them.
"""
from __future__ import annotations

import os

import torch

from shardfn.npu._dispatch import is_available

__all__ = ["deterministic", "is_deterministic"]

_NPU_ENV = {"HCCL_DETERMINISTIC": "true", "CLOSE_MATMUL_K_SHIFT": "1"}
_CUDA_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def is_deterministic() -> bool:
    """Say whether deterministic algorithms are on (``torch.are_deterministic_algorithms_enabled``)."""
    return torch.are_deterministic_algorithms_enabled()


class deterministic:  # noqa: N801 - used like torch.set_grad_enabled: a call or a with-block
    """Switch deterministic mode on or off; as a context manager, restore the old mode on exit.

    Args:
        enabled: True for bitwise-reproducible runs, False to allow faster nondeterministic kernels.
        seed: if given, ``torch.manual_seed(seed)`` (which seeds every device, NPU included).
        warn_only: passed to ``torch.use_deterministic_algorithms``: warn instead of raising on an
            op with no deterministic implementation.

    Example:
        >>> with deterministic(True, seed=0):
        ...     loss = train_step(params, batch)   # two such runs are bitwise equal
        >>> deterministic(True)                     # or switch on for the rest of the program
    """

    def __init__(self, enabled: bool = True, *, seed: int | None = None, warn_only: bool = False):
        if not isinstance(enabled, bool):
            raise TypeError(f"deterministic: enabled must be a bool, got {type(enabled).__name__}.")
        env = dict(_NPU_ENV) if is_available() else {}
        if torch.cuda.is_available():
            env.update(_CUDA_ENV)
        self._saved_flags = (torch.are_deterministic_algorithms_enabled(),
                             torch.is_deterministic_algorithms_warn_only_enabled())
        self._saved_env = {name: os.environ.get(name) for name in env}
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        for name, value in env.items():
            if enabled:
                os.environ[name] = value
            else:
                os.environ.pop(name, None)
        if seed is not None:
            torch.manual_seed(seed)

    def __enter__(self) -> "deterministic":
        return self

    def __exit__(self, *exc_info) -> None:
        enabled, warn_only = self._saved_flags
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def __repr__(self) -> str:
        return f"deterministic({torch.are_deterministic_algorithms_enabled()})"
