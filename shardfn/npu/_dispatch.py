"""The single dispatch point between torch_npu's fused kernels and the portable references.

Every public op in ``shardfn.npu`` is a reference implementation wrapped by :func:`npu_op`.
At call time the wrapper asks :func:`native_op` for the kernel: when ``torch_npu`` is importable
and reports a usable device, the kernel named in the op's source list is called with the exact
same arguments; otherwise the reference runs. torch_npu is imported lazily, here and nowhere else
in shardfn.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["is_available", "torch_npu_module", "native_op", "npu_op"]

_TORCH_NPU = "torch_npu"


@functools.lru_cache(maxsize=None)
def _torch_npu_installed() -> bool:
    # A failed import is not cached by Python and searching sys.path costs ~0.1 ms per op call,
    # so whether the package exists at all is looked up once. An already imported (or injected)
    # module is always found first through sys.modules, never through this cache.
    return importlib.util.find_spec(_TORCH_NPU) is not None


def torch_npu_module() -> ModuleType | None:
    """Return the ``torch_npu`` module if it can be imported, else None (imports it lazily).

    Returns:
        The module, or None when torch_npu is not installed or fails to import.
    """
    module = sys.modules.get(_TORCH_NPU)
    if module is not None:
        return module
    if not _torch_npu_installed():
        return None
    try:
        return importlib.import_module(_TORCH_NPU)
    except ImportError:
        return None


def is_available() -> bool:
    """Say whether torch_npu is importable and reports at least one usable NPU.

    Returns:
        True when ``torch_npu`` imports and ``torch_npu.npu.is_available()`` is true. On this
        machine class (CPU, or CUDA without Ascend) it is False and every op in ``shardfn.npu``
        runs its portable reference.
    """
    module = torch_npu_module()
    if module is None:
        return False
    npu = getattr(module, "npu", None)
    probe = getattr(npu, "is_available", None)
    return bool(probe()) if callable(probe) else False


def _resolve(source: tuple[str, str]) -> Callable[..., Any] | None:
    module_name, attr = source
    if module_name == _TORCH_NPU:
        module = torch_npu_module()
    else:
        module = sys.modules.get(module_name)
        if module is None:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                return None
    fn = getattr(module, attr, None) if module is not None else None
    return fn if callable(fn) else None


def native_op(sources: tuple[tuple[str, str], ...]) -> Callable[..., Any] | None:
    """Find the fused kernel for an op, or None when the reference must run.

    Args:
        sources: ``(module, attribute)`` pairs tried in order, e.g.
            ``(("torch_npu", "npu_rms_norm"),)``; MindSpeed-only kernels name their
            ``mindspeed.ops`` module. A dispatched op keeps its pairs as ``op.native_sources``.

    Returns:
        The first callable found when :func:`is_available` is true, else None.
    """
    if not is_available():
        return None
    for source in sources:
        fn = _resolve(source)
        if fn is not None:
            return fn
    return None


def npu_op(*sources: tuple[str, str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a reference so that calls go to torch_npu's kernel when it is available.

    The wrapper forwards ``*args, **kwargs`` unchanged, so the reference must have the kernel's
    exact signature. The reference stays reachable as ``op.reference`` (tests and CPU fallbacks
    call it directly) and the kernel sources as ``op.native_sources``.

    Args:
        *sources: ``(module, attribute)`` pairs, tried in order.

    Returns:
        A decorator turning a reference function into the dispatching op.
    """

    def wrap(reference: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(reference)
        def op(*args: Any, **kwargs: Any) -> Any:
            native = native_op(sources)
            if native is not None:
                return native(*args, **kwargs)
            return reference(*args, **kwargs)

        op.reference = reference  # type: ignore[attr-defined]
        op.native_sources = sources  # type: ignore[attr-defined]
        return op

    return wrap
