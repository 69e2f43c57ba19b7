"""A Llama-style model (shardfn.layers.model) run with a cp axis equals the one-device model.

Logits and every parameter gradient for ring (zigzag), Ulysses and hybrid attention cores, and
packed documents (EOD reset) through ring. The step starts with `pvary(params, cp)`: the automatic
vma lift does not see inside custom autograd Functions (the layers' RMSNorm is one), so without it
the norm weights' gradients would not be summed over cp (see context_parallel's docstring).
"""
import attrs
import pytest
import torch
import torch.nn.functional as F

from shardfn import P, psum, pvary, shard_map
from shardfn.layers import model
from shardfn.layers.config import LlamaConfig
from shardfn.primitives.context_parallel import cp_attention_fns, cp_permute, cp_position_ids, cp_unpermute
from shardfn.testing import cached_mesh

CFG = LlamaConfig(vocab_size=11, hidden=8, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=12,
                  dtype=torch.float64)


def _grads(params, loss):
    leaves = [p for p in torch.utils._pytree.tree_leaves(params) if isinstance(p, torch.Tensor)]
    return torch.autograd.grad(loss, leaves)


def _params():
    params = model.init(torch.Generator().manual_seed(0), CFG)
    return torch.utils._pytree.tree_map(lambda p: p.detach().requires_grad_(True), params)


CASES = [
    ("ring", (4,), ("cp",), {"axis_name": "cp"}, "cp", None),
    ("ulysses", (2,), ("cp",), {"axis_name": "cp"}, "cp", None),
    ("hybrid", (2, 2), ("ring", "ulysses"), {"ulysses_axis": "ulysses", "ring_axis": "ring"}, ("ring", "ulysses"), 2),
]


@pytest.mark.parametrize("algo,shape,names,options,axes,ring_size", CASES, ids=[c[0] for c in CASES])
def test_model_with_cp_axis_equals_one_device(algo, shape, names, options, axes, ring_size):
    mesh = cached_mesh(shape, names)
    cp = mesh.size
    b, s = 2, 16
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CFG.vocab_size, (b, s), generator=gen)
    targets = torch.randint(0, CFG.vocab_size, (b, s), generator=gen)
    attn_fn, varlen_fn = cp_attention_fns(algo, **options)

    def step(params, tok, tgt, pos):
        params = pvary(params, axes)  # gradients summed over cp (Megatron's dp_cp all-reduce)
        logits = model.apply(params, tok, config=CFG, position_ids=pos, attn_fn=attn_fn, varlen_fn=varlen_fn)
        ce = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="sum")
        return logits, psum(ce, axes) / (b * s)

    seq = P(None, axes)
    f = shard_map(step, mesh=mesh, in_specs=(None, seq, seq, P(axes)), out_specs=(seq, P()))
    perm = dict(ring_size=ring_size)
    params = _params()
    logits, loss = f(params, cp_permute(tokens, algo, cp, **perm), cp_permute(targets, algo, cp, **perm),
                     cp_position_ids(s, algo, cp, **perm))
    logits = cp_unpermute(logits, algo, cp, **perm)
    grads = _grads(params, loss)

    ref_params = _params()
    ref_logits = model.apply(ref_params, tokens, config=CFG)
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten())
    ref_grads = _grads(ref_params, ref_loss)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def test_model_packed_documents_through_ring_equals_varlen_model():
    mesh = cached_mesh((2,), ("cp",))
    cfg = attrs.evolve(CFG, num_layers=1)
    s = 14
    cu = torch.tensor([0, 5, 6, 14])
    tokens = torch.randint(0, cfg.vocab_size, (1, s), generator=torch.Generator().manual_seed(2))
    pos_ref = torch.cat([torch.arange(5), torch.arange(1), torch.arange(8)])
    attn_fn, varlen_fn = cp_attention_fns("ring", axis_name="cp")

    def step(params, tok, pos):
        return model.apply(params, tok, config=cfg, position_ids=pos, cu_seqlens=cu, attn_fn=attn_fn,
                           varlen_fn=varlen_fn)

    f = shard_map(step, mesh=mesh, in_specs=(None, P(None, "cp"), P("cp")), out_specs=P(None, "cp"))
    params = model.init(torch.Generator().manual_seed(0), cfg)
    out = f(params, cp_permute(tokens, "ring", 2, cu_seqlens=cu), cp_position_ids(s, "ring", 2, cu_seqlens=cu))
    out = cp_unpermute(out, "ring", 2, cu_seqlens=cu)
    ref = model.apply(params, tokens, config=cfg, position_ids=pos_ref, cu_seqlens=cu)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_zigzag_positions_give_the_zigzagged_rope_table_and_eod_positions_restart():
    from shardfn.layers.rotary import rope_cache
    from shardfn.primitives.zigzag import zigzag_shard

    s, c = 16, 4
    cos, sin = rope_cache(s, 8, dtype=torch.float64)
    zcos, zsin = rope_cache(s, 8, position_ids=cp_position_ids(s, "ring", c), dtype=torch.float64)
    assert torch.equal(zcos, zigzag_shard(cos, c, dim=0)) and torch.equal(zsin, zigzag_shard(sin, c, dim=0))
    # documents [0, 3) and [3, 8) over c = 2 (per-document zigzag with pads, position 0 in pad slots)
    pos = cp_position_ids(8, "ring", 2, cu_seqlens=torch.tensor([0, 3, 8]))
    assert pos.tolist() == [0, 0, 0, 1, 0, 0, 1, 2, 2, 3, 4, 0]
    assert cp_position_ids(8, "ulysses", 2, cu_seqlens=torch.tensor([0, 3, 8])).tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
