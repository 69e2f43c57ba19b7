"""Shared oracle, tolerance table and strategies for the context-parallel tests (tests/property/test_cp_*.py)."""
import torch
from hypothesis import strategies as st

# One tolerance table for the CP tests: (rtol, atol) by dtype of the sharded run, against a
# float64 oracle on the same input values.
TOL = {
    # float64: the merge and the block backward only reorder sums; observed errors are ~1e-15.
    torch.float64: (1e-12, 1e-12),
    # float32: blocks are merged in fp32 with a different summation order than one softmax over
    # the full row, and gradients sum c contributions; observed errors are ~1e-6.
    torch.float32: (2e-5, 2e-5),
}

CP_SIZES = (2, 3, 4)


def reference_attention(q, k, v, *, causal=False, keep=None):
    """softmax(q k^T / sqrt(d)) v in float64 with k/v heads repeated for GQA (independent oracle)."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    if causal:
        keep_c = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril()
        keep = keep_c if keep is None else keep & keep_c
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, -1)
    if keep is not None:  # rows that keep nothing give 0 (as a merge with no keys would)
        p = torch.nan_to_num(p, nan=0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def document_keep_ref(cu_seqlens, s):
    """Block-diagonal bool [s, s] of packed documents, from an explicit loop."""
    keep = torch.zeros(s, s, dtype=torch.bool)
    cu = [int(c) for c in cu_seqlens]
    for a, b in zip(cu, cu[1:]):
        keep[a:b, a:b] = True
    return keep


def qkv(b, s, h, g, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(b, s, n, d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
        for n in (h, g, g)
    )


def assert_matches_reference(out, q, k, v, ref_fn, *, dtype, seed=1):
    """Output and dq, dk, dv of `out` (a function of q, k, v) equal the float64 oracle's."""
    ref_inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = ref_fn(*ref_inputs)
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), cot.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, ref_inputs, cot)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, msg=lambda m, n=name: f"d{n}: {m}")


@st.composite
def gqa_heads(draw, multiple_of=1, max_kv=2, max_rep=2):
    """(h, g): g k/v heads, h = g * rep query heads, h a multiple of `multiple_of`."""
    g = draw(st.integers(1, max_kv))
    rep = draw(st.integers(1, max_rep))
    h = g * rep
    if h % multiple_of:
        rep *= multiple_of
        h = g * rep
    return h, g
