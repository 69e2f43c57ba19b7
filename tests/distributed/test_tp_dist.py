"""TP and TP+SP (even and uneven sequence) on 2 real gloo processes equal the single-device model.

One process launch runs every case (each launch costs seconds). Each rank builds the same params
from one seed, runs the sharded loss and its backward through shard_map's dist backend (gloo
collectives, pad-and-trim for the uneven sequence), and returns its max errors against
``model.loss`` computed in the same process; float64, tolerance 1e-10 (reordered sums over tp).
"""
import functools

import torch

from shardfn.testing import run_distributed


def _tp_cases():
    from torch.distributed.tensor import DTensor

    from shardfn import P, make_mesh, shard_map
    from shardfn.layers import model
    from shardfn.layers.config import LlamaConfig
    from shardfn.layers.tp_model import tp_layout, tp_model_loss, tp_specs

    mesh = make_mesh((2,), ("tp",), backend="dist")
    cfg = LlamaConfig(vocab_size=8, hidden=8, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=2, ffn_hidden=4,
                      dtype=torch.float64)
    errors = {}
    for name, sp, seq in (("tp", False, 4), ("tp+sp", True, 4), ("tp+sp uneven s=5", True, 5)):
        gen = torch.Generator().manual_seed(0)
        params = model.init(gen, cfg)
        tokens = torch.randint(0, cfg.vocab_size, (2, seq), generator=gen)
        targets = torch.randint(0, cfg.vocab_size, (2, seq), generator=gen)
        ref_params = {k: v for k, v in params.items()}
        leaves, spec = torch.utils._pytree.tree_flatten(params)
        for t in leaves:
            t.requires_grad_(True)
        ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
        ref_params = torch.utils._pytree.tree_unflatten(ref_leaves, spec)
        loss_fn = functools.partial(tp_model_loss, config=cfg, sequence_parallel=sp)
        out = shard_map(loss_fn, mesh=mesh, in_specs=(tp_specs(params, cfg), P(), P()), out_specs=P())(
            tp_layout(params, cfg), tokens, targets)
        loss = out.to_local() if isinstance(out, DTensor) else out
        grads = torch.autograd.grad(loss, leaves)
        ref = model.loss(ref_params, tokens, targets, config=cfg)
        ref_grads = torch.autograd.grad(ref, ref_leaves)
        errors[name] = max([abs(loss.item() - ref.item())] + [(g - r).abs().max().item() for g, r in zip(grads, ref_grads)])
    return errors


def test_tp_and_sp_on_two_gloo_processes():
    results = run_distributed(_tp_cases, nprocs=2)
    for rank, errors in enumerate(results):
        assert set(errors) == {"tp", "tp+sp", "tp+sp uneven s=5"}
        for name, err in errors.items():
            assert err < 1e-10, (rank, name, err)
