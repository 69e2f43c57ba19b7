"""TP, TP+SP (even and uneven sequence), Conv3D SP and CoC on 2 real gloo processes equal the reference.

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
    errors["conv3d sp"] = _conv3d_case(mesh)
    errors["coc k=2"] = _coc_case(mesh)
    return errors


def _grad_errors(out, ref, inputs, ref_inputs):
    from torch.distributed.tensor import DTensor

    out = out.full_tensor() if isinstance(out, DTensor) else out
    cot = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    g = torch.autograd.grad((out * cot).sum(), inputs)
    r = torch.autograd.grad((ref * cot).sum(), ref_inputs)
    return max([(out - ref).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(g, r)])


def _conv3d_case(mesh):
    """Depth 7, k_d 3, stride 2: 3 windows split 2 + 1, halo and pad-and-trim gathers over gloo."""
    import torch.nn.functional as F

    from shardfn import P, shard_map
    from shardfn.primitives.conv3d_sp import conv3d_sequence_parallel

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 7, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 3, 2, 1, generator=gen, dtype=torch.float64, requires_grad=True)
    f = shard_map(lambda x, w: conv3d_sequence_parallel(x, w, axis_name="tp", stride=(2, 1, 1)), mesh=mesh,
                  in_specs=(P(), P()), out_specs=P())
    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    return _grad_errors(f(x, w), F.conv3d(xr, wr, stride=(2, 1, 1)), [x, w], [xr, wr])


def _coc_case(mesh):
    """CoC: SP column + row linears in 2 pipelined chunks over gloo."""
    import torch.nn.functional as F

    from shardfn import P, shard_map
    from shardfn.layers.tensor_parallel import column_parallel_linear, row_parallel_linear

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)

    def local(x, w1, w2):
        y = column_parallel_linear({"weight": w1}, x, sequence_dim=1, num_chunks=2)
        return row_parallel_linear({"weight": w2}, torch.tanh(y), reduce="psum_scatter", num_chunks=2)

    f = shard_map(local, mesh=mesh, in_specs=(P(None, "tp"), P("tp", None), P(None, "tp")), out_specs=P(None, "tp"))
    refs = [t.detach().clone().requires_grad_(True) for t in (x, w1, w2)]
    ref = F.linear(torch.tanh(F.linear(refs[0], refs[1])), refs[2])
    return _grad_errors(f(x, w1, w2), ref, [x, w1, w2], refs)


def test_tp_and_sp_on_two_gloo_processes():
    results = run_distributed(_tp_cases, nprocs=2)
    for rank, errors in enumerate(results):
        assert set(errors) == {"tp", "tp+sp", "tp+sp uneven s=5", "conv3d sp", "coc k=2"}
        for name, err in errors.items():
            assert err < 1e-10, (rank, name, err)
