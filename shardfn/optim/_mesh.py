"""The few core names optim/ needs (vma_of, psum, psum_scatter, all_gather, axis_*), imported lazily.

Lazy so that the single-device optimizers import and run without the mesh machinery.
"""
from __future__ import annotations

import importlib

import torch


def _core():
    return importlib.import_module("shardfn")


def vma_of(x: torch.Tensor) -> frozenset:
    """Mesh axes ``x`` varies over inside shard_map; the empty set outside or without the core."""
    try:
        fn = _core().vma_of
    except (ImportError, AttributeError):
        return frozenset()
    return frozenset(fn(x))


def psum(x, axis_name):
    return _core().psum(x, axis_name)


def psum_scatter(x, axis_name, **kw):
    return _core().psum_scatter(x, axis_name, **kw)


def all_gather(x, axis_name, **kw):
    return _core().all_gather(x, axis_name, **kw)


def all_gather_invariant(x, axis_name, **kw):
    return _core().all_gather_invariant(x, axis_name, **kw)


def pvary(x, axis_name):
    return _core().pvary(x, axis_name)


def axis_index(axis_name):
    return _core().axis_index(axis_name)


def axis_size(axis_name) -> int:
    return _core().axis_size(axis_name)
