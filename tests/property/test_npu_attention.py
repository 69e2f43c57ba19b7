"""npu_fusion_attention / _grad / _v2 references against direct formulas, SDPA and loops.

Oracles are written independently of shardfn.npu: masks by explicit Python loops over (i, j),
attention by ``softmax(QK^T * scale + bias)`` in float64 (or torch SDPA), varlen by a loop over
documents, gradients by torch autograd through the forward.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st

from shardfn.npu import (
    alibi_slopes,
    causal_mask_2048,
    npu_fusion_attention,
    npu_fusion_attention_grad,
    npu_fusion_attention_grad_v2,
    npu_fusion_attention_v2,
    npu_ring_attention_update,
)

# Tolerances (rtol, atol) per dtype; bf16 is loose because the inputs themselves are rounded.
MAXT = 2147483647
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def _to_layout(x, layout):
    """BNSD -> layout (test-side conversion, written with einops independently of the op)."""
    return {
        "BNSD": lambda t: t,
        "BSND": lambda t: rearrange(t, "b n s d -> b s n d"),
        "BSH": lambda t: rearrange(t, "b n s d -> b s (n d)"),
        "SBH": lambda t: rearrange(t, "b n s d -> s b (n d)"),
    }[layout](x)


def _from_layout(x, layout, n):
    return {
        "BNSD": lambda t: t,
        "BSND": lambda t: rearrange(t, "b s n d -> b n s d"),
        "BSH": lambda t: rearrange(t, "b s (n d) -> b n s d", n=n),
        "SBH": lambda t: rearrange(t, "s b (n d) -> b n s d", n=n),
    }[layout](x)


def _naive(q, k, v, masked=None, scale=1.0, bias=None):
    """float64 softmax attention, BNSD, GQA by repeat_interleave; fully masked rows -> 0."""
    r = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(r, dim=1)
    v = v.double().repeat_interleave(r, dim=1)
    s = q.double() @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()
    if masked is not None:
        s = s.masked_fill(masked, float("-inf"))
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0))
    z = e.sum(-1, keepdim=True)
    p = e / torch.where(z > 0, z, 1.0)
    return p @ v, m.squeeze(-1), z.squeeze(-1)


def _loop_mask(sq, skv, mode, pre, nxt, user=None):
    """Explicit Python-loop mask (True = masked) for sparse modes 0-4 (Ascend's definitions)."""
    out = torch.zeros(sq, skv, dtype=torch.bool)
    for i in range(sq):
        for j in range(skv):
            if mode == 0:
                out[i, j] = bool(user[i, j]) or (j > i + nxt) or (j < i - pre)
            elif mode == 1:
                out[i, j] = bool(user[i, j])
            elif mode == 2:
                out[i, j] = j > i
            elif mode == 3:
                out[i, j] = j > i + (skv - sq)
            else:
                d = j - i - (skv - sq)
                out[i, j] = d > nxt or d < -pre
    return out


def _qkv(b, n, g, sq, skv, d, dtype, seed=0, dv=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, sq, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(b, g, skv, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, g, skv, dv or d, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_sdpa(dtype, causal):
    b, n, g, s, d = 2, 4, 2, 7, 8
    q, k, v = _qkv(b, n, g, s, s, d, dtype)
    scale = 1 / math.sqrt(d)
    kw = dict(atten_mask=causal_mask_2048(), sparse_mode=2) if causal else {}
    out = npu_fusion_attention(q, k, v, n, "BNSD", scale=scale, **kw)[0]
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal, scale=scale,
                                         enable_gqa=True)
    assert out.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)


@settings(max_examples=8)
@given(b=st.integers(1, 2), g=st.integers(1, 2), r=st.integers(1, 2), sq=st.integers(1, 6), skv=st.integers(1, 6),
       d=st.sampled_from([2, 4]), dv=st.sampled_from([2, 4]), causal=st.booleans())
def test_every_layout_gives_the_same_result(b, g, r, sq, skv, d, dv, causal):
    n = g * r
    q, k, v = _qkv(b, n, g, sq, skv, d, torch.float64, seed=sq * 7 + skv, dv=dv)
    kw = dict(atten_mask=causal_mask_2048(), sparse_mode=3) if causal else {}
    ref = npu_fusion_attention(q, k, v, n, "BNSD", scale=0.3, **kw)
    for layout in ("BSND", "BSH", "SBH"):
        got = npu_fusion_attention(_to_layout(q, layout), _to_layout(k, layout), _to_layout(v, layout), n, layout,
                                   scale=0.3, **kw)
        torch.testing.assert_close(_from_layout(got[0], layout, n), ref[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[2], ref[2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode,pre,nxt", [(0, 2, 1), (0, 9, -1), (1, 0, 0), (2, 0, 0), (3, 0, 0), (4, 2, 0),
                                          (4, 1, 2)])
@pytest.mark.parametrize("sq,skv", [(5, 5), (4, 7), (6, 3)])
def test_sparse_modes_match_explicit_masks(mode, pre, nxt, sq, skv):
    b, n, g, d = 2, 2, 1, 4
    q, k, v = _qkv(b, n, g, sq, skv, d, torch.float64, seed=mode)
    user = torch.rand(sq, skv, generator=torch.Generator().manual_seed(3)) < 0.3
    if mode == 0:
        # The NPU asks for a mask consistent with the band; here the mask is the band AND random
        # holes, and the op must honour both.
        user = user | _loop_mask(sq, skv, 0, pre, nxt, torch.zeros(sq, skv, dtype=torch.bool))
    atten_mask = user if mode in (0, 1) else causal_mask_2048()
    out, mx, sm, *_ = npu_fusion_attention(q, k, v, n, "BNSD", atten_mask=atten_mask, scale=0.5, sparse_mode=mode,
                                           pre_tockens=pre, next_tockens=nxt)
    masked = _loop_mask(sq, skv, mode, pre, nxt, user)
    ref, m, z = _naive(q, k, v, masked, scale=0.5)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mx[..., 0], m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sm[..., 0], z, rtol=1e-12, atol=1e-12)


def test_no_mask_ignores_sparse_mode_and_band():
    q, k, v = _qkv(1, 2, 2, 5, 5, 4, torch.float64)
    full = npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.5)[0]
    for mode in range(5):
        got = npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.5, sparse_mode=mode, pre_tockens=0, next_tockens=0)[0]
        torch.testing.assert_close(got, full, rtol=0, atol=0)


@pytest.mark.parametrize("sq,skv", [(6, 6), (5, 9)])
def test_compressed_causal_equals_full_causal_mask(sq, skv):
    q, k, v = _qkv(2, 2, 1, sq, skv, 4, torch.float32)
    compressed = npu_fusion_attention(q, k, v, 2, "BNSD", atten_mask=causal_mask_2048(), sparse_mode=3, scale=0.5)
    full_mask = torch.ones(sq, skv, dtype=torch.bool).triu(1 + skv - sq)  # right-down causal, written out
    full = npu_fusion_attention(q, k, v, 2, "BNSD", atten_mask=full_mask, sparse_mode=1, scale=0.5)
    for a, b in zip(compressed[:3], full[:3]):
        assert torch.equal(a, b)
    left_up = npu_fusion_attention(q, k, v, 2, "BNSD", atten_mask=causal_mask_2048(), sparse_mode=2, scale=0.5)
    left_full = npu_fusion_attention(q, k, v, 2, "BNSD", atten_mask=torch.ones(sq, skv, dtype=torch.bool).triu(1),
                                     sparse_mode=0, next_tockens=0, scale=0.5)
    assert torch.equal(left_up[0], left_full[0])


@pytest.mark.parametrize("mode", [0, 2, 3, 4])
def test_tnd_varlen_equals_per_document_loop(mode):
    n, g, d = 4, 2, 4
    q_lens, kv_lens = [3, 1, 4], [3, 2, 5]
    tq, tk = sum(q_lens), sum(kv_lens)
    gen = torch.Generator().manual_seed(mode)
    q = torch.randn(tq, n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(tk, g, d, generator=gen, dtype=torch.float64)
    v = torch.randn(tk, g, d, generator=gen, dtype=torch.float64)
    cum = lambda lens: [sum(lens[: i + 1]) for i in range(len(lens))]  # noqa: E731
    if mode == 0:
        mask, kw = torch.rand(4, 5, generator=gen) < 0.3, dict(pre_tockens=MAXT, next_tockens=MAXT)
    else:
        mask, kw = causal_mask_2048(), dict(pre_tockens=2, next_tockens=1)
    out, mx, sm, *_ = npu_fusion_attention(q, k, v, n, "TND", atten_mask=mask, scale=0.4, sparse_mode=mode,
                                           actual_seq_qlen=cum(q_lens), actual_seq_kvlen=cum(kv_lens), **kw)
    assert out.shape == (tq, n, d) and mx.shape == (tq, n, 8) and sm.shape == (tq, n, 8)
    qs = ks = 0
    for lq, lk in zip(q_lens, kv_lens):
        doc_mask = mask[:lq, :lk] if mode == 0 else mask
        ref = npu_fusion_attention(q[qs:qs + lq][None], k[ks:ks + lk][None], v[ks:ks + lk][None], n, "BSND",
                                   atten_mask=doc_mask, scale=0.4, sparse_mode=mode, **kw)
        torch.testing.assert_close(out[qs:qs + lq], ref[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mx[qs:qs + lq], rearrange(ref[1][0], "n s e -> s n e"), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sm[qs:qs + lq], rearrange(ref[2][0], "n s e -> s n e"), rtol=1e-12, atol=1e-12)
        qs, ks = qs + lq, ks + lk


def test_statistics_give_the_log_sum_exp():
    q, k, v = _qkv(2, 2, 2, 6, 6, 8, torch.float32)
    _, mx, sm, *_ = npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.35,
                                         atten_mask=causal_mask_2048(), sparse_mode=2)
    assert mx.dtype == torch.float32 and sm.dtype == torch.float32
    assert torch.equal(mx, mx[..., :1].expand_as(mx)) and torch.equal(sm, sm[..., :1].expand_as(sm))
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=0.35)[:2]
    torch.testing.assert_close(mx[..., 0] + sm[..., 0].log(), lse, rtol=1e-5, atol=1e-5)


def _grad_case(layout, dtype, keep_prob=1.0, pse=False, mode=2, g=1):
    b, n, s, d = 2, 2, 5, 4
    q, k, v = _qkv(b, n, g, s, s, d, dtype, seed=11)
    bias = torch.randn(1, n, s, s, dtype=dtype, generator=torch.Generator().manual_seed(5)) if pse else None
    tensors = [_to_layout(t, layout).clone().requires_grad_(True) for t in (q, k, v)]
    if bias is not None:
        bias.requires_grad_(True)
    mask = causal_mask_2048() if mode in (2, 3, 4) else None
    return tensors, bias, mask, n


@pytest.mark.parametrize("layout,dtype,keep_prob,pse,g", [
    ("BNSD", torch.float64, 1.0, False, 1), ("BSH", torch.float64, 1.0, True, 2),
    ("SBH", torch.float32, 1.0, False, 2), ("BSND", torch.float64, 0.7, True, 1),
])
def test_autograd_equals_fusion_attention_grad(layout, dtype, keep_prob, pse, g):
    (q, k, v), bias, mask, n = _grad_case(layout, dtype, keep_prob, pse, g=g)
    torch.manual_seed(123)
    out, mx, sm, _, seed, offset, numels = npu_fusion_attention(q, k, v, n, layout, pse=bias, atten_mask=mask,
                                                               scale=0.5, keep_prob=keep_prob, sparse_mode=2)
    assert (numels > 0) == (keep_prob < 1)
    dy = torch.randn_like(out)
    inputs = (q, k, v) + ((bias,) if pse else ())
    auto = torch.autograd.grad(out, inputs, dy)
    dq, dk, dv, dpse = npu_fusion_attention_grad(q, k, v, dy, n, layout, pse=bias, atten_mask=mask, softmax_max=mx,
                                                 softmax_sum=sm, attention_in=out, scale_value=0.5,
                                                 keep_prob=keep_prob, seed=seed, offset=offset, numels=numels,
                                                 sparse_mode=2)
    rtol, atol = TOL[dtype] if dtype == torch.float64 else (1e-4, 1e-5)
    for a, b in zip(auto, (dq, dk, dv) + ((dpse,) if pse else ())):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol)
    if not pse:
        assert dpse.numel() == 0


def test_grad_tnd_and_recomputed_statistics():
    n, d, lens = 2, 4, [2, 3]
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(5, n, d, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kw = dict(atten_mask=causal_mask_2048(), sparse_mode=3, actual_seq_qlen=[2, 5], actual_seq_kvlen=[2, 5])
    out = npu_fusion_attention(q, k, v, n, "TND", scale=0.5, **kw)[0]
    dy = torch.randn_like(out)
    auto = torch.autograd.grad(out, (q, k, v), dy)
    got = npu_fusion_attention_grad(q, k, v, dy, n, "TND", scale_value=0.5, **kw)[:3]
    for a, b in zip(auto, got):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_fully_masked_rows_are_zero_with_zero_gradients():
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 1, 1, 3, 3, 4, torch.float64))
    user = torch.tensor([[False, True, True], [True, True, True], [False, False, True]])
    out, mx, sm, *_ = npu_fusion_attention(q, k, v, 1, "BNSD", atten_mask=user, sparse_mode=1)
    assert torch.equal(out[0, 0, 1], torch.zeros(4, dtype=torch.float64))
    assert mx[0, 0, 1, 0] == float("-inf") and sm[0, 0, 1, 0] == 0
    dy = torch.ones_like(out)
    auto = torch.autograd.grad(out, (q, k, v), dy)
    got = npu_fusion_attention_grad(q, k, v, dy, 1, "BNSD", atten_mask=user, sparse_mode=1, softmax_max=mx,
                                    softmax_sum=sm, attention_in=out)[:3]
    for a, b in zip(auto, got):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[0][0, 0, 1], torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("pse_type", [0, 1])
def test_explicit_pse_formula(pse_type):
    q, k, v = _qkv(2, 2, 2, 4, 5, 4, torch.float64)
    pse = torch.randn(2, 2, 1, 5, dtype=torch.float64)  # BN1Skv
    out = npu_fusion_attention_v2(q, k, v, 2, "BNSD", pse=pse, scale=0.5, pse_type=pse_type)[0]
    bias = pse * 0.5 if pse_type == 1 else pse  # type 1: scale * (QK + pse)
    torch.testing.assert_close(out, _naive(q, k, v, scale=0.5, bias=bias)[0], rtol=1e-12, atol=1e-12)
    if pse_type == 1:
        v1 = npu_fusion_attention(q, k, v, 2, "BNSD", pse=pse, scale=0.5)[0]
        assert torch.equal(v1, out)


@pytest.mark.parametrize("pse_type", [2, 3])
@pytest.mark.parametrize("q0,k0", [(0, 0), (4, 0), (2, 6)])
def test_generated_alibi_equals_explicit_bias(pse_type, q0, k0):
    n, s = 4, 4
    q, k, v = _qkv(1, n, n, s, s, 4, torch.float64)
    slopes = alibi_slopes(n)
    out = npu_fusion_attention_v2(q, k, v, n, "BNSD", pse=slopes, pse_type=pse_type, scale=0.5,
                                  q_start_idx=[q0], kv_start_idx=[k0])[0]
    bias = torch.empty(1, n, s, s, dtype=torch.float64)
    for h in range(n):
        for i in range(s):
            for j in range(s):
                dist = abs((i + q0) - (j + k0))
                bias[0, h, i, j] = -float(slopes[h]) * (math.sqrt(dist) if pse_type == 3 else dist)
    explicit = npu_fusion_attention_v2(q, k, v, n, "BNSD", pse=bias, pse_type=0, scale=0.5)[0]
    torch.testing.assert_close(out, explicit, rtol=1e-6, atol=1e-6)  # slopes are fp32


def test_alibi_block_offsets_equal_slices_of_the_full_bias():
    """Ring CP: each (q block, kv block) with start offsets sees the slice of the full-sequence bias."""
    n, s, blk = 2, 6, 3
    q, k, v = _qkv(1, n, n, s, s, 4, torch.float64)
    slopes = alibi_slopes(n)
    for qb in range(2):
        for kb in range(2):
            qs, ks = slice(qb * blk, (qb + 1) * blk), slice(kb * blk, (kb + 1) * blk)
            got = npu_fusion_attention_v2(q[:, :, qs], k[:, :, ks], v[:, :, ks], n, "BNSD", pse=slopes, pse_type=2,
                                          scale=0.5, q_start_idx=[qb * blk], kv_start_idx=[kb * blk])
            i = torch.arange(s)
            full_bias = -slopes.double()[:, None, None] * (i[:, None] - i[None, :]).abs()
            ref = _naive(q[:, :, qs], k[:, :, ks], v[:, :, ks], scale=0.5, bias=full_bias[None, :, qs, ks])
            torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)


def test_alibi_slopes_table():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** (-k) for k in range(1, 9)]))
    twelve = [2.0 ** (-k) for k in range(1, 9)] + [2.0 ** (-0.5 - k) for k in range(4)]  # every other slope of n=16
    assert torch.allclose(alibi_slopes(12), torch.tensor(twelve))
    assert alibi_slopes(32).shape == (32,) and math.isclose(float(alibi_slopes(32)[0]), 2.0 ** -0.25, rel_tol=1e-7)


def test_v2_grad_matches_autograd_with_generated_alibi():
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 2, 1, 4, 4, 4, torch.float64))
    kw = dict(pse=alibi_slopes(2), pse_type=2, q_start_idx=[3], kv_start_idx=[1], atten_mask=causal_mask_2048(),
              sparse_mode=3)
    out, mx, sm, *_ = npu_fusion_attention_v2(q, k, v, 2, "BNSD", scale=0.5, **kw)
    dy = torch.randn_like(out)
    auto = torch.autograd.grad(out, (q, k, v), dy)
    got = npu_fusion_attention_grad_v2(q, k, v, dy, 2, "BNSD", scale_value=0.5, softmax_max=mx, softmax_sum=sm,
                                       attention_in=out, **kw)
    for a, b in zip(auto, got[:3]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert got[3].numel() == 0


def test_dropout_replays_and_keeps_the_expected_fraction():
    q, k, v = _qkv(2, 2, 2, 16, 16, 4, torch.float64)
    torch.manual_seed(0)
    a = npu_fusion_attention(q, k, v, 2, "BNSD", keep_prob=0.5)
    torch.manual_seed(0)
    b = npu_fusion_attention(q, k, v, 2, "BNSD", keep_prob=0.5)
    assert a[4] == b[4] and torch.equal(a[0], b[0])
    assert not torch.equal(a[0], npu_fusion_attention(q, k, v, 2, "BNSD")[0])


def test_clear_errors():
    q, k, v = _qkv(1, 2, 2, 4, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="input_layout"):
        npu_fusion_attention(q, k, v, 2, "NSD")
    with pytest.raises(ValueError, match="head_num"):
        npu_fusion_attention(q, k, v, 3, "BNSD")
    with pytest.raises(ValueError, match="triu"):
        npu_fusion_attention(q, k, v, 2, "BNSD", atten_mask=~causal_mask_2048(), sparse_mode=2)
    with pytest.raises(ValueError, match="2048"):
        npu_fusion_attention(q, k, v, 2, "BNSD", atten_mask=torch.ones(4, 4, dtype=torch.bool).triu(1),
                             sparse_mode=3)
    with pytest.raises(NotImplementedError, match="sparse_mode=6"):
        npu_fusion_attention(q, k, v, 2, "BNSD", atten_mask=causal_mask_2048(), sparse_mode=6)
    with pytest.raises(ValueError, match="actual_seq_qlen"):
        npu_fusion_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), 2, "TND")
    with pytest.raises(ValueError, match="keep_prob"):
        npu_fusion_attention(q, k, v, 2, "BNSD", keep_prob=0.0)


@pytest.mark.parametrize("layout", ["SBH", "TND"])
def test_ring_attention_update_merges_blocks_into_full_attention(layout):
    """Attention over KV = [block 1 | block 2] equals the merge of the two blocks' partial results."""
    s, b, n, d = 5, (1 if layout == "TND" else 2), 2, 4
    q, k, v = _qkv(b, n, n, s, 2 * s, d, torch.float64, seed=9)
    conv = (lambda t: rearrange(t, "1 n s d -> s n d")) if layout == "TND" else (lambda t: _to_layout(t, "SBH"))
    kw = dict(actual_seq_qlen=[s], actual_seq_kvlen=[s]) if layout == "TND" else {}
    lay = layout
    parts = [npu_fusion_attention(conv(q), conv(k[:, :, sl]), conv(v[:, :, sl]), n, lay, scale=0.5, **kw)
             for sl in (slice(0, s), slice(s, 2 * s))]
    full_kw = dict(actual_seq_qlen=[s], actual_seq_kvlen=[2 * s]) if layout == "TND" else {}
    full = npu_fusion_attention(conv(q), conv(k), conv(v), n, lay, scale=0.5, **full_kw)
    out, mx, sm = npu_ring_attention_update(parts[0][0], parts[0][1], parts[0][2], parts[1][0], parts[1][1],
                                            parts[1][2], actual_seq_qlen=[s] if layout == "TND" else None,
                                            layout=layout)
    torch.testing.assert_close(out, full[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mx, full[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sm, full[2], rtol=1e-12, atol=1e-12)


def test_ring_attention_update_with_an_empty_block():
    q, k, v = _qkv(1, 1, 1, 3, 6, 4, torch.float64)
    sbh = lambda t: _to_layout(t, "SBH")  # noqa: E731
    blocked = torch.ones(3, 3, dtype=torch.bool)  # block 2 fully masked for every row
    a = npu_fusion_attention(sbh(q), sbh(k[:, :, :3]), sbh(v[:, :, :3]), 1, "SBH")
    e = npu_fusion_attention(sbh(q), sbh(k[:, :, 3:]), sbh(v[:, :, 3:]), 1, "SBH", atten_mask=blocked, sparse_mode=1)
    out, mx, sm = npu_ring_attention_update(*a[:3], *e[:3])
    torch.testing.assert_close(out, a[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(mx, a[1]) and torch.equal(sm, a[2])


@settings(max_examples=8)
@given(sq=st.integers(1, 6), skv=st.integers(1, 6), pre=st.integers(-2, 7), nxt=st.integers(-2, 7),
       mode=st.sampled_from([0, 4]))
def test_band_modes_match_explicit_masks_for_drawn_sizes(sq, skv, pre, nxt, mode):
    q, k, v = _qkv(1, 2, 1, sq, skv, 4, torch.float64, seed=sq * 13 + skv)
    none = torch.zeros(sq, skv, dtype=torch.bool)
    masked = _loop_mask(sq, skv, mode, pre, nxt, none)
    atten_mask = masked if mode == 0 else causal_mask_2048()
    out, mx, sm, *_ = npu_fusion_attention(q, k, v, 2, "BNSD", atten_mask=atten_mask, sparse_mode=mode,
                                           pre_tockens=pre, next_tockens=nxt)
    ref, m, z = _naive(q, k, v, masked)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mx[..., 0], m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sm[..., 0], z, rtol=1e-12, atol=1e-12)
