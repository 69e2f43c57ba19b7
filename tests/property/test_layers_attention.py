"""Core attention against a float64 softmax written out here; masks; varlen; LSE and its gradient."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardfn.layers import (
    alibi_bias,
    alibi_slopes,
    attention,
    band_mask,
    causal_mask,
    compressed_causal_mask,
    eod_reset,
    explicit_attention,
    varlen_attention,
)

# Tolerances: fp32 kernels vs a float64 reference (accumulation order differs); bf16 inputs
# are compared with the float64 reference on the same bf16-rounded inputs (output rounded to bf16).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}


def reference(q, k, v, *, keep=None, bias=None, scale=None, drop=None):
    """softmax(q k^T * scale + bias, masked) v in float64; q [b,s,h,d], k/v [b,s,g,d]."""
    q, k, v = (t.double() for t in (q, k, v))
    h, g = q.shape[2], k.shape[2]
    k = k.repeat_interleave(h // g, dim=2)
    v = v.repeat_interleave(h // g, dim=2)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        s = s + bias.double()
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    if drop is not None:
        p = p * drop
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


def _qkv(b, s, h, g, d, dtype, seed=0, s_k=None):
    gen = torch.Generator().manual_seed(seed)
    s_k = s if s_k is None else s_k
    mk = lambda n, heads: torch.randn(b, n, heads, d, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(s, h), mk(s_k, g), mk(s_k, g)


shapes = st.tuples(
    st.integers(1, 2),  # b
    st.integers(1, 9),  # s
    st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4), (6, 3)]),  # (h, g)
    st.sampled_from([4, 8]),  # d
)


@settings(max_examples=8)
@given(shapes, st.sampled_from(["none", "causal", "band", "bias"]), st.sampled_from([torch.float32, torch.bfloat16]))
def test_attention_matches_reference(shape, kind, dtype):
    b, s, (h, g), d = shape
    q, k, v = _qkv(b, s, h, g, d, dtype)
    kw, keep, bias = {}, None, None
    if kind == "causal":
        kw["causal"] = True
        keep = torch.ones(s, s, dtype=torch.bool).tril()
    elif kind == "band":
        kw["mask"] = band_mask(s, 2, 1)
        i, j = torch.arange(s)[:, None], torch.arange(s)[None]
        keep = (j >= i - 2) & (j <= i + 1)
    elif kind == "bias":
        bias = alibi_bias(alibi_slopes(h), s)
        kw["bias"] = bias
        kw["causal"] = True
        keep = torch.ones(s, s, dtype=torch.bool).tril()
    out, lse = attention(q, k, v, return_lse=True, **kw)
    ref, ref_lse = reference(q, k, v, keep=keep, bias=bias)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (b, h, s)
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse.double(), ref_lse, atol=TOL[torch.float32] * 4, rtol=1e-5)
    # Without the LSE the same paths give the same output.
    torch.testing.assert_close(attention(q, k, v, **kw), out, atol=0, rtol=0)


@pytest.mark.parametrize("fn", [attention, explicit_attention])
@pytest.mark.parametrize("kind", ["causal", "mask", "bias", "gqa"])
def test_attention_gradients_including_lse(fn, kind):
    """Gradients of <out, w1> + <lse, w2> w.r.t. q, k, v equal the float64 reference (E1)."""
    b, s, h, d = 2, 6, 4, 8
    g = 2 if kind == "gqa" else h
    q, k, v = (t.requires_grad_() for t in _qkv(b, s, h, g, d, torch.float64, seed=1))
    kw, keep, bias = {}, None, None
    if kind in ("causal", "gqa"):
        kw["causal"] = True
        keep = torch.ones(s, s, dtype=torch.bool).tril()
    elif kind == "mask":
        keep = torch.rand(b, 1, s, s, generator=torch.Generator().manual_seed(3)) > 0.3
        keep[..., 0] = True  # every row keeps one key
        kw["mask"] = keep
    else:
        bias = torch.randn(h, s, s, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        kw["bias"] = bias
    out, lse = fn(q, k, v, return_lse=True, **kw)
    ref, ref_lse = reference(q, k, v, keep=keep, bias=bias)
    w1 = torch.randn_like(ref)
    w2 = torch.randn_like(ref_lse)
    got = torch.autograd.grad((out * w1).sum() + (lse * w2).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w1).sum() + (ref_lse * w2).sum(), (q, k, v))
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-10)


def test_lse_gradient_fp32_flash_vs_explicit():
    """The flash path's LSE gradient (extra-column trick) in fp32 against the explicit path."""
    q, k, v = (t.requires_grad_() for t in _qkv(1, 7, 2, 2, 8, torch.float32, seed=5))
    o1, l1 = attention(q, k, v, causal=True, return_lse=True)
    (g1,) = torch.autograd.grad(l1.sum(), (q,))
    o2, l2 = explicit_attention(q, k, v, causal=True, return_lse=True)
    (g2,) = torch.autograd.grad(l2.sum(), (q,))
    torch.testing.assert_close(g1, g2, atol=2e-6, rtol=1e-5)


def test_ring_merge_of_two_halves_equals_full_attention():
    """What ring attention does: attend to two key blocks, merge by LSE; gradients flow through."""
    q, k, v = (t.requires_grad_() for t in _qkv(1, 8, 2, 2, 4, torch.float64, seed=6))
    o1, l1 = attention(q, k[:, :4], v[:, :4], return_lse=True)
    o2, l2 = attention(q, k[:, 4:], v[:, 4:], return_lse=True)
    lse = torch.logaddexp(l1, l2)
    w1 = torch.exp(l1 - lse).transpose(1, 2)[..., None]  # [b, s, h, 1]
    w2 = torch.exp(l2 - lse).transpose(1, 2)[..., None]
    merged = w1 * o1 + w2 * o2
    full = attention(q, k, v)
    torch.testing.assert_close(merged, full, atol=1e-12, rtol=1e-12)
    w = torch.randn_like(full)
    g_merged = torch.autograd.grad((merged * w).sum(), (q, k, v))
    g_full = torch.autograd.grad((full * w).sum(), (q, k, v))
    for a, b in zip(g_merged, g_full):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("s", [5, 8, 13])
def test_compressed_causal_equals_full_causal_mask_bitwise(s):
    q, k, v = (t.requires_grad_() for t in _qkv(2, s, 4, 2, 8, torch.float32, seed=7))
    comp = compressed_causal_mask(8)
    assert comp is compressed_causal_mask(8)  # built once and reused
    o1, l1 = attention(q, k, v, mask=causal_mask(s), return_lse=True)
    o2, l2 = attention(q, k, v, mask=comp, return_lse=True)
    o3 = attention(q, k, v, causal=True)
    assert torch.equal(o1, o2) and torch.equal(l1, l2) and torch.equal(o1, o3)
    w = torch.randn_like(o1)
    g1 = torch.autograd.grad((o1 * w).sum(), (q, k, v))
    g2 = torch.autograd.grad((o2 * w).sum(), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_dropout_uses_generator_and_matches_reference():
    b, s, h, d, p = 1, 6, 2, 4, 0.3
    q, k, v = _qkv(b, s, h, h, d, torch.float64, seed=8)
    out = attention(q, k, v, causal=True, dropout_p=p, generator=torch.Generator().manual_seed(11))
    keep = torch.empty(b, h, s, s, dtype=torch.float64).bernoulli_(1 - p, generator=torch.Generator().manual_seed(11))
    ref, _ = reference(q, k, v, keep=torch.ones(s, s, dtype=torch.bool).tril(), drop=keep / (1 - p))
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    again = attention(q, k, v, causal=True, dropout_p=p, generator=torch.Generator().manual_seed(11))
    assert torch.equal(out, again)


@settings(max_examples=8)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.booleans(), st.sampled_from([(2, 2), (4, 2)]))
def test_varlen_matches_per_document_loop(lengths, causal, heads):
    h, g = heads
    s = sum(lengths)
    q, k, v = (t.requires_grad_() for t in _qkv(2, s, h, g, 4, torch.float64, seed=9))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    out, lse = varlen_attention(q, k, v, cu, causal=causal, return_lse=True)
    # Reference: one block-diagonal (and causal) mask over the whole sequence.
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    keep = doc[:, None] == doc[None, :]
    if causal:
        keep = keep & torch.ones(s, s, dtype=torch.bool).tril()
    ref, ref_lse = reference(q, k, v, keep=keep)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)
    w = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    # Packed [t, h, d] input gives the same result as a batch row.
    packed = varlen_attention(q[0], k[0], v[0], cu, causal=causal)
    torch.testing.assert_close(packed, out[0], atol=0, rtol=0)


def test_varlen_from_eod_reset():
    tokens = torch.tensor([3, 4, 0, 5, 0, 6, 7])
    pos, cu = eod_reset(tokens, 0)
    q, k, v = _qkv(1, 7, 2, 2, 4, torch.float64, seed=10)
    out = varlen_attention(q, k, v, cu)
    parts = [attention(q[:, a:c], k[:, a:c], v[:, a:c], causal=True) for a, c in zip(cu[:-1], cu[1:])]
    torch.testing.assert_close(out, torch.cat(parts, dim=1), atol=0, rtol=0)


def test_masks_tables():
    assert causal_mask(3).int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert causal_mask(2, 3).int().tolist() == [[1, 0, 0], [1, 1, 0]]
    assert band_mask(4, 1, 1).int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]
    assert torch.equal(band_mask(5, 5, 0), causal_mask(5))
    assert causal_mask(6) is causal_mask(6)  # cached per (size, device)


def test_attention_errors_name_the_argument():
    q = torch.randn(1, 4, 3, 8)
    k = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        attention(q, k, k)
    with pytest.raises(ValueError, match="4 dims"):
        attention(q[0], q[0], q[0])
    with pytest.raises(TypeError, match="mask must be a bool"):
        attention(q, q, q, mask=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(q, q, q, torch.tensor([0, 3]))


def test_trainable_bias_gets_its_gradient():
    """A bias that requires grad takes the explicit path and gets d loss / d bias."""
    q, k, v = _qkv(1, 5, 2, 2, 4, torch.float64, seed=12)
    bias = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    out = attention(q, k, v, bias=bias, causal=True)
    ref, _ = reference(q, k, v, bias=bias, keep=torch.ones(5, 5, dtype=torch.bool).tril())
    w = torch.randn_like(ref)
    (g,) = torch.autograd.grad((out * w).sum(), (bias,))
    (r,) = torch.autograd.grad((ref * w).sum(), (bias,))
    torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("fn", [attention, explicit_attention])
def test_row_keeping_no_key_gives_zero_and_minus_inf(fn):
    q, k, v = _qkv(1, 4, 2, 2, 4, torch.float32, seed=13)
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[1] = False
    out, lse = fn(q, k, v, mask=keep, return_lse=True)
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1])) and torch.isneginf(lse[0, :, 1]).all()
    ref, ref_lse = reference(q, k, v, keep=keep)
    rows = [0, 2, 3]
    torch.testing.assert_close(out[:, rows].double(), ref[:, rows], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse[..., rows].double(), ref_lse[..., rows], atol=2e-5, rtol=2e-5)
