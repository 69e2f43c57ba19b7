"""Saved activation bytes of an explicit-attention GPT layer equal Korthikanti's terms exactly.

PERF.md 3.1, CPU-adjusted. The layer is LayerNorm -> q/k/v linears -> QK^T -> softmax -> PV ->
out linear -> residual; LayerNorm -> fc1 (4h) -> GeLU -> fc2 -> residual, built from
shardfn.layers with ``attn_fn=explicit_attention`` (no SDPA). Bytes are counted per storage,
parameters excluded. Verified forms (s seq, b batch, h hidden, a heads):

* fp32, no dropout:        64sbh + 4as^2b + 16sb (16sb = fp32 mean and rstd of the 2 LayerNorms)
* fp32, with dropout:      72sbh + 12as^2b + 16sb (CPU keeps masks in the activation dtype:
                           +4as^2b mask, +4as^2b dropout output, +2 x 4sbh hidden-dropout masks)
* selective (core):        64sbh + 16sb (checkpoint keeps q, k, v: 12sbh, the copies it replaces)
* norm recompute:          56sbh + 4as^2b (both norm outputs freed, their statistics not kept)
* activation recompute:    48sbh + 4as^2b + 16sb (GeLU output, 16sbh, freed)
* full recompute:          4sbh (the layer input)
"""
import attrs
import optree
import pytest
import torch

from shardfn.layers import LayerRecompute, LlamaConfig, block, explicit_attention
from shardfn.memory import saved_activation_bytes

S, B, H, A = 8, 2, 16, 4
GPT = LlamaConfig(vocab_size=8, hidden=H, num_layers=1, num_heads=A, norm="layer", norm_eps=1e-5, mlp="gelu",
                  position="none", bias=True, ffn_hidden=4 * H)


def _bytes(config, recompute):
    params = block.init(torch.Generator().manual_seed(0), config, 0)
    for t in optree.tree_leaves(params):
        t.requires_grad_()
    x = torch.randn(B, S, H)  # the previous layer's output: counted when saved
    return saved_activation_bytes(block.apply, params, x, config=config, recompute=recompute,
                                  attn_fn=explicit_attention, generator=torch.Generator().manual_seed(1))


sbh, as2b, sb = S * B * H, A * S * S * B, S * B
FORMS = {
    "none": (LayerRecompute(), 64 * sbh + 4 * as2b + 16 * sb),
    "selective": (LayerRecompute(selective=True), 64 * sbh + 16 * sb),
    "norm": (LayerRecompute(norm=True), 56 * sbh + 4 * as2b),
    "activation": (LayerRecompute(activation=True), 48 * sbh + 4 * as2b + 16 * sb),
    "full": (LayerRecompute(full=True), 4 * sbh),
}


@pytest.mark.parametrize("name", sorted(FORMS))
def test_korthikanti_fp32_no_dropout_exact(name):
    recompute, expected = FORMS[name]
    assert _bytes(GPT, recompute) == expected


def test_korthikanti_fp32_with_dropout_exact():
    cfg = attrs.evolve(GPT, attention_dropout=0.1, hidden_dropout=0.1)
    assert _bytes(cfg, LayerRecompute()) == 72 * sbh + 12 * as2b + 16 * sb
    # Selective recompute removes all three as^2b tensors (softmax out, mask, dropout out).
    assert _bytes(cfg, LayerRecompute(selective=True)) == 72 * sbh + 16 * sb


def test_recompute_removes_exactly_its_terms():
    none = _bytes(GPT, LayerRecompute())
    assert none - _bytes(GPT, LayerRecompute(selective=True)) == 4 * as2b
    assert none - _bytes(GPT, LayerRecompute(norm=True)) == 2 * 4 * sbh + 16 * sb
    assert none - _bytes(GPT, LayerRecompute(activation=True)) == 4 * 4 * sbh
    both = _bytes(GPT, LayerRecompute(selective=True, norm=True, activation=True))
    assert both == 64 * sbh - 8 * sbh - 16 * sbh


def test_dedup_views_and_parameters_excluded():
    w = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(3, 4)
    # x @ w saves x (48 B) and w (parameter, excluded); relu saves its output (48 B);
    # the second use of x's storage (a view) is not counted again.
    assert saved_activation_bytes(lambda x: (x @ w).relu() + (x[:, :2] @ w[:2]).sum(), x) == 48 + 48
    xg = x.clone().requires_grad_()
    f = lambda x: (x @ w).relu()  # noqa: E731
    assert saved_activation_bytes(f, xg) == 48  # x is a leaf requiring grad: excluded by default
    assert saved_activation_bytes(f, xg, params=[w]) == 48 + 48
    assert saved_activation_bytes(f, xg, params=[]) == 48 + 48 + 64
