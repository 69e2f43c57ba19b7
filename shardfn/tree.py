"""The one place pytrees are handled (optree).

`None` is a leaf everywhere in shardfn: inside arguments it is a non-tensor value
that passes through, inside a spec tree it means "replicated". A `P` is always a
leaf of a spec tree, never a container.
"""
from __future__ import annotations

from typing import Any, Callable

import optree

__all__ = [
    "flatten",
    "flatten_with_paths",
    "unflatten",
    "tree_map",
    "broadcast_prefix",
    "format_path",
]

_NONE_IS_LEAF = True


def register_static(cls):
    """Register `cls` as a pytree node with no leaves: its value lives in the tree's structure.

    Static configuration (e.g. a model's config inside its params) then rides along through every
    tree map, shard_map and optimizer without being mistaken for a tensor (equinox's static
    fields). Registered in optree's global registry, so plain optree calls agree.
    """
    import torch.utils._pytree as torch_pytree

    optree.register_pytree_node(
        cls,
        lambda node: ((), node, ()),
        lambda node, _children: node,
        namespace=optree.registry.__dict__["__GLOBAL_NAMESPACE"],
    )
    # torch.func and torch's own tree utilities see it the same way
    torch_pytree.register_pytree_node(cls, lambda node: ([], node), lambda _children, node: node)
    return cls


def _has_leaves(tree) -> bool:
    return bool(optree.tree_leaves(tree, none_is_leaf=_NONE_IS_LEAF))


def _fill_static(prefix, tree):
    """Give a prefix dict the keys of `tree` whose subtrees hold no leaves (static config nodes)."""
    if isinstance(prefix, dict) and isinstance(tree, dict):
        out = dict(prefix)
        for key, sub in tree.items():
            if key not in out and not _has_leaves(sub):
                out[key] = None
        return {k: _fill_static(v, tree[k]) if k in tree else v for k, v in out.items()}
    if isinstance(prefix, (list, tuple)) and isinstance(tree, (list, tuple)) and len(prefix) == len(tree):
        return type(prefix)(_fill_static(p, t) for p, t in zip(prefix, tree)) if not hasattr(prefix, "_fields") else prefix
    return prefix


def flatten(tree: Any, is_leaf: Callable[[Any], bool] | None = None):
    """Flatten `tree` into (leaves, treespec); None is a leaf."""
    return optree.tree_flatten(tree, is_leaf=is_leaf, none_is_leaf=_NONE_IS_LEAF)


def flatten_with_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None):
    """Flatten `tree` into (paths, leaves, treespec); None is a leaf."""
    return optree.tree_flatten_with_path(tree, is_leaf=is_leaf, none_is_leaf=_NONE_IS_LEAF)


def unflatten(treespec, leaves):
    """Rebuild a tree from `flatten`'s treespec and a list of leaves."""
    return optree.tree_unflatten(treespec, leaves)


def tree_map(fn: Callable, tree: Any, *rest: Any, is_leaf: Callable[[Any], bool] | None = None):
    """Map `fn` over the leaves of `tree` (and matching trees in `rest`); None is a leaf."""
    return optree.tree_map(fn, tree, *rest, is_leaf=is_leaf, none_is_leaf=_NONE_IS_LEAF)


def broadcast_prefix(prefix: Any, tree: Any, *, is_leaf: Callable[[Any], bool], what: str) -> list:
    """Return one prefix leaf per leaf of `tree`, `prefix` being a pytree prefix of it.

    Raises:
        ValueError: `prefix` is not a prefix of `tree`; the message names `what` and the paths.
    """
    try:
        return optree.broadcast_prefix(prefix, tree, is_leaf=is_leaf, none_is_leaf=_NONE_IS_LEAF)
    except ValueError:
        pass
    try:
        return optree.broadcast_prefix(_fill_static(prefix, tree), tree, is_leaf=is_leaf, none_is_leaf=_NONE_IS_LEAF)
    except ValueError as err:
        raise ValueError(
            f"{what} is not a pytree prefix of the values it describes: {err}. "
            f"Give one spec per argument (a P or None applies to everything below it), "
            f"e.g. in_specs=(P('dp'), P()) for f(x, w)."
        ) from None


def format_path(root: str, path: tuple) -> str:
    """Render an optree path as Python indexing, e.g. ``in_specs[0]['w']``."""
    return root + "".join(f"[{key!r}]" for key in path)
