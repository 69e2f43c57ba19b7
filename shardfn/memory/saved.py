"""How many bytes autograd keeps for backward (saved-tensor hooks, M2)."""
from __future__ import annotations

import optree
import torch

__all__ = ["saved_activation_bytes", "saved_activations"]


def _storage_key(t: torch.Tensor):
    # The StorageImpl's address, not data_ptr: a freed storage's bytes can be handed to a new
    # tensor while the freed one is still held here, and both must count.
    st = t.untyped_storage()
    return st._cdata, st


def saved_activations(fn, *args, params=None, **kwargs):
    """Run ``fn(*args, **kwargs)`` and return ``(out, {storage_key: storage})`` of what autograd saved.

    See ``saved_activation_bytes`` for the rules. Storages are read after fn returns, so one
    freed in the meantime (M1, ``discard_storage``) shows as 0 bytes.
    """
    skip = set()
    if params is not None:
        skip = {_storage_key(t)[0] for t in optree.tree_leaves(params) if isinstance(t, torch.Tensor)}
    seen: dict = {}

    def is_param(t):
        root = t if t._base is None else t._base
        return root.is_leaf and root.requires_grad

    def pack(t):
        if isinstance(t, torch.Tensor):
            key, st = _storage_key(t)
            if key in skip or (params is None and is_param(t)):
                skip.add(key)
            elif key not in seen:
                seen[key] = st
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return out, seen


def saved_activation_bytes(fn, *args, params=None, **kwargs) -> int:
    """Bytes autograd saves for the backward of ``fn(*args, **kwargs)``.

    Every tensor that autograd saves is counted once per storage (views and repeated saves
    share bytes), at its storage's size when fn returns. Parameters are excluded: the storages
    of ``params`` when given, otherwise every saved leaf tensor requiring grad, or view of one
    (parameters, closed-over ones included; pass activation inputs without ``requires_grad``,
    as the output of an earlier layer would be).

    Args:
      fn: the function; called once.
      *args: its arguments.
      params: pytree of tensors not to count (default: leaves requiring grad, and their views).
      **kwargs: its keyword arguments.

    Returns:
      The number of bytes.

    Example:
      >>> w = torch.randn(4, 4, requires_grad=True)
      >>> saved_activation_bytes(lambda x: (x @ w).relu(), torch.randn(2, 4))  # x and relu out
      64
    """
    out, seen = saved_activations(fn, *args, params=params, **kwargs)
    total = sum(st.nbytes() for st in seen.values())
    del out
    return total
