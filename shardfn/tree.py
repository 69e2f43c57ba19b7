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
    except ValueError as err:
        raise ValueError(
            f"{what} is not a pytree prefix of the values it describes: {err}. "
            f"Give one spec per argument (a P or None applies to everything below it), "
            f"e.g. in_specs=(P('dp'), P()) for f(x, w)."
        ) from None


def format_path(root: str, path: tuple) -> str:
    """Render an optree path as Python indexing, e.g. ``in_specs[0]['w']``."""
    return root + "".join(f"[{key!r}]" for key in path)
