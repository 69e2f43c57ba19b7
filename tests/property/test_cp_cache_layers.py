"""The CP KV-cache layer interval (FEATURES.md 14) in a model: per-layer ring attention cores.

`cp_layer_attention_fns` gives each layer ring attention with or without the cache as
`kv_cache_policy_for_layer` decides; `model.apply` takes the sequence. Checked on a sim cp mesh:
logits, loss and every parameter gradient equal the one-device model (float64), are bitwise equal
to the same sharded model without any cache, and each layer's backward ring traffic (counted with
`count_comms` between hooks on that layer's attention output and query) is the cached amount
exactly on the layers the policy selects.
"""
import pytest
import torch
import torch.nn.functional as F

from shardfn import P, axis_index, psum, pvary, shard_map
from shardfn.debug import count_comms
from shardfn.layers import model
from shardfn.layers.config import LlamaConfig
from shardfn.primitives.context_parallel import (
    cp_attention_fns,
    cp_layer_attention_fns,
    cp_permute,
    cp_position_ids,
    cp_unpermute,
)
from shardfn.primitives.ring_attention import kv_cache_policy_for_layer
from shardfn.testing import cached_mesh

CFG = LlamaConfig(vocab_size=11, hidden=8, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden=12,
                  dtype=torch.float64)
B, S = 2, 16
# K/V blocks one rank sends in the backward of one ring attention, per policy (ring_attention docstring):
# K and V re-circulate (2) plus dK and dV travel home (2), per hop; "half" caches K, "full" both.
BACKWARD_BLOCKS = {None: 4, "half": 3, "full": 2}


def _params():
    params = model.init(torch.Generator().manual_seed(0), CFG)
    return torch.utils._pytree.tree_map(lambda p: p.detach().requires_grad_(True), params)


def _grads(params, loss):
    leaves = [p for p in torch.utils._pytree.tree_leaves(params) if isinstance(p, torch.Tensor)]
    return torch.autograd.grad(loss, leaves)


def _marked(fn, layer, marks, log):
    """`fn` that notes (layer, device, "end"/"start", log position) when its backward ends/starts.

    In backward the hook on the output fires just before the attention's backward and the hook on q
    just after it; no other layer's attention backward can run in between (its inputs depend on this
    layer's gradient), so the device's ppermute records in between are this layer's ring backward.
    """
    def attn(q, k, v, **kwargs):
        dev = int(axis_index("cp"))
        q.register_hook(lambda g: marks.append((layer, dev, "end", len(log.records))))
        out = fn(q, k, v, **kwargs)
        out.register_hook(lambda g: marks.append((layer, dev, "start", len(log.records))))
        return out

    return attn


def _run(mesh, attn_fns, varlen_fns, tokens, targets):
    cp = mesh.size

    def step(params, tok, tgt, pos):
        params = pvary(params, "cp")
        logits = model.apply(params, tok, position_ids=pos, attn_fn=attn_fns, varlen_fn=varlen_fns)
        ce = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="sum")
        return logits, psum(ce, "cp") / (B * S)

    seq = P(None, "cp")
    f = shard_map(step, mesh=mesh, in_specs=(None, seq, seq, P("cp")), out_specs=(seq, P()))
    params = _params()
    logits, loss = f(params, cp_permute(tokens, "ring", cp), cp_permute(targets, "ring", cp),
                     cp_position_ids(S, "ring", cp))
    return cp_unpermute(logits, "ring", cp), loss, _grads(params, loss)


@pytest.mark.parametrize("cp,policy,interval", [(4, "full", 1), (2, "half", 2)])
def test_per_layer_cache_equals_one_device_and_caches_exactly_the_selected_layers(cp, policy, interval):
    mesh = cached_mesh((cp,), ("cp",))
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CFG.vocab_size, (B, S), generator=gen)
    targets = torch.randint(0, CFG.vocab_size, (B, S), generator=gen)
    attn_fns, varlen_fns = cp_layer_attention_fns("ring", num_layers=CFG.num_layers, kv_cache=policy,
                                                  cache_interval=interval, axis_name="cp")
    marks = []
    with count_comms() as log:
        marked = [_marked(fn, i, marks, log) for i, fn in enumerate(attn_fns)]
        logits, loss, grads = _run(mesh, marked, varlen_fns, tokens, targets)

    ref_params = _params()
    ref_logits = model.apply(ref_params, tokens)
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten())
    ref_grads = _grads(ref_params, ref_loss)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)

    # the cache changes only where K/V come from: bitwise equal to the same model without a cache
    plain = cp_attention_fns("ring", axis_name="cp")
    logits0, loss0, grads0 = _run(mesh, *plain, tokens, targets)
    assert torch.equal(logits, logits0) and torch.equal(loss, loss0)
    assert all(torch.equal(g, g0) for g, g0 in zip(grads, grads0))

    # each layer's backward ring bytes on every device: cached amount exactly where the policy says
    expected_policies = [kv_cache_policy_for_layer(i + 1, policy, interval) for i in range(CFG.num_layers)]
    assert None in expected_policies and policy in expected_policies  # the interval really mixes layers
    block = B * (S // cp) * CFG.num_kv_heads * (CFG.hidden // CFG.num_heads) * 8  # one float64 K or V shard
    for dev in range(cp):
        for layer in range(CFG.num_layers):
            pos = {kind: p for lay, d, kind, p in marks if lay == layer and d == dev}
            assert set(pos) == {"start", "end"} and pos["start"] <= pos["end"], (layer, dev, marks)
            sent = sum(r.bytes_sent for r in log.records[pos["start"]:pos["end"]]
                       if r.device == dev and r.name == "ppermute" and r.phase == "backward")
            want = BACKWARD_BLOCKS[expected_policies[layer]] * (cp - 1) * block
            assert sent == want, (dev, layer, expected_policies[layer], sent, want)


def test_cache_interval_selects_layers_like_the_flag():
    # --context-parallel-cache-interval k: 1-based layer l caches iff l % (k + 1) == 1; 0 = all layers
    attn_fns, varlen_fns = cp_layer_attention_fns("ring", num_layers=5, kv_cache="half", cache_interval=2)
    assert len(attn_fns) == len(varlen_fns) == 5
    cached = [fn for fn in attn_fns if fn is attn_fns[0]]
    assert [fn is attn_fns[0] for fn in attn_fns] == [True, False, False, True, False] and len(cached) == 2
    every, _ = cp_layer_attention_fns("ring", num_layers=3, kv_cache="full", cache_interval=0)
    assert len({id(f) for f in every}) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(algo="ring", num_layers=2, kv_cache="full", cache_interval=2), "0 <= k < num_layers=2"),
    (dict(algo="ulysses", num_layers=2, kv_cache="half"), "no 'half'"),
    (dict(algo="ring", num_layers=0, kv_cache="full"), "num_layers=0"),
    (dict(algo="ring", num_layers=2, kv_cache="all"), "policy='all'"),
])
def test_cp_layer_attention_fns_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cp_layer_attention_fns(**kwargs)


def test_model_rejects_a_per_layer_sequence_of_the_wrong_length():
    params = model.init(torch.Generator().manual_seed(0), CFG)
    tokens = torch.zeros(1, 4, dtype=torch.int64)
    attn_fns, _ = cp_layer_attention_fns("ring", num_layers=2, kv_cache="full")
    with pytest.raises(ValueError, match="2 entries .* for 3 layers"):
        model.apply(params, tokens, attn_fn=attn_fns)
