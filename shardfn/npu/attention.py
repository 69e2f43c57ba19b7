"""Fusion attention with torch_npu's signatures: forward, backward, and the V2 (ALiBi) variant.

The reference computes, per head and query row (FA V1 = V2 with ``pse_type=1``)::

    S = scale * (Q K^T + pse)        # pse_type 1
    S = scale * Q K^T + pse          # pse_type 0, 2, 3 (2/3: ALiBi generated from slopes)
    S[masked] = -inf                 # True = masked (the NPU convention, the opposite of SDPA)
    max = rowmax(S); sum = rowsum(exp(S - max)); P = exp(S - max) / sum
    out = dropout(P, keep_prob) V

in fp32 (float64 for float64 inputs), returning ``out`` in the input dtype and ``max``/``sum``
in the NPU's ``[b, n, sq, 8]`` (TND: ``[t, n, 8]``) layout, eight equal copies per row, as ring
attention's online-softmax merge consumes them. A row with every key masked gives ``out = 0``,
``max = -inf``, ``sum = 0`` and zero gradients. Dropout draws its keep mask from a torch
generator seeded by the returned ``(seed, offset)``: the backward replays it exactly, but the
stream is the reference's own, not Ascend's Philox stream.

``inner_precise``, ``gen_mask_parallel`` and ``sync`` are performance/debug knobs of the kernel
with no effect on the math and are accepted and ignored.
"""
from __future__ import annotations

import torch
from einops import rearrange

from shardfn.npu import _fa_layout as fl
from shardfn.npu._dispatch import npu_op

__all__ = [
    "npu_fusion_attention",
    "npu_fusion_attention_grad",
    "npu_fusion_attention_v2",
    "npu_fusion_attention_grad_v2",
]

MAX_TOKENS = fl.MAX_TOKENS


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _grouped(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    return rearrange(x, "b (g r) s t -> b g r s t", g=num_kv_heads)


def _scores(q: torch.Tensor, k: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    # Query head h reads key/value head h // (Nq / Nkv): contiguous GQA groups.
    qg = rearrange(q, "b (g r) s d -> b g r s d", g=num_kv_heads)
    return rearrange(torch.einsum("bgrsd,bgtd->bgrst", qg, k), "b g r s t -> b (g r) s t")


def _apply_values(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = torch.einsum("bgrst,bgtd->bgrsd", _grouped(p, v.shape[1]), v)
    return rearrange(out, "b g r s d -> b (g r) s d")


def _keep_mask(shape, keep_prob: float, seed: int, offset: int, device) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed((int(seed) * 0x9E3779B1 + int(offset)) % (2**63))
    return torch.rand(shape, generator=gen, device=device) < keep_prob


def _output_to_bnsd(x: torch.Tensor, input_layout: str, num_heads: int) -> torch.Tensor:
    # Attention output / its gradient has the query layout with the value head dim.
    if input_layout == "BSH":
        return rearrange(x, "b s (n d) -> b n s d", n=num_heads)
    if input_layout == "SBH":
        return rearrange(x, "s b (n d) -> b n s d", n=num_heads)
    if input_layout == "BSND":
        return rearrange(x, "b s n d -> b n s d")
    if input_layout == "BNSD":
        return x
    return rearrange(x, "t n d -> 1 n t d")


def _sum_to(x: torch.Tensor, shape) -> torch.Tensor:
    dims = [i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1]
    return x.sum(dim=dims, keepdim=True) if dims else x


def _prepare(op, query, key, value, head_num, input_layout, *, pse, padding_mask, atten_mask, keep_prob,
             pre_tokens, next_tokens, actual_seq_qlen, actual_seq_kvlen, sparse_mode, pse_type,
             q_start_idx, kv_start_idx):
    if padding_mask is not None:
        raise NotImplementedError(f"{op}: padding_mask is not supported (torch_npu does not support it either); "
                                  "express padding through atten_mask.")
    if not 0.0 < float(keep_prob) <= 1.0:
        raise ValueError(f"{op}: keep_prob={keep_prob} must be in (0, 1] (1 - dropout probability).")
    if pse_type not in (0, 1, 2, 3):
        raise ValueError(f"{op}: pse_type={pse_type} must be 0, 1, 2 or 3.")
    q, k, v, geo = fl.to_bnsd(query, key, value, head_num, input_layout, op)
    cdt = _compute_dtype(q, k, v)
    pos = fl.positions(geo, input_layout, actual_seq_qlen, actual_seq_kvlen, q.device, op)
    masked = fl.build_mask(atten_mask, int(sparse_mode), int(pre_tokens), int(next_tokens), geo, pos, op)
    pse_pre = pse_post = None
    if pse is not None:
        if pse_type in (2, 3):
            pse_post = fl.generated_alibi(pse, pse_type, geo, pos, q_start_idx, kv_start_idx, op).to(cdt)
        elif pse_type == 1:
            pse_pre = fl.explicit_pse(pse, geo, pos, op).to(cdt)
        else:
            pse_post = fl.explicit_pse(pse, geo, pos, op).to(cdt)
    return q.to(cdt), k.to(cdt), v.to(cdt), geo, masked, pse_pre, pse_post


def _logits(q, k, geo, scale, pse_pre, pse_post, masked):
    s = _scores(q, k, geo.num_kv_heads)
    if pse_pre is not None:
        s = s + pse_pre
    s = s * scale
    if pse_post is not None:
        s = s + pse_post
    if masked is not None:
        s = s.masked_fill(masked, float("-inf"))
    return s


def _softmax_parts(s: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor) -> torch.Tensor:
    # P = exp(S - max) / sum, with fully masked rows (max = -inf or sum = 0) set to zero.
    valid = torch.isfinite(row_max) & (row_sum > 0)
    shift = torch.where(valid, row_max, torch.zeros_like(row_max))
    denom = torch.where(valid, row_sum, torch.ones_like(row_sum))
    p = torch.exp(s - shift[..., None]) / denom[..., None]
    return torch.where(valid[..., None], p, torch.zeros_like(p))


def _forward(op, query, key, value, head_num, input_layout, *, pse, padding_mask, atten_mask, scale, keep_prob,
             pre_tokens, next_tokens, actual_seq_qlen, actual_seq_kvlen, sparse_mode, pse_type=1,
             q_start_idx=None, kv_start_idx=None):
    q, k, v, geo, masked, pse_pre, pse_post = _prepare(
        op, query, key, value, head_num, input_layout, pse=pse, padding_mask=padding_mask,
        atten_mask=atten_mask, keep_prob=keep_prob, pre_tokens=pre_tokens, next_tokens=next_tokens,
        actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen, sparse_mode=sparse_mode,
        pse_type=pse_type, q_start_idx=q_start_idx, kv_start_idx=kv_start_idx)
    s = _logits(q, k, geo, float(scale), pse_pre, pse_post, masked)  # [b, n, sq, skv]
    row_max = s.detach().amax(dim=-1)
    finite = torch.isfinite(row_max)
    # Softmax is shift invariant, so the detached max changes no gradient.
    e = torch.exp(s - torch.where(finite, row_max, torch.zeros_like(row_max))[..., None])
    row_sum = e.sum(dim=-1)
    # Fully masked rows have e == 0 everywhere: dividing by 1 keeps them at zero, without NaN.
    p = e / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))[..., None]
    seed = offset = numels = 0
    if float(keep_prob) < 1.0:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        numels = p.numel()
        keep = _keep_mask(p.shape, float(keep_prob), seed, offset, p.device)
        p = p * keep / float(keep_prob)
    out = fl.from_bnsd(_apply_values(p, v).to(query.dtype), input_layout)
    stat_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    softmax_max = fl.stats_to_npu(row_max.to(stat_dtype), input_layout)
    softmax_sum = fl.stats_to_npu(row_sum.detach().to(stat_dtype), input_layout)
    softmax_out = torch.empty(0, dtype=query.dtype, device=query.device)
    return out, softmax_max, softmax_sum, softmax_out, seed, offset, numels


def _backward(op, query, key, value, dy, head_num, input_layout, *, pse, padding_mask, atten_mask, softmax_max,
              softmax_sum, attention_in, scale, keep_prob, pre_tokens, next_tokens, seed, offset,
              actual_seq_qlen, actual_seq_kvlen, sparse_mode, pse_type=1, q_start_idx=None, kv_start_idx=None):
    with torch.no_grad():
        q, k, v, geo, masked, pse_pre, pse_post = _prepare(
            op, query, key, value, head_num, input_layout, pse=pse, padding_mask=padding_mask,
            atten_mask=atten_mask, keep_prob=keep_prob, pre_tokens=pre_tokens, next_tokens=next_tokens,
            actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen, sparse_mode=sparse_mode,
            pse_type=pse_type, q_start_idx=q_start_idx, kv_start_idx=kv_start_idx)
        scale = float(scale)
        s = _logits(q, k, geo, scale, pse_pre, pse_post, masked)
        if softmax_max is None or softmax_sum is None:
            row_max = s.amax(dim=-1)
            finite = torch.isfinite(row_max)
            row_sum = torch.exp(s - torch.where(finite, row_max, 0.0)[..., None]).sum(-1)
        else:
            # Given statistics may be the global ones of a ring-attention merge: then P is this
            # block's exact share of the global softmax.
            row_max = fl.stats_from_npu(softmax_max, input_layout, geo, "softmax_max", op).to(s.dtype)
            row_sum = fl.stats_from_npu(softmax_sum, input_layout, geo, "softmax_sum", op).to(s.dtype)
        p = _softmax_parts(s, row_max, row_sum)
        do = _output_to_bnsd(dy, input_layout, geo.num_heads).to(s.dtype)
        keep = None
        if float(keep_prob) < 1.0:
            keep = _keep_mask(p.shape, float(keep_prob), seed, offset, p.device).to(s.dtype) / float(keep_prob)
        pd = p if keep is None else p * keep
        o = (_apply_values(pd, v) if attention_in is None
             else _output_to_bnsd(attention_in, input_layout, geo.num_heads).to(s.dtype))
        d_v = torch.einsum("bgrst,bgrsd->bgtd", _grouped(pd, geo.num_kv_heads),
                           rearrange(do, "b (g r) s d -> b g r s d", g=geo.num_kv_heads))
        d_pd = _scores(do, v, geo.num_kv_heads)  # dO V^T, [b, n, sq, skv]
        d_p = d_pd if keep is None else d_pd * keep
        delta = (do * o).sum(dim=-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP)
        d_s = p * (d_p - delta)
        d_q = scale * _apply_values(d_s, k)
        d_k = scale * torch.einsum("bgrst,bgrsd->bgtd", _grouped(d_s, geo.num_kv_heads),
                                   rearrange(q, "b (g r) s d -> b g r s d", g=geo.num_kv_heads))
        if pse is not None and pse_type in (0, 1):
            d_pse = _sum_to(d_s * scale if pse_type == 1 else d_s, pse.shape).to(pse.dtype)
        else:
            d_pse = torch.empty(0, dtype=query.dtype, device=query.device)
        return (fl.from_bnsd(d_q, input_layout).to(query.dtype), fl.from_bnsd(d_k, input_layout).to(key.dtype),
                fl.from_bnsd(d_v, input_layout).to(value.dtype), d_pse)


@npu_op(("torch_npu", "npu_fusion_attention"))
def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1.0, keep_prob=1.0, pre_tockens=MAX_TOKENS, next_tockens=MAX_TOKENS,
                         inner_precise=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                         sparse_mode=0, gen_mask_parallel=True, sync=False):
    """Run fused softmax attention with torch_npu's signature, layouts, masks and statistics.

    Args:
        query: ``[b, sq, n*d]`` (BSH), ``[sq, b, n*d]`` (SBH), ``[b, sq, n, d]`` (BSND),
            ``[b, n, sq, d]`` (BNSD) or ``[t, n, d]`` (TND, packed documents).
        key: same layout with ``nkv`` heads, ``n % nkv == 0`` (GQA/MQA).
        value: same layout as key; its head dim may differ from query's.
        head_num: number of query heads ``n``.
        input_layout: one of "BSH", "SBH", "BSND", "BNSD", "TND".
        pse: additive position bias, BNSS, BN1Skv or 1NSS, added before the scale:
            ``scale * (QK^T + pse)``.
        padding_mask: unsupported (as on the NPU); must be None.
        atten_mask: bool, True = masked. Modes 0/1: SS, 11SS, B1SS or BNSS (TND: SS over the
            longest documents). Modes 2-4: the compressed ``[2048, 2048]`` causal mask
            (:func:`shardfn.npu.causal_mask_2048`). None disables masking whatever the mode.
        scale: multiplier of the logits, usually ``1/sqrt(d)``.
        keep_prob: dropout keep probability in (0, 1].
        pre_tockens: tokens before the diagonal that stay visible (modes 0 and 4).
        next_tockens: tokens after the diagonal that stay visible (modes 0 and 4).
        inner_precise: kernel precision knob; ignored by the reference.
        prefix: for modes 5/6, which the reference does not implement.
        actual_seq_qlen: TND only: cumulative query lengths, e.g. ``[2, 4, 6]``.
        actual_seq_kvlen: TND only: cumulative key/value lengths.
        sparse_mode: 0 given mask (+ band, top-left origin), 1 given mask, 2 causal top-left,
            3 causal bottom-right, 4 band bottom-right (each per document for TND).
        gen_mask_parallel: dropout-mask scheduling knob; ignored.
        sync: dropout-mask scheduling knob; ignored.

    Returns:
        ``(out, softmax_max, softmax_sum, softmax_out, seed, offset, numels)``: ``out`` in the
        query layout with the value head dim; ``softmax_max``/``softmax_sum`` fp32
        ``[b, n, sq, 8]`` (TND ``[t, n, 8]``), the row max of the masked logits and the row sum
        of ``exp(S - max)``; ``softmax_out`` an empty tensor (reserved on the NPU too); the
        dropout ``seed``, ``offset`` and mask length ``numels`` (zeros when ``keep_prob == 1``).

    Raises:
        ValueError: bad layout, shapes, mask or lengths, naming the argument and the rule.
        NotImplementedError: sparse modes 5-8, padding_mask, compressed ALiBi pse.

    Example:
        >>> q = torch.randn(2, 8, 4 * 16)  # BSH, 4 heads of 16
        >>> out, mx, sm, *_ = npu_fusion_attention(q, q, q, 4, "BSH", scale=0.25,
        ...     atten_mask=causal_mask_2048(), sparse_mode=2, next_tockens=0)
    """
    del inner_precise, prefix, gen_mask_parallel, sync
    return _forward("npu_fusion_attention", query, key, value, head_num, input_layout, pse=pse,
                    padding_mask=padding_mask, atten_mask=atten_mask, scale=scale, keep_prob=keep_prob,
                    pre_tokens=pre_tockens, next_tokens=next_tockens, actual_seq_qlen=actual_seq_qlen,
                    actual_seq_kvlen=actual_seq_kvlen, sparse_mode=sparse_mode)


@npu_op(("torch_npu", "npu_fusion_attention_grad"))
def npu_fusion_attention_grad(query, key, value, dy, head_num, input_layout, *, pse=None, padding_mask=None,
                              atten_mask=None, softmax_max=None, softmax_sum=None, softmax_in=None,
                              attention_in=None, scale_value=1.0, keep_prob=1.0, pre_tockens=MAX_TOKENS,
                              next_tockens=MAX_TOKENS, inner_precise=0, seed=0, offset=0, numels=0, prefix=None,
                              actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True,
                              sync=False):
    """Compute fusion attention's gradients from the forward's statistics (torch_npu signature).

    With ``P = exp(S - softmax_max) / softmax_sum`` (masked entries 0), ``Pd = dropout(P)``,
    ``O = attention_in``: ``dV = Pd^T dy``; ``dS = P * (dP - rowsum(dy * O))`` with
    ``dP = dropout(dy V^T)``; ``dQ = scale dS K``; ``dK = scale dS^T Q`` (summed over each GQA
    group); ``dpse = scale dS`` reduced to pse's shape. The statistics and ``attention_in`` may be
    global ones from a ring-attention merge; then the result is this block's exact share.

    Args:
        query, key, value: as in :func:`npu_fusion_attention`.
        dy: gradient of the attention output, in the output's layout.
        head_num, input_layout, pse, padding_mask, atten_mask, keep_prob, pre_tockens,
            next_tockens, actual_seq_qlen, actual_seq_kvlen, sparse_mode: as in the forward.
        softmax_max, softmax_sum: the forward's statistics (``[b, n, sq, 8]``, TND
            ``[t, n, 8]``); recomputed from q, k when None.
        softmax_in: reserved (unused, as on the NPU).
        attention_in: the forward output; recomputed when None.
        scale_value: the forward's ``scale``.
        seed, offset, numels: the forward's dropout outputs, replayed when ``keep_prob < 1``.
        inner_precise, prefix, gen_mask_parallel, sync: ignored knobs, as in the forward.

    Returns:
        ``(dq, dk, dv, dpse)`` in the input layouts and dtypes; ``dpse`` is an empty tensor when
        ``pse`` is None.
    """
    del softmax_in, inner_precise, numels, prefix, gen_mask_parallel, sync
    return _backward("npu_fusion_attention_grad", query, key, value, dy, head_num, input_layout, pse=pse,
                     padding_mask=padding_mask, atten_mask=atten_mask, softmax_max=softmax_max,
                     softmax_sum=softmax_sum, attention_in=attention_in, scale=scale_value, keep_prob=keep_prob,
                     pre_tokens=pre_tockens, next_tokens=next_tockens, seed=seed, offset=offset,
                     actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen, sparse_mode=sparse_mode)


@npu_op(("mindspeed.ops.fusion_attention_v2", "npu_fusion_attention"))
def npu_fusion_attention_v2(query, key, value, head_num, input_layout, *, pse=None, padding_mask=None,
                            atten_mask=None, scale=1.0, keep_prob=1.0, pre_tokens=MAX_TOKENS, next_tokens=MAX_TOKENS,
                            inner_precise=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                            gen_mask_parallel=True, sync=False, pse_type=1, q_start_idx=None, kv_start_idx=None):
    """Run Fusion Attention V2 (MindSpeed's ``fusion_attention_v2.npu_fusion_attention``).

    Same as :func:`npu_fusion_attention` (note the keyword spelling ``pre_tokens``/
    ``next_tokens``) plus the position-bias type:

    - ``pse_type=1``: ``softmax(mask(scale * (QK^T + pse))) V`` (V1's formula);
    - ``pse_type=0``: ``softmax(mask(scale * QK^T + pse)) V``;
    - ``pse_type=2``: ``pse`` holds fp32 ALiBi slopes ``[n]`` or ``[b, n]`` and the bias
      ``-slope * |(i + q_start_idx) - (j + kv_start_idx)|`` is generated (top-left aligned);
    - ``pse_type=3``: as 2 with the square root of the distance.

    Args:
        q_start_idx: ``[int]``, shifts the generated bias' zero diagonal up by that many rows
            (a ring-attention q block's global offset).
        kv_start_idx: ``[int]``, shifts it left by that many columns (the kv block's offset).
        (others): as in :func:`npu_fusion_attention`.

    Returns:
        The same 7-tuple as :func:`npu_fusion_attention`.
    """
    del inner_precise, prefix, gen_mask_parallel, sync
    return _forward("npu_fusion_attention_v2", query, key, value, head_num, input_layout, pse=pse,
                    padding_mask=padding_mask, atten_mask=atten_mask, scale=scale, keep_prob=keep_prob,
                    pre_tokens=pre_tokens, next_tokens=next_tokens, actual_seq_qlen=actual_seq_qlen,
                    actual_seq_kvlen=actual_seq_kvlen, sparse_mode=sparse_mode, pse_type=pse_type,
                    q_start_idx=q_start_idx, kv_start_idx=kv_start_idx)


@npu_op()
def npu_fusion_attention_grad_v2(query, key, value, dy, head_num, input_layout, *, pse=None, padding_mask=None,
                                 atten_mask=None, softmax_max=None, softmax_sum=None, softmax_in=None,
                                 attention_in=None, scale_value=1.0, keep_prob=1.0, pre_tokens=MAX_TOKENS,
                                 next_tokens=MAX_TOKENS, inner_precise=0, seed=0, offset=0, numels=0, prefix=None,
                                 actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True,
                                 sync=False, pse_type=1, q_start_idx=None, kv_start_idx=None):
    """Backward of :func:`npu_fusion_attention_v2` from given statistics (reference only).

    MindSpeed exposes V2's backward only through autograd, so this op has no native kernel and
    always runs the reference; it exists for ring attention with ALiBi, which needs per-block
    gradients from the merged statistics. Arguments are those of
    :func:`npu_fusion_attention_grad` plus ``pse_type``, ``q_start_idx``, ``kv_start_idx``.

    Returns:
        ``(dq, dk, dv, dpse)``; ``dpse`` is empty for ``pse_type`` 2/3 (slopes get no gradient).
    """
    del softmax_in, inner_precise, numels, prefix, gen_mask_parallel, sync
    return _backward("npu_fusion_attention_grad_v2", query, key, value, dy, head_num, input_layout, pse=pse,
                     padding_mask=padding_mask, atten_mask=atten_mask, softmax_max=softmax_max,
                     softmax_sum=softmax_sum, attention_in=attention_in, scale=scale_value, keep_prob=keep_prob,
                     pre_tokens=pre_tokens, next_tokens=next_tokens, seed=seed, offset=offset,
                     actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen, sparse_mode=sparse_mode,
                     pse_type=pse_type, q_start_idx=q_start_idx, kv_start_idx=kv_start_idx)
