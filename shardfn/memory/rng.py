"""Snapshots of random-number state, so a recomputed forward draws the same dropout masks."""
from __future__ import annotations

import contextlib

import torch

__all__ = ["RngSnapshot"]


def _device_module(device_type: str):
    mod = getattr(torch, device_type, None)
    if mod is not None and hasattr(mod, "get_rng_state") and hasattr(mod, "set_rng_state"):
        return mod
    return None


class RngSnapshot:
    """The global CPU RNG, the default RNG of each accelerator used, and given generators."""

    def __init__(self, cpu, devices, generators):
        self._cpu = cpu
        self._devices = devices  # [(module, index, state)]
        self._generators = generators  # [(generator, state)]

    @classmethod
    def take(cls, *, devices=(), generators=()) -> "RngSnapshot":
        """Record the states now. ``devices``: tensors' devices; ``generators``: torch.Generators."""
        dev = []
        seen = set()
        for d in devices:
            d = torch.device(d)
            if d.type == "cpu" or (d.type, d.index) in seen:
                continue
            seen.add((d.type, d.index))
            mod = _device_module(d.type)
            if mod is not None:
                idx = d.index if d.index is not None else mod.current_device()
                dev.append((mod, idx, mod.get_rng_state(idx)))
        gens = []
        for g in generators:
            if not any(g is h for h, _ in gens):
                gens.append((g, g.get_state()))
        return cls(torch.get_rng_state(), dev, gens)

    @contextlib.contextmanager
    def replay(self):
        """Set the recorded states inside the block; put the current ones back afterwards."""
        now = RngSnapshot.take(generators=[g for g, _ in self._generators])
        now_dev = [(m, i, m.get_rng_state(i)) for m, i, _ in self._devices]
        torch.set_rng_state(self._cpu)
        for m, i, st in self._devices:
            m.set_rng_state(st, i)
        for g, st in self._generators:
            g.set_state(st)
        try:
            yield
        finally:
            torch.set_rng_state(now._cpu)
            for m, i, st in now_dev:
                m.set_rng_state(st, i)
            for g, st in now._generators:
                g.set_state(st)
