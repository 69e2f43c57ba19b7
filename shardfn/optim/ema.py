"""Fused EMA AdamW (MindSpeed ``fused_ema_adamw``): AdamW and a parameter EMA in one pass.

Per element, at 1-based step t with ``mode`` 1 for AdamW and 0 for Adam (L2), ``bc`` 0 or 1:

    g' = g + wd*(1-mode)*p
    m  = m + (1-b1)*(g' - m)                      (= b1*m + (1-b1)*g')
    v  = b2*v + (1-b2)*g'*g'
    p  = p*(1 - lr*wd*mode) - lr/(1 - bc*b1**t) * m / (sqrt(v)/sqrt(1 - bc*b2**t) + eps)
    s  = s + (1-d)*(p - s),  d = min(ema_decay, (1+t)/(10+t))      (EMA warm-up)

The EMA ``s`` lives in the state in fp32. ``step`` runs the whole update as one pass over
memory: a ``torch.compile``d elementwise kernel over each flat buffer (5 reads, 4 writes:
36 B/param for fp32), or, where compilation is unavailable, ``torch._foreach_*`` ops. The
choice is made once per process (``ema_kernel_backend()`` reports it).
"""
from __future__ import annotations

import functools
import time
from typing import NamedTuple, Optional

import attrs
import torch

from shardfn import tree as _tree

from shardfn.optim.adamw import _check_hparams
from shardfn.optim.base import GradientTransformation, PyTree, ScalarOrSchedule, resolve_lr

__all__ = [
    "EmaAdamState",
    "EmaKernelBackend",
    "ema_decay_at",
    "ema_kernel_backend",
    "ema_params",
    "flatten_params",
    "fused_ema_adamw",
    "swap_ema",
]

_NUM_SCALARS = 9


class EmaAdamState(NamedTuple):
    """State of ``fused_ema_adamw``.

    Attributes:
        count: 0-d int64 tensor, steps taken.
        mu: First moments (fp32), a tree like params.
        nu: Second moments (fp32), a tree like params.
        ema: EMA of the params after each step (fp32), a tree like params.
    """

    count: torch.Tensor
    mu: PyTree
    nu: PyTree
    ema: PyTree


def ema_decay_at(ema_decay: float, step: int) -> float:
    """Return the warm-up EMA decay ``min(ema_decay, (1+step)/(10+step))`` for 1-based ``step``."""
    return min(ema_decay, (1 + step) / (10 + step))


def _math(p, g, m, v, s, c):
    """The elementwise update. ``c`` = [1-b1, b2, 1-b2, wd_l2, 1-lr*wd_dec, step_size, sqrt(bc2), eps, 1-decay]."""
    one_m_b1, b2, one_m_b2, wd_l2, p_scale, step_size, bc2_sqrt, eps, one_m_dec = c.unbind(0)
    g = g + wd_l2 * p
    m = m + one_m_b1 * (g - m)
    v = b2 * v + one_m_b2 * (g * g)
    denom = torch.sqrt(v) / bc2_sqrt + eps
    p = p * p_scale - step_size * (m / denom)
    s = s + one_m_dec * (p - s)
    return p, m, v, s


def _inplace_kernel(p, g, m, v, s, c):
    p2, m2, v2, s2 = _math(p, g, m, v, s, c)
    p.copy_(p2)
    m.copy_(m2)
    v.copy_(v2)
    s.copy_(s2)


@attrs.frozen
class EmaKernelBackend:
    """Which one-pass implementation ``fused_ema_adamw.step`` uses on this process.

    Attributes:
        kind: ``"compiled"`` (torch.compile/inductor kernel) or ``"foreach"``.
        compile_seconds: Wall time of the first compilation (0 for foreach).
        reason: Why foreach was chosen, if it was.
    """

    kind: str
    compile_seconds: float = 0.0
    reason: str = ""
    fn: Optional[object] = attrs.field(default=None, repr=False, eq=False)


@functools.lru_cache(maxsize=None)
def _select_backend(kind: str) -> EmaKernelBackend:
    if kind == "foreach":
        return EmaKernelBackend("foreach", reason="requested")
    if kind == "auto":
        try:
            return _select_backend("compiled")
        except RuntimeError as err:
            return EmaKernelBackend("foreach", reason=str(err.__cause__ or err))
    t0 = time.perf_counter()
    try:
        fn = torch.compile(_inplace_kernel, dynamic=True, fullgraph=True)
        xs = [torch.rand(37) + 0.5 for _ in range(5)]
        ref = [x.clone() for x in xs]
        c = torch.tensor([0.1, 0.999, 0.001, 0.0, 0.999, 1e-3, 0.03, 1e-8, 0.5])
        fn(*xs, c)
        _inplace_kernel(*ref, c)
        if not all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(xs, ref)):
            raise RuntimeError("compiled kernel disagrees with the eager formula")
    except Exception as err:  # compilation needs a C++ toolchain; impl='auto' then uses foreach.
        raise RuntimeError(
            f"fused_ema_adamw: impl='compiled' but torch.compile failed ({type(err).__name__}: {err}). "
            "Use impl='auto' or impl='foreach'."
        ) from err
    return EmaKernelBackend("compiled", compile_seconds=time.perf_counter() - t0, fn=fn)


def ema_kernel_backend(impl: str = "auto") -> EmaKernelBackend:
    """Return (choosing once, then cached) the backend that ``impl`` resolves to.

    Args:
        impl: ``"auto"`` (compile if it works, else foreach), ``"compiled"`` or ``"foreach"``.
    """
    if impl not in ("auto", "compiled", "foreach"):
        raise ValueError(f"fused_ema_adamw: impl={impl!r}; use 'auto', 'compiled' or 'foreach'.")
    return _select_backend(impl)


def _contiguous_base(xs: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """If ``xs`` are consecutive contiguous pieces of one storage (in order), return the 1-d span."""
    if not xs:
        return None
    first = xs[0]
    ptr = first.untyped_storage().data_ptr()
    off = first.storage_offset()
    for x in xs:
        if (
            x.dtype != first.dtype
            or not x.is_contiguous()
            or x.untyped_storage().data_ptr() != ptr
            or x.storage_offset() != off
        ):
            return None
        off += x.numel()
    return first.as_strided((off - first.storage_offset(),), (1,), first.storage_offset())


def flatten_params(params: PyTree, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, PyTree]:
    """Copy params into one new flat buffer and return ``(flat, tree of views into flat)``.

    Leaves laid out like this (and grads likewise) let ``fused_ema_adamw``'s ``step`` run one
    kernel over the whole buffer instead of one per leaf.

    Args:
        params: Pytree of tensors (one dtype, or pass ``dtype``).
        dtype: Buffer dtype; defaults to the leaves' common dtype.

    Returns:
        ``(flat [N], views)`` where ``views`` has params' structure and shapes.
    """
    leaves, tdef = _tree.flatten(params)
    dtypes = {x.dtype for x in leaves}
    if dtype is None:
        if len(dtypes) != 1:
            raise ValueError(f"flatten_params: leaves have dtypes {sorted(map(str, dtypes))}; pass dtype=.")
        dtype = dtypes.pop()
    flat = torch.cat([x.detach().reshape(-1).to(dtype) for x in leaves]) if leaves else torch.zeros(0, dtype=dtype)
    views = [piece.view(x.shape) for piece, x in zip(torch.split(flat, [x.numel() for x in leaves]), leaves)]
    return flat, _tree.unflatten(tdef, views)


def fused_ema_adamw(
    lr: ScalarOrSchedule,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    ema_decay: float = 0.9999,
    *,
    mode: str = "adamw",
    bias_correction: bool = True,
    impl: str = "auto",
) -> GradientTransformation:
    """AdamW (or Adam with L2) followed by an fp32 EMA of the new params, fused in one pass.

    See the module docstring for the per-element formula. ``update`` is the pure form (new
    tensors, updates ``p_new - p``). ``step`` (via ``apply_step``) writes params and state in
    place with one kernel per flat buffer: leaves that are consecutive views of one storage (see
    ``flatten_params``) are updated by a single call. Params must be fp32 (the MindSpeed op's
    master-weight setting).

    Args:
        lr: Learning rate, or a schedule of the 1-based step.
        betas: ``(b1, b2)``.
        eps: Denominator epsilon.
        weight_decay: Decay (decoupled in mode "adamw", L2 in mode "adam").
        ema_decay: EMA decay in [0, 1]; warm-up ``min(ema_decay, (1+t)/(10+t))``.
        mode: ``"adamw"`` or ``"adam"``.
        bias_correction: Divide moments by ``1 - b**t`` (True) or not.
        impl: ``"auto"``, ``"compiled"`` or ``"foreach"`` (see ``ema_kernel_backend``).

    Returns:
        The transformation; state ``EmaAdamState(count, mu, nu, ema)``, EMA initialised to params.

    Raises:
        ValueError: For bad hyperparameters, mode, or non-fp32 params.
    """
    _check_hparams("fused_ema_adamw", lr, betas, eps, weight_decay)
    if mode not in ("adamw", "adam"):
        raise ValueError(f"fused_ema_adamw: mode={mode!r}; use 'adamw' (decoupled decay) or 'adam' (L2).")
    if not 0.0 <= ema_decay <= 1.0:
        raise ValueError(f"fused_ema_adamw: ema_decay={ema_decay} must be in [0, 1].")
    ema_kernel_backend(impl)  # validates impl; compilation itself happens on the first step
    b1, b2 = betas
    is_adamw = mode == "adamw"
    bc = 1.0 if bias_correction else 0.0

    def _check_fp32(params):
        bad = [f"{path}: {x.dtype}" for path, x in zip(*_tree.flatten_with_paths(params)[:2]) if x.dtype != torch.float32]
        if bad:
            raise ValueError(
                "fused_ema_adamw: params must be fp32 (master weights); got " + ", ".join(map(str, bad))
                + ". Keep fp32 masters (e.g. inside distributed(...)) or cast with .float()."
            )

    def init(params):
        _check_fp32(params)
        # One flat buffer per state field; the leaves are views, so step runs one kernel per field.
        _, mu = flatten_params(_tree.tree_map(torch.zeros_like, params), torch.float32)
        _, nu = flatten_params(_tree.tree_map(torch.zeros_like, params), torch.float32)
        _, ema = flatten_params(params, torch.float32)
        return EmaAdamState(torch.zeros((), dtype=torch.int64), mu, nu, ema)

    def _scalars(count) -> torch.Tensor:
        t = int(count.item()) + 1
        lr_t = resolve_lr(lr, t)
        bc1 = 1 - bc * b1**t
        bc2 = 1 - bc * b2**t
        wd_dec = weight_decay if is_adamw else 0.0
        wd_l2 = 0.0 if is_adamw else weight_decay
        vals = [1 - b1, b2, 1 - b2, wd_l2, 1 - lr_t * wd_dec, lr_t / bc1, bc2**0.5, eps, 1 - ema_decay_at(ema_decay, t)]
        return torch.tensor(vals, dtype=torch.float64)

    def _leaves(grads, state, params):
        g, tdef = _tree.flatten(grads)
        return tdef, tdef.flatten_up_to(params), g, tdef.flatten_up_to(state.mu), tdef.flatten_up_to(state.nu), tdef.flatten_up_to(state.ema)

    def update(grads, state, params):
        _check_fp32(params)
        c64 = _scalars(state.count)
        tdef, ps, gs, ms, vs, ss = _leaves(grads, state, params)
        out = [_math(p, g, m, v, s, c64.to(device=p.device, dtype=torch.float32)) for p, g, m, v, s in zip(ps, gs, ms, vs, ss)]
        unflat = lambda i: _tree.unflatten(tdef, [o[i] for o in out])  # noqa: E731
        ups = _tree.unflatten(tdef, [o[0] - p for o, p in zip(out, ps)])
        return ups, EmaAdamState(state.count + 1, unflat(1), unflat(2), unflat(3))

    def step(grads, state, params):
        _check_fp32(params)
        c64 = _scalars(state.count)
        tdef, ps, gs, ms, vs, ss = _leaves(grads, state, params)
        if not all(x.is_contiguous() for xs in (ps, ms, vs, ss) for x in xs):
            # The kernels write through flat views; strided leaves take the pure path and copy back.
            ups, new = update(grads, state, params)
            with torch.no_grad():
                for p, u in zip(ps, _tree.flatten(ups)[0]):
                    p.add_(u)
                for dst, src in zip(_tree.flatten(state)[0], _tree.flatten(new)[0]):
                    dst.copy_(src)
            return params, state
        backend = ema_kernel_backend(impl)
        with torch.no_grad():
            groups = [_contiguous_base(xs) for xs in (ps, gs, ms, vs, ss)]
            if all(x is not None for x in groups):
                buffers = [groups]
            else:
                buffers = [[x.view(-1) for x in (p, g.contiguous(), m, v, s)] for p, g, m, v, s in zip(ps, gs, ms, vs, ss)]
            buffers = [b for b in buffers if b[0].numel() > 0]
            if backend.kind == "compiled":
                for p, g, m, v, s in buffers:
                    backend.fn(p, g, m, v, s, c64.to(device=p.device, dtype=torch.float32))
            elif buffers:
                _foreach_step(*zip(*buffers), c64)
            state.count.add_(1)
        return params, state

    name = f"fused_ema_adamw(lr={lr}, ema_decay={ema_decay}, mode={mode!r}, impl={impl!r})"
    return GradientTransformation(init, update, step, name=name)


def _foreach_step(ps, gs, ms, vs, ss, c64):
    one_m_b1, b2, one_m_b2, wd_l2, p_scale, step_size, bc2_sqrt, eps, one_m_dec = c64.tolist()
    ps, gs, ms, vs, ss = map(list, (ps, gs, ms, vs, ss))
    if wd_l2 != 0:
        gs = torch._foreach_add(gs, ps, alpha=wd_l2)
    torch._foreach_lerp_(ms, gs, one_m_b1)
    torch._foreach_mul_(vs, b2)
    torch._foreach_addcmul_(vs, gs, gs, one_m_b2)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    if p_scale != 1.0:
        torch._foreach_mul_(ps, p_scale)
    torch._foreach_addcdiv_(ps, ms, denom, -step_size)
    torch._foreach_lerp_(ss, ps, one_m_dec)


def ema_params(state: EmaAdamState, params: PyTree) -> PyTree:
    """Return the EMA weights as a new tree shaped and typed like ``params`` (MindSpeed ``copy_to``)."""
    return _tree.tree_map(lambda s, p: s.detach().to(p.dtype).clone().view(p.shape), state.ema, params)


def swap_ema(params: PyTree, state: EmaAdamState) -> tuple[PyTree, EmaAdamState]:
    """Swap the EMA into the params and the params into the EMA slot; applying it twice restores both.

    For evaluation with EMA weights: ``p_eval, s_eval = swap_ema(params, state)``; run the model
    on ``p_eval``; ``params, state = swap_ema(p_eval, s_eval)`` gives back the originals bitwise
    (params must be fp32, as the EMA is). This is MindSpeed's ``store`` / ``copy_to`` /
    ``restore`` as one pure function.

    Args:
        params: Current fp32 params.
        state: A ``fused_ema_adamw`` state.

    Returns:
        ``(ema_as_params, state_with_params_as_ema)``; new tensors, inputs untouched.
    """
    new_params = _tree.tree_map(lambda s, p: s.detach().clone().to(p.dtype), state.ema, params)
    new_ema = _tree.tree_map(lambda p: p.detach().clone().to(torch.float32), params)
    return new_params, state._replace(ema=new_ema)
