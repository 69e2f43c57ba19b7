"""The functional Llama model equals a plain nn.Module written here (weights copied), float64."""
import math

import attrs
import pytest
import torch
from torch import nn

from shardfn.layers import LlamaConfig, block, eod_reset, model, moe, noop
from shardfn import tree as shardfn_tree

torch_f = torch.nn.functional


class RefRMSNorm(nn.Module):
    def __init__(self, h, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(h, dtype=torch.float64))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def ref_norm(c):
    if c.norm == "rms":
        return RefRMSNorm(c.hidden, c.norm_eps)
    return nn.LayerNorm(c.hidden, eps=c.norm_eps, dtype=torch.float64)


def rotate(x, pos, dr, base, interleaved):
    """Complex-number rotary on the first dr channels of x [b, s, h, d]."""
    k = dr // 2
    f = base ** (-torch.arange(k, dtype=torch.float64) * 2 / dr)
    rot = torch.polar(torch.ones(len(pos), k, dtype=torch.float64), pos.double()[:, None] * f)[None, :, None]
    xr, xp = x[..., :dr], x[..., dr:]
    if interleaved:
        z = torch.complex(xr[..., 0::2], xr[..., 1::2]) * rot
        out = torch.stack([z.real, z.imag], -1).flatten(-2)
    else:
        z = torch.complex(xr[..., :k], xr[..., k:]) * rot
        out = torch.cat([z.real, z.imag], -1)
    return torch.cat([out, xp], -1)


class RefAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        d, h, g = c.dim_per_head, c.num_heads, c.kv_heads
        self.q = nn.Linear(c.hidden, h * d, bias=c.bias, dtype=torch.float64)
        self.k = nn.Linear(c.hidden, g * d, bias=c.bias, dtype=torch.float64)
        self.v = nn.Linear(c.hidden, g * d, bias=c.bias, dtype=torch.float64)
        self.o = nn.Linear(h * d, c.hidden, bias=c.bias, dtype=torch.float64)

    def forward(self, x, pos, doc):
        c = self.c
        b, s, _ = x.shape
        d, h, g = c.dim_per_head, c.num_heads, c.kv_heads
        q = self.q(x).view(b, s, h, d)
        k = self.k(x).view(b, s, g, d)
        v = self.v(x).view(b, s, g, d)
        if c.position == "rope":
            q = rotate(q, pos, c.rope_dim, c.rope_base, c.rotary_interleaved)
            k = rotate(k, pos, c.rope_dim, c.rope_base, c.rotary_interleaved)
        k = k.repeat_interleave(h // g, dim=2)
        v = v.repeat_interleave(h // g, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        i, j = torch.arange(s)[:, None], torch.arange(s)[None]
        if c.position == "alibi":
            p2 = 2 ** int(math.log2(h))
            sl = [2 ** (-8 * (n + 1) / p2) for n in range(p2)]
            sl += [2 ** (-8 * (n + 1) / (2 * p2)) for n in range(2 * p2)][0::2][: h - p2]
            scores = scores + torch.tensor(sl, dtype=torch.float64)[:, None, None] * (j - i)
        keep = (j <= i) & (doc[:, None] == doc[None, :])
        p = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1)
        return self.o(torch.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, s, h * d))


class RefMLP(nn.Module):
    def __init__(self, hidden, ffn, kind, bias):
        super().__init__()
        self.kind = kind
        if kind == "swiglu":
            self.gate = nn.Linear(hidden, ffn, bias=bias, dtype=torch.float64)
        self.up = nn.Linear(hidden, ffn, bias=bias, dtype=torch.float64)
        self.down = nn.Linear(ffn, hidden, bias=bias, dtype=torch.float64)

    def forward(self, x):
        if self.kind == "swiglu":
            return self.down(torch_f.silu(self.gate(x)) * self.up(x))
        return self.down(torch_f.gelu(self.up(x)))


class RefMoE(nn.Module):
    """Dense reference: every expert on every token, combined with renormalised top-k weights."""

    def __init__(self, c):
        super().__init__()
        f = c.moe_ffn_hidden or c.ffn
        self.c = c
        self.router = nn.Linear(c.hidden, c.num_experts, bias=False, dtype=torch.float64)
        self.experts = nn.ModuleList(RefMLP(c.hidden, f, c.mlp, False) for _ in range(c.num_experts))
        self.shared = RefMLP(c.hidden, c.num_shared_experts * f, c.mlp, c.bias) if c.num_shared_experts else None

    def forward(self, x):
        probs = torch.softmax(self.router(x), -1)
        w, idx = probs.topk(self.c.moe_top_k, -1)
        w = w / w.sum(-1, keepdim=True)
        gate = torch.zeros_like(probs).scatter(-1, idx, w)  # [b, s, E]
        out = sum(gate[..., e : e + 1] * ex(x) for e, ex in enumerate(self.experts))
        return out + (self.shared(x) if self.shared is not None else 0)


class RefBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n1, self.attn, self.n2 = ref_norm(c), RefAttention(c), ref_norm(c)
        self.mlp = RefMoE(c) if c.num_experts else RefMLP(c.hidden, c.ffn, c.mlp, c.bias)

    def forward(self, x, pos, doc):
        x = x + self.attn(self.n1(x), pos, doc)
        return x + self.mlp(self.n2(x))


class RefLlama(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab_size, c.hidden, dtype=torch.float64)
        self.layers = nn.ModuleList(nn.Identity() if i in c.noop_layers else RefBlock(c) for i in range(c.num_layers))
        self.norm = ref_norm(c)
        self.head = None if c.tie_embeddings else nn.Linear(c.hidden, c.vocab_size, bias=False, dtype=torch.float64)

    def forward(self, tokens, pos=None, doc=None):
        s = tokens.shape[1]
        pos = torch.arange(s) if pos is None else pos
        doc = torch.zeros(s, dtype=torch.long) if doc is None else doc
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x) if isinstance(layer, nn.Identity) else layer(x, pos, doc)
        x = self.norm(x)
        return x @ self.embed.weight.T if self.head is None else self.head(x)


def _copy_linear(mod, p):
    mod.weight.copy_(p["weight"])
    if mod.bias is not None:
        mod.bias.copy_(p["bias"])


def _copy_mlp(ref, p, kind, ffn):
    if kind == "swiglu":
        ref.gate.weight.copy_(p["fc1"]["weight"][:ffn])
        ref.up.weight.copy_(p["fc1"]["weight"][ffn:])
        if ref.up.bias is not None:
            ref.gate.bias.copy_(p["fc1"]["bias"][:ffn])
            ref.up.bias.copy_(p["fc1"]["bias"][ffn:])
    else:
        _copy_linear(ref.up, p["fc1"])
    _copy_linear(ref.down, p["fc2"])


@torch.no_grad()
def copy_into(ref, params, c):
    ref.embed.weight.copy_(params["embed"]["weight"])
    for layer, p in zip(ref.layers, params["layers"]):
        if isinstance(layer, nn.Identity):
            assert p == {}
            continue
        for name in ("n1", "n2"):
            src = p["attn_norm" if name == "n1" else "mlp_norm"]
            getattr(layer, name).weight.copy_(src["weight"])
            if "bias" in src:
                getattr(layer, name).bias.copy_(src["bias"])
        for name in "qkvo":
            _copy_linear(getattr(layer.attn, name), p["attn"][name])
        if c.num_experts:
            f = c.moe_ffn_hidden or c.ffn
            layer.mlp.router.weight.copy_(p["moe"]["router"]["weight"])
            for e, ex in enumerate(layer.mlp.experts):
                _copy_mlp(ex, {"fc1": {"weight": p["moe"]["experts"]["fc1"]["weight"][e]},
                               "fc2": {"weight": p["moe"]["experts"]["fc2"]["weight"][e]}}, c.mlp, f)
            if layer.mlp.shared is not None:
                _copy_mlp(layer.mlp.shared, p["moe"]["shared"], c.mlp, c.num_shared_experts * f)
        else:
            _copy_mlp(layer.mlp, p["mlp"], c.mlp, c.ffn)
    ref.norm.weight.copy_(params["final_norm"]["weight"])
    if "bias" in params["final_norm"]:
        ref.norm.bias.copy_(params["final_norm"]["bias"])
    if ref.head is not None:
        ref.head.weight.copy_(params["head"]["weight"])


CONFIGS = {
    "rope_gqa_swiglu": LlamaConfig(vocab_size=17, hidden=16, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=24,
                                   dtype=torch.float64, init_std=0.3),
    "alibi_gelu_layernorm_bias_tied": LlamaConfig(vocab_size=17, hidden=12, num_layers=2, num_heads=6, mlp="gelu",
                                                 norm="layer", norm_eps=1e-5, position="alibi", bias=True,
                                                 tie_embeddings=True, dtype=torch.float64, init_std=0.3),
    "moe_shared_noop_partial_interleaved": LlamaConfig(vocab_size=17, hidden=16, num_layers=3, num_heads=2,
                                                       ffn_hidden=20, num_experts=4, moe_top_k=2,
                                                       moe_ffn_hidden=8, num_shared_experts=2, noop_layers=(1,),
                                                       rotary_dim=4, rotary_interleaved=True, dtype=torch.float64,
                                                       init_std=0.3),
}


def _setup(name, seed=0):
    c = CONFIGS[name]
    params = model.init(torch.Generator().manual_seed(seed), c)
    for leaf in _leaves(params):
        leaf.requires_grad_()
    ref = RefLlama(c)
    copy_into(ref, params, c)
    return c, params, ref


def _leaves(tree):
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in _leaves(tree[k])]
    if isinstance(tree, list):
        return [x for t in tree for x in _leaves(t)]
    return [tree] if isinstance(tree, torch.Tensor) else []  # the static config holds no tensors


def test_pinned_signatures_find_the_config_in_params():
    """apply(params, tokens) and loss(params, tokens, targets) as pinned: init stores the config."""
    c = CONFIGS["rope_gqa_swiglu"]
    params = model.init(torch.Generator().manual_seed(0), c)
    tokens = torch.randint(0, c.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    assert params["config"] is c
    torch.testing.assert_close(model.apply(params, tokens), model.apply(params, tokens, config=c), rtol=0, atol=0)
    assert model.loss(params, tokens, tokens).dim() == 0
    leaves, _ = shardfn_tree.flatten(params)
    assert all(isinstance(t, torch.Tensor) for t in leaves)  # the config is structure, not a leaf


def _ref_grads_as_params(ref, params, c):
    """Reference gradients arranged like the functional params tree."""
    g = lambda m: m.weight.grad  # noqa: E731
    out = {"embed": {"weight": ref.embed.weight.grad}, "layers": [],
           "final_norm": {"weight": g(ref.norm)}}
    if "bias" in params["final_norm"]:
        out["final_norm"]["bias"] = ref.norm.bias.grad
    if ref.head is not None:
        out["head"] = {"weight": g(ref.head)}

    def lin(m):
        d = {"weight": m.weight.grad}
        if getattr(m, "bias", None) is not None:
            d["bias"] = m.bias.grad
        return d

    def mlp_(m, kind):
        if kind == "swiglu":
            fc1 = {"weight": torch.cat([m.gate.weight.grad, m.up.weight.grad])}
            if m.up.bias is not None:
                fc1["bias"] = torch.cat([m.gate.bias.grad, m.up.bias.grad])
        else:
            fc1 = lin(m.up)
        return {"fc1": fc1, "fc2": lin(m.down)}

    for layer in ref.layers:
        if isinstance(layer, nn.Identity):
            out["layers"].append({})
            continue
        d = {"attn_norm": lin(layer.n1), "mlp_norm": lin(layer.n2),
             "attn": {n: lin(getattr(layer.attn, n)) for n in "qkvo"}}
        if c.num_experts:
            ex = [mlp_(e, c.mlp) for e in layer.mlp.experts]
            d["moe"] = {"router": {"weight": layer.mlp.router.weight.grad},
                        "experts": {"fc1": {"weight": torch.stack([e["fc1"]["weight"] for e in ex])},
                                    "fc2": {"weight": torch.stack([e["fc2"]["weight"] for e in ex])}}}
            if layer.mlp.shared is not None:
                d["moe"]["shared"] = mlp_(layer.mlp.shared, c.mlp)
        else:
            d["mlp"] = mlp_(layer.mlp, c.mlp)
        out["layers"].append(d)
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_model_equals_torch_module_forward_and_gradients(name):
    c, params, ref = _setup(name)
    tokens = torch.randint(0, c.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, c.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = (torch.rand(2, 7, generator=torch.Generator().manual_seed(3)) > 0.3).double()
    logits = model.apply(params, tokens, config=c)
    want = ref(tokens)
    torch.testing.assert_close(logits, want, atol=1e-11, rtol=1e-11)
    loss = model.loss(params, tokens, targets, mask, config=c)
    ce = torch_f.cross_entropy(want.flatten(0, 1), targets.flatten(), reduction="none")
    ref_loss = (ce * mask.flatten()).sum() / mask.sum()
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-12)
    leaves = _leaves(params)
    grads = torch.autograd.grad(loss, leaves)
    ref_loss.backward()
    want_grads = _leaves(_ref_grads_as_params(ref, params, c))
    assert len(grads) == len(want_grads)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


def test_packed_documents_equal_separate_runs():
    """EOD reset: cu_seqlens + reset positions == each document run on its own."""
    c, params, ref = _setup("rope_gqa_swiglu")
    tokens = torch.tensor([[3, 5, 0, 7, 2, 8, 0, 4]])
    pos, cu = eod_reset(tokens[0], 0)
    logits = model.apply(params, tokens, config=c, position_ids=pos, cu_seqlens=cu)
    parts = [model.apply(params, tokens[:, a:b], config=c) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    torch.testing.assert_close(logits, torch.cat(parts, dim=1), atol=1e-12, rtol=1e-12)
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
    torch.testing.assert_close(logits, ref(tokens, pos, doc).detach(), atol=1e-11, rtol=1e-11)


def test_noop_layers_do_not_change_the_model():
    c, params, _ = _setup("rope_gqa_swiglu")
    c2 = attrs.evolve(c, num_layers=4, noop_layers=(0, 2))
    p2 = dict(params, layers=[{}, params["layers"][0], {}, params["layers"][1]])
    tokens = torch.randint(0, c.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.apply(p2, tokens, config=c2), model.apply(params, tokens, config=c),
                               atol=0, rtol=0)
    x = torch.randn(2, 3)
    y = noop.apply({}, x)
    assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()
    assert block.init(None, c2, 0) == {}


def test_moe_output_is_routed_plus_shared():
    p = moe.init(torch.Generator().manual_seed(0), 8, 4, 6, num_shared_experts=1, kind="swiglu")
    x = torch.randn(2, 3, 8)
    both = moe.apply(p, x, top_k=2)
    routed = moe.apply({k: v for k, v in p.items() if k != "shared"}, x, top_k=2)
    from shardfn.layers import mlp

    torch.testing.assert_close(both, routed + mlp.apply(p["shared"], x), atol=1e-6, rtol=1e-6)


def test_config_errors_list_every_problem():
    with pytest.raises(ValueError, match="num_kv_heads=3.*noop_layers"):
        LlamaConfig(vocab_size=8, hidden=8, num_layers=2, num_heads=4, num_kv_heads=3, noop_layers=(5,))
