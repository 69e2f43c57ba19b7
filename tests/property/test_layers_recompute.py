"""Every recompute policy gives gradients bitwise equal to no recompute, dropout included."""
import attrs
import optree
import pytest
import torch

from shardfn.layers import LlamaConfig, RecomputePolicy, model
from shardfn.layers.recompute import checkpoint
from shardfn.memory import checkpoint_without_output, discard_storage, refill_storage, saved_activations

CONFIG = LlamaConfig(vocab_size=19, hidden=16, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden=24,
                     attention_dropout=0.2, hidden_dropout=0.1, noop_layers=(1,), init_std=0.2)

POLICIES = {
    "full_all": RecomputePolicy(full_layers=3),
    "full_first_1": RecomputePolicy(full_layers=1),
    "selective": RecomputePolicy(selective=True),
    "norm": RecomputePolicy(norm=True),
    "activation": RecomputePolicy(activation=True),
    "full1_plus_all_light": RecomputePolicy(full_layers=1, selective=True, norm=True, activation=True),
}


def _params(config):
    params = model.init(torch.Generator().manual_seed(0), config)
    leaves = optree.tree_leaves(params)
    for t in leaves:
        t.requires_grad_()
    return params, leaves


def _loss_and_grads(config, policy, *, use_generator):
    params, leaves = _params(config)
    tokens = torch.randint(0, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(7) if use_generator else None
    torch.manual_seed(123)
    loss = model.loss(params, tokens, tokens.roll(-1, 1), config=config, recompute=policy, generator=gen)
    torch.manual_seed(999)  # recomputation must not depend on the RNG state at backward time
    return loss, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("use_generator", [True, False])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_gradients_bitwise_equal(name, use_generator):
    loss0, g0 = _loss_and_grads(CONFIG, RecomputePolicy(), use_generator=use_generator)
    loss1, g1 = _loss_and_grads(CONFIG, POLICIES[name], use_generator=use_generator)
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_dropout_is_really_on():
    """The bitwise tests would be vacuous if dropout did nothing: other seeds change the loss."""
    a, _ = _loss_and_grads(CONFIG, RecomputePolicy(), use_generator=True)
    b, _ = _loss_and_grads(attrs.evolve(CONFIG, hidden_dropout=0.0, attention_dropout=0.0), RecomputePolicy(),
                           use_generator=True)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name,expected_freed", [("norm", 4), ("activation", 2), ("full1_plus_all_light", 3)])
def test_discarded_storages_are_empty_between_forward_and_backward(name, expected_freed):
    """Norm recompute frees 2 norm outputs per real block, activation recompute 1 (2 real blocks)."""
    params, leaves = _params(CONFIG)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    loss, seen = saved_activations(model.loss, params, tokens, tokens, config=CONFIG, recompute=POLICIES[name])
    empty = [st for st in seen.values() if st.nbytes() == 0]
    assert len(empty) == expected_freed
    (g,) = torch.autograd.grad(loss, [params["embed"]["weight"]])
    assert all(st.nbytes() > 0 for st in empty)  # refilled for backward
    assert torch.isfinite(g).all()


def test_checkpoint_without_output_mechanics():
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    ref = torch.autograd.grad((torch.nn.functional.gelu(x) @ w).square().sum(), (x, w))
    a = checkpoint_without_output(torch.nn.functional.gelu, x)
    y = a.value @ w
    freed = a.discard(until=y)
    assert freed == 4 * 8 * 8 and a.value.untyped_storage().nbytes() == 0 and a.value.shape == (4, 8)
    got = torch.autograd.grad(y.square().sum(), (x, w))
    assert all(torch.equal(p, q) for p, q in zip(got, ref))


def test_checkpoint_without_output_replays_generator():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, dtype=torch.float64, requires_grad=True)

    def noisy(t):
        return t * torch.rand(t.shape, generator=g, dtype=t.dtype)

    ref = torch.autograd.grad((noisy(x) * w).sum(), (x, w))
    g.manual_seed(3)
    a = checkpoint_without_output(noisy, x, generators=[g])
    y = a.value * w
    a.discard(until=y)
    after = g.get_state()
    got = torch.autograd.grad(y.sum(), (x, w))
    assert all(torch.equal(p, q) for p, q in zip(got, ref))
    assert torch.equal(g.get_state(), after)  # replay put the generator back


def test_discard_and_refill_keep_views_and_versions():
    t = torch.arange(6.0).reshape(2, 3)
    v = t[1]
    version = t._version
    assert discard_storage(t) == 24 and v.untyped_storage().nbytes() == 0
    refill_storage(t, torch.arange(6.0).reshape(2, 3) * 2)
    assert v.tolist() == [6.0, 8.0, 10.0] and t._version == version


def test_checkpoint_replays_generator_in_kwargs():
    x = torch.randn(30, dtype=torch.float64, requires_grad=True)

    def f(t, *, generator):
        return t * torch.rand(t.shape, generator=generator, dtype=t.dtype)

    ref = torch.autograd.grad(f(x, generator=torch.Generator().manual_seed(5)).square().sum(), (x,))
    got = torch.autograd.grad(checkpoint(f, x, generator=torch.Generator().manual_seed(5)).square().sum(), (x,))
    assert torch.equal(ref[0], got[0])


def test_policy_layer_selection():
    p = RecomputePolicy(full_layers=2, norm=True, activation=True, light_layers=1)
    kinds = [p.for_layer(i) for i in range(4)]
    assert [k.full for k in kinds] == [True, True, False, False]
    assert [k.norm for k in kinds] == [False, False, True, False]
    assert not kinds[0].norm  # a layer never gets two kinds
