"""Per-block attention with LSE, the merge rule, and the block backward (shardfn.primitives.block_attention)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardfn.primitives.block_attention import (
    block_backward,
    block_forward,
    document_keep,
    local_attention,
    merge_attention,
)
from tests.property.cp_helpers import TOL, assert_matches_reference, document_keep_ref, qkv, reference_attention


def _split_points(draw, s):
    return sorted(draw(st.lists(st.integers(0, s), min_size=1, max_size=3)))


@settings(max_examples=8)
@given(st.data())
def test_merge_of_key_blocks_equals_attention_over_all_keys(data):
    b, h, d = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
    sq, sk = data.draw(st.integers(1, 5)), data.draw(st.integers(2, 8))
    q, k, v = (t.detach() for t in qkv(b, sq, h, h, d, torch.float64))
    k = torch.randn(b, sk, h, d, dtype=torch.float64)
    v = torch.randn(b, sk, h, d, dtype=torch.float64)
    cuts = [0] + _split_points(data.draw, sk) + [sk]
    out = torch.zeros(b, sq, h, d, dtype=torch.float64)
    lse = torch.full((b, h, sq), float("-inf"), dtype=torch.float64)
    for a, e in zip(cuts, cuts[1:]):
        if e > a:
            out, lse = merge_attention(out, lse, *block_forward(q, k[:, a:e], v[:, a:e], scale=d ** -0.5))
    torch.testing.assert_close(out, reference_attention(q, k, v), rtol=1e-12, atol=1e-12)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * d ** -0.5
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=1e-12, atol=1e-12)


def test_merge_rule_equals_running_max_and_sum_form():
    # FEATURES.md 12: m = max(m1, m2); l = l1 e^(m1-m) + l2 e^(m2-m); o = o1 l1 e^(m1-m)/l + o2 l2 e^(m2-m)/l
    gen = torch.Generator().manual_seed(3)
    o1, o2 = torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64).unbind(0)
    m1, m2 = torch.randn(2, 1, 3, 5, generator=gen, dtype=torch.float64).unbind(0)
    l1, l2 = torch.rand(2, 1, 3, 5, generator=gen, dtype=torch.float64).add(0.1).unbind(0)
    o1, o2 = o1[None], o2[None]
    m = torch.maximum(m1, m2)
    l = l1 * torch.exp(m1 - m) + l2 * torch.exp(m2 - m)
    w1 = (l1 * torch.exp(m1 - m) / l).permute(0, 2, 1)[..., None]
    w2 = (l2 * torch.exp(m2 - m) / l).permute(0, 2, 1)[..., None]
    out, lse = merge_attention(o1, m1 + torch.log(l1), o2, m2 + torch.log(l2))
    torch.testing.assert_close(out, o1 * w1 + o2 * w2, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(lse, m + torch.log(l), rtol=1e-13, atol=1e-14)


def test_merge_with_an_empty_side_is_exact_and_both_empty_stays_empty():
    o = torch.randn(1, 2, 1, 3, dtype=torch.float64)
    lse = torch.randn(1, 1, 2, dtype=torch.float64)
    empty_o, empty_l = torch.zeros_like(o), torch.full_like(lse, float("-inf"))
    got_o, got_l = merge_attention(empty_o, empty_l, o, lse)
    assert torch.equal(got_o, o) and torch.equal(got_l, lse)
    got_o, got_l = merge_attention(empty_o, empty_l, empty_o, empty_l)
    assert torch.equal(got_o, empty_o) and bool(torch.isneginf(got_l).all())


def test_fully_masked_rows_give_zero_output_and_minus_inf_lse():
    q, k, v = (t.detach() for t in qkv(1, 3, 2, 1, 2, torch.float64))
    keep = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])
    out, lse = block_forward(q, k, v, scale=0.5, keep=keep)
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    assert bool(torch.isneginf(lse[:, :, 1]).all()) and bool(torch.isfinite(lse[:, :, [0, 2]]).all())


@settings(max_examples=8)
@given(st.integers(1, 2), st.integers(1, 6), st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]), st.integers(1, 3),
       st.booleans(), st.sampled_from([torch.float64, torch.float32]))
def test_local_attention_forward_and_backward_equal_reference(b, s, heads, d, causal, dtype):
    h, g = heads
    q, k, v = qkv(b, s, h, g, d, dtype)
    keep = torch.ones(s, s, dtype=torch.bool).tril() if causal else None
    out = local_attention(q, k, v, keep=keep)
    assert out.dtype == dtype
    assert_matches_reference(out, q, k, v, lambda q, k, v: reference_attention(q, k, v, causal=causal), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("path", ["flash", "explicit"])
def test_block_backward_shares_sum_to_the_full_gradient(path, dtype):
    # dq, dk, dv of attention over keys [0, s) = sum over key blocks of block_backward with the final out and lse.
    # keep=None runs torch's CPU flash kernel; an all-True keep forces the explicit path.
    q, k, v = (t.detach() for t in qkv(2, 4, 4, 2, 3, dtype))
    scale = 3 ** -0.5

    def keep(sk):
        return None if path == "flash" else torch.ones(4, sk, dtype=torch.bool)

    out, lse = block_forward(q, k, v, scale=scale, keep=keep(4))
    dout = torch.randn_like(out)
    parts = [block_backward(q, k[:, a:e], v[:, a:e], dout, out, lse, scale=scale, keep=keep(e - a))
             for a, e in ((0, 1), (1, 4))]
    ref_in = [t.double().requires_grad_(True) for t in (q, k, v)]
    want = torch.autograd.grad(reference_attention(*ref_in), ref_in, dout.double())
    rtol, atol = TOL[dtype]
    torch.testing.assert_close((parts[0][0] + parts[1][0]).double(), want[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]], 1).double(), want[1], rtol=rtol, atol=atol)
    torch.testing.assert_close(torch.cat([parts[0][2], parts[1][2]], 1).double(), want[2], rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_flash_and_explicit_block_paths_agree(dtype):
    q, k, v = (t.detach() for t in qkv(1, 5, 4, 2, 3, dtype))
    o_f, l_f = block_forward(q, k, v, scale=0.4, causal=True)
    o_e, l_e = block_forward(q, k, v, scale=0.4, keep=torch.ones(5, 5, dtype=torch.bool).tril())
    assert o_f.dtype == l_f.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)  # never bf16
    rtol, atol = TOL[torch.float64 if dtype == torch.float64 else torch.float32]
    torch.testing.assert_close(o_f, o_e, rtol=rtol, atol=atol)
    torch.testing.assert_close(l_f, l_e, rtol=rtol, atol=atol)


def test_document_keep_is_block_diagonal_causal():
    cu = torch.tensor([0, 2, 3, 7])
    assert torch.equal(document_keep(cu, 7, causal=False), document_keep_ref(cu, 7))
    lower = torch.ones(7, 7, dtype=torch.bool).tril()
    assert torch.equal(document_keep(cu, 7, causal=True), document_keep_ref(cu, 7) & lower)
    # tokens past the last document keep nothing
    assert not bool(document_keep(cu, 9, causal=True)[7:].any())
