"""The layers inside shard_map (data parallel on a simulated mesh): gradients of replicated
parameters come out summed over devices, custom autograd Functions (RMSNorm, flash attention,
norm/activation recompute) included."""
import optree
import pytest
import torch

from shardfn import P, make_mesh, pmean, shard_map
from shardfn.layers import LlamaConfig, RecomputePolicy, model

CONFIG = LlamaConfig(vocab_size=17, hidden=16, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=24,
                     num_experts=2, moe_top_k=1, num_shared_experts=1, moe_ffn_hidden=8, dtype=torch.float64)


@pytest.mark.parametrize("policy", [RecomputePolicy(), RecomputePolicy(full_layers=1, selective=True, norm=True,
                                                                       activation=True)], ids=["none", "mixed"])
def test_data_parallel_gradients_equal_single_device(policy):
    cfg = CONFIG
    params = model.init(torch.Generator().manual_seed(0), cfg)
    leaves = optree.tree_leaves(params)
    for t in leaves:
        t.requires_grad_()
    tokens = torch.randint(0, 17, (4, 6), generator=torch.Generator().manual_seed(1))
    mesh = make_mesh((2,), ("dp",), backend="sim")

    def step(p, t):
        return pmean(model.loss(p, t, t.roll(-1, 1), config=cfg, recompute=policy), "dp")

    loss = shard_map(step, mesh=mesh, in_specs=(P(), P("dp")), out_specs=P())(params, tokens)
    ref = model.loss(params, tokens, tokens.roll(-1, 1), config=cfg)
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    for a, b in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(ref, leaves)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
