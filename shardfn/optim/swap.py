"""Optimizer state in host memory: swap_optimizer (MindSpeed ``--swap-optimizer``) and
virtual_optimizer (``--virtual-optimizer``).

Both wrap an *elementwise* transformation (adamw, sgd, fused_ema_adamw: each element's update
depends only on that element) and apply it leaf by leaf, so the result is bitwise the unwrapped
transformation's. Put global transformations (``clip_by_global_norm``) before them in a chain.

* swap: every state tensor lives on the host between steps. During the step the leaves are
  processed in windows of about ``total_numel // times`` elements: a window's state is copied
  to the compute device, updated, copied back, and its device copy dropped, so device memory for
  optimizer state peaks at one window (about ``state_bytes / times``) and is 0 during forward
  and backward. ``times=0`` is one window with the leaves sorted largest first.
* virtual: state tensors are allocated in host memory while a per-stage byte budget lasts (the
  check is ``remaining > 0`` before each tensor, so the last may overshoot), the rest on the
  device. On Ascend NPU host tensors come from torch_npu's ``empty_with_swapped_memory`` (host
  memory the NPU addresses directly); elsewhere they are plain host tensors, brought to the
  device around each leaf's update (on a CPU-only machine that is a no-op).
"""
from __future__ import annotations

import sys
from typing import Callable, NamedTuple, Optional, Sequence, Union

import attrs
import torch

from shardfn import tree as _tree

from shardfn.optim.base import GradientTransformation, PyTree, apply_updates

__all__ = [
    "SwapState",
    "SwapWindow",
    "VirtualState",
    "plan_virtual",
    "state_nbytes",
    "swap_optimizer",
    "swap_windows",
    "virtual_optimizer",
]


def state_nbytes(tree: PyTree) -> int:
    """Bytes of the distinct storages under ``tree`` (views of one storage count once)."""
    seen: dict[int, int] = {}
    for x in _tree.flatten(tree)[0]:
        if isinstance(x, torch.Tensor):
            s = x.untyped_storage()
            seen[s.data_ptr() if s.nbytes() else id(x)] = s.nbytes()
    return sum(seen.values())


def swap_windows(numels: Sequence[int], times: int) -> list[list[int]]:
    """Group leaf indices into the windows a swap step processes.

    Leaves are taken in order (``times=0``: one window, largest first) and a window closes once
    it holds at least ``max(1, total // times)`` elements.

    Args:
        numels: Element count of each leaf.
        times: Number of windows aimed at (>= 0).

    Returns:
        List of windows, each a list of leaf indices; every leaf appears exactly once.
    """
    if times < 0:
        raise ValueError(f"swap_optimizer: times={times} must be >= 0 (0 = one window, largest first).")
    if times == 0:
        return [sorted(range(len(numels)), key=lambda i: -numels[i])] if numels else []
    chunk = max(1, sum(numels) // times)
    windows, current, filled = [], [], 0
    for i, n in enumerate(numels):
        current.append(i)
        filled += n
        if filled >= chunk:
            windows.append(current)
            current, filled = [], 0
    if current:
        windows.append(current)
    return windows


@attrs.frozen
class SwapWindow:
    """What one window of a swap step moved (given to ``on_window``).

    Attributes:
        index: Window number in this step.
        leaves: Leaf indices (params' flatten order) updated in the window.
        device_bytes: Bytes of optimizer state resident on the compute device during the window.
        h2d_bytes: Bytes copied host -> device.
        d2h_bytes: Bytes copied device -> host.
    """

    index: int
    leaves: tuple[int, ...]
    device_bytes: int
    h2d_bytes: int
    d2h_bytes: int


class SwapState(NamedTuple):
    """State of ``swap_optimizer``: one inner state per param leaf, all on the host device."""

    inner: tuple


def _host_copy(x: torch.Tensor, host: torch.device) -> torch.Tensor:
    pin = host.type == "cpu" and torch.cuda.is_available()
    out = torch.empty(x.shape, dtype=x.dtype, device=host, pin_memory=pin)
    return out.copy_(x)


def _device_copy(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    # A real copy even when host and device coincide (CPU-only), so the windowing is the same
    # code path everywhere and the byte accounting is what a device would see.
    return torch.empty(x.shape, dtype=x.dtype, device=device).copy_(x, non_blocking=True)


def _tensors(tree) -> list[torch.Tensor]:
    return [x for x in _tree.flatten(tree)[0] if isinstance(x, torch.Tensor)]


def swap_optimizer(
    tx: GradientTransformation,
    *,
    times: int = 16,
    host_device: Union[str, torch.device] = "cpu",
    on_window: Optional[Callable[[SwapWindow], None]] = None,
) -> GradientTransformation:
    """Keep ``tx``'s state on the host and bring it to the device in ``times`` windows per step.

    Args:
        tx: Elementwise transformation (adamw, sgd, fused_ema_adamw).
        times: Windows per step (MindSpeed's ``--swap-optimizer-times``; 0 = one window, largest
            leaves first).
        host_device: Where the state lives between steps.
        on_window: Called with a ``SwapWindow`` after each window (byte accounting, tests).

    Returns:
        The wrapping transformation; state ``SwapState`` (per-leaf inner states on the host).
        ``update`` is pure; ``step`` updates params and host state in place.

    Raises:
        ValueError: If ``times < 0``.
    """
    host = torch.device(host_device)
    swap_windows([], times)

    def init(params):
        leaves = _tree.flatten(params)[0]
        # Per leaf, so the init-time peak is one leaf's state, as MindSpeed does it.
        return SwapState(tuple(_tree.tree_map(lambda x: _host_copy(x, host), tx.init(p)) for p in leaves))

    def _run(grads, state, params, *, in_place: bool):
        g_leaves, tdef = _tree.flatten(grads)
        p_leaves = tdef.flatten_up_to(params)
        if len(state.inner) != len(p_leaves):
            raise ValueError(f"swap_optimizer: state has {len(state.inner)} leaf states, params have {len(p_leaves)} leaves.")
        new_inner = list(state.inner)
        out = [None] * len(p_leaves)
        for w, idx in enumerate(swap_windows([p.numel() for p in p_leaves], times)):
            dev_bytes = h2d = d2h = 0
            for i in idx:
                p, g, host_state = p_leaves[i], g_leaves[i], state.inner[i]
                dev_state = _tree.tree_map(lambda x: _device_copy(x, p.device), host_state)
                nb = sum(x.nbytes for x in _tensors(dev_state))
                dev_bytes, h2d = dev_bytes + nb, h2d + nb
                if in_place and tx.step is not None:
                    out[i], dev_state = tx.step(g, dev_state, p)
                else:
                    u, dev_state = tx.update(g, dev_state, p)
                    out[i] = u
                if in_place:
                    for dst, src in zip(_tensors(host_state), _tensors(dev_state)):
                        dst.copy_(src)
                else:
                    new_inner[i] = _tree.tree_map(lambda x: _host_copy(x, host), dev_state)
                d2h += nb
                del dev_state
            if on_window is not None:
                on_window(SwapWindow(w, tuple(idx), dev_bytes, h2d, d2h))
        return _tree.unflatten(tdef, out), SwapState(tuple(new_inner))

    def update(grads, state, params):
        return _run(grads, state, params, in_place=False)

    def step(grads, state, params):
        with torch.no_grad():
            results, state = _run(grads, state, params, in_place=True)
        if tx.step is None:
            results = apply_updates(params, results)
        return results, state

    return GradientTransformation(init, update, step, name=f"swap_optimizer({tx.name}, times={times})")


def plan_virtual(nbytes: Sequence[int], budget_bytes: int) -> list[bool]:
    """Return, for each state tensor in allocation order, whether it goes to host memory.

    Tensors are placed on the host while the remaining budget is > 0 (checked before each
    allocation, so the last host tensor may overshoot the budget), then on the device.
    """
    if budget_bytes < 0:
        raise ValueError(f"virtual_optimizer: budget_bytes={budget_bytes} must be >= 0.")
    remaining, out = budget_bytes, []
    for n in nbytes:
        on_host = remaining > 0
        out.append(on_host)
        if on_host:
            remaining -= n
    return out


class VirtualState(NamedTuple):
    """State of ``virtual_optimizer``: one inner state per param leaf (some tensors on the host)."""

    inner: tuple


def _swapped_alloc(x: torch.Tensor, device: torch.device, host: torch.device) -> torch.Tensor:
    npu = sys.modules.get("torch_npu")  # present only when the user runs on Ascend
    if device.type == "npu" and npu is not None and hasattr(npu, "empty_with_swapped_memory"):
        out = npu.empty_with_swapped_memory(tuple(x.shape), dtype=x.dtype, device=device)
        return out.fill_(1).mul_(x)  # swapped memory takes no direct copy_ (MindSpeed's workaround)
    return _host_copy(x, host)


def virtual_optimizer(
    tx: GradientTransformation,
    *,
    budget_bytes: Union[int, Sequence[int]],
    stage: int = 0,
    host_device: Union[str, torch.device] = "cpu",
) -> GradientTransformation:
    """Allocate ``tx``'s state in host memory while this pipeline stage's budget lasts.

    Args:
        tx: Elementwise transformation.
        budget_bytes: Host-memory budget in bytes: one value for every stage, or one per stage.
        stage: This rank's pipeline stage (indexes ``budget_bytes`` when it is a sequence).
        host_device: Host device for the portable path.

    Returns:
        The wrapping transformation; state ``VirtualState``. Counters (0-d tensors) stay on the
        device; floating state tensors are placed by ``plan_virtual``.

    Raises:
        ValueError: For a negative budget or a stage outside the budget list.
    """
    host = torch.device(host_device)
    if isinstance(budget_bytes, (list, tuple)):
        if not 0 <= stage < len(budget_bytes):
            raise ValueError(
                f"virtual_optimizer: stage={stage} but budget_bytes has {len(budget_bytes)} entries "
                f"({list(budget_bytes)}); give one budget per pipeline stage or a single int."
            )
        budget = int(budget_bytes[stage])
    else:
        budget = int(budget_bytes)
    plan_virtual([], budget)

    def init(params):
        leaves = _tree.flatten(params)[0]
        states = [tx.init(p) for p in leaves]
        movable = []  # (leaf index, position among that state's tensors)
        for i, s in enumerate(states):
            for j, x in enumerate(_tree.flatten(s)[0]):
                if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() > 0:
                    movable.append((i, j, x.nbytes))
        on_host = plan_virtual([n for _, _, n in movable], budget)
        chosen = {(i, j) for (i, j, _), h in zip(movable, on_host) if h}
        placed = []
        for i, s in enumerate(states):
            xs, sdef = _tree.flatten(s)
            dev = leaves[i].device
            xs = [_swapped_alloc(x, dev, host) if (i, j) in chosen else x for j, x in enumerate(xs)]
            placed.append(_tree.unflatten(sdef, xs))
        return VirtualState(tuple(placed))

    def update(grads, state, params):
        g_leaves, tdef = _tree.flatten(grads)
        p_leaves = tdef.flatten_up_to(params)
        ups, new = [], []
        for g, p, s in zip(g_leaves, p_leaves, state.inner):
            xs, sdef = _tree.flatten(s)
            homes = [x.device for x in xs]
            # NPU swapped memory is addressed in place; elsewhere bring host tensors over.
            work = _tree.unflatten(sdef, [x if x.device == p.device or p.device.type == "npu" else x.to(p.device) for x in xs])
            u, work = tx.update(g, work, p)
            ys = [y if y.device == d else y.to(d) for y, d in zip(_tree.flatten(work)[0], homes)]
            ups.append(u)
            new.append(_tree.unflatten(sdef, ys))
        return _tree.unflatten(tdef, ups), VirtualState(tuple(new))

    name = f"virtual_optimizer({tx.name}, budget_bytes={budget_bytes}, stage={stage})"
    return GradientTransformation(init, update, name=name)
