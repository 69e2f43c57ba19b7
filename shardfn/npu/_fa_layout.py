"""Layouts, masks and position bias of torch_npu's fusion attention, as pure tensor functions.

Everything here turns the op's arguments (``input_layout``, ``sparse_mode``, ``atten_mask``,
``pre_tockens``/``next_tockens``, ``actual_seq_qlen``/``actual_seq_kvlen``, ``pse``) into plain
BNSD tensors and one boolean ``masked`` tensor (True = masked, the NPU convention). A varlen (TND)
call becomes a single batch whose documents sit on the block diagonal of the score matrix, so the
math in ``attention.py`` never branches on layout.
"""
from __future__ import annotations

import math

import attrs
import torch
from einops import rearrange

LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
MAX_TOKENS = 2147483647
COMPRESSED_MASK_SIZE = 2048
SUPPORTED_SPARSE_MODES = (0, 1, 2, 3, 4)


@attrs.frozen
class Geometry:
    """Sizes of one call after moving q/k/v to BNSD (TND is one batch of ``T`` tokens)."""

    batch: int
    num_heads: int
    num_kv_heads: int
    seq_q: int
    seq_kv: int
    head_dim: int
    value_head_dim: int


def _err(op: str, msg: str) -> ValueError:
    return ValueError(f"{op}: {msg}")


def to_bnsd(query, key, value, head_num: int, input_layout: str, op: str):
    """Move q, k, v from ``input_layout`` to ``[b, n, s, d]`` and return them with the geometry."""
    if input_layout not in LAYOUTS:
        raise _err(op, f"input_layout={input_layout!r} is not one of {LAYOUTS}. Pass one of them.")
    if not isinstance(head_num, int) or head_num <= 0:
        raise _err(op, f"head_num={head_num!r} must be a positive int (the number of query heads).")
    want_ndim = {"BSH": 3, "SBH": 3, "BSND": 4, "BNSD": 4, "TND": 3}[input_layout]
    bad = [f"{n} has shape {tuple(t.shape)}" for n, t in (("query", query), ("key", key), ("value", value))
           if t.ndim != want_ndim]
    if bad:
        raise _err(op, f"input_layout={input_layout!r} needs {want_ndim}-d query/key/value, but "
                   + "; ".join(bad) + ". Reshape them or pass the matching layout.")
    if input_layout in ("BSH", "SBH"):
        hq, hk, hv = query.shape[-1], key.shape[-1], value.shape[-1]
        if hq % head_num:
            raise _err(op, f"query hidden size {hq} is not divisible by head_num={head_num}.")
        d = hq // head_num
        if hk % d:
            raise _err(op, f"key hidden size {hk} is not a multiple of the head dim {d} (= {hq} / {head_num}).")
        nk = hk // d
        if hv % nk:
            raise _err(op, f"value hidden size {hv} is not divisible by the {nk} key/value heads.")
        pattern = "b s (n d) -> b n s d" if input_layout == "BSH" else "s b (n d) -> b n s d"
        q = rearrange(query, pattern, n=head_num)
        k = rearrange(key, pattern, n=nk)
        v = rearrange(value, pattern, n=nk)
    elif input_layout == "BSND":
        q, k, v = (rearrange(t, "b s n d -> b n s d") for t in (query, key, value))
    elif input_layout == "BNSD":
        q, k, v = query, key, value
    else:  # TND: one batch, documents on the block diagonal
        q, k, v = (rearrange(t, "t n d -> 1 n t d") for t in (query, key, value))
    if q.shape[1] != head_num:
        raise _err(op, f"head_num={head_num} but query has {q.shape[1]} heads in layout {input_layout!r}.")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise _err(op, f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]}) "
                   "(GQA/MQA: Nq/Nkv is an integer).")
    if k.shape[:3] != v.shape[:3]:
        raise _err(op, f"key {tuple(k.shape)} and value {tuple(v.shape)} (as BNSD) differ in batch, heads "
                   "or sequence.")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise _err(op, f"query {tuple(q.shape)} and key {tuple(k.shape)} (as BNSD) differ in batch or head dim.")
    geo = Geometry(batch=q.shape[0], num_heads=q.shape[1], num_kv_heads=k.shape[1], seq_q=q.shape[2],
                   seq_kv=k.shape[2], head_dim=q.shape[3], value_head_dim=v.shape[3])
    return q, k, v, geo


def from_bnsd(x: torch.Tensor, input_layout: str) -> torch.Tensor:
    """Inverse of :func:`to_bnsd` for one ``[b, n, s, d]`` tensor (output or gradient)."""
    if input_layout == "BSH":
        return rearrange(x, "b n s d -> b s (n d)")
    if input_layout == "SBH":
        return rearrange(x, "b n s d -> s b (n d)")
    if input_layout == "BSND":
        return rearrange(x, "b n s d -> b s n d")
    if input_layout == "BNSD":
        return x
    return rearrange(x, "1 n t d -> t n d")


def stats_to_npu(stat: torch.Tensor, input_layout: str) -> torch.Tensor:
    """``[b, n, s]`` row statistic -> the NPU layout: ``[b, n, s, 8]``, or ``[t, n, 8]`` for TND."""
    if input_layout == "TND":
        stat = rearrange(stat, "1 n t -> t n")
    return stat.unsqueeze(-1).expand(*stat.shape, 8).contiguous()


def stats_from_npu(stat: torch.Tensor, input_layout: str, geo: Geometry, name: str, op: str) -> torch.Tensor:
    """The NPU statistic layout back to ``[b, n, s]`` (the 8 copies are equal; copy 0 is used)."""
    want = ((geo.seq_q, geo.num_heads, 8) if input_layout == "TND"
            else (geo.batch, geo.num_heads, geo.seq_q, 8))
    if tuple(stat.shape) != want:
        raise _err(op, f"{name} has shape {tuple(stat.shape)}, expected {want} (the layout the forward "
                   "op returns). Pass the forward's softmax_max/softmax_sum unchanged.")
    stat = stat[..., 0]
    return rearrange(stat, "t n -> 1 n t") if input_layout == "TND" else stat


@attrs.frozen
class Positions:
    """Per-token document ids and in-document positions for q rows and kv columns.

    For non-varlen layouts there is one document per batch row, so ``doc`` is all zeros.
    ``q_len``/``kv_len`` give each q row's document lengths (for right-down origins).
    """

    q_doc: torch.Tensor
    kv_doc: torch.Tensor
    q_pos: torch.Tensor
    kv_pos: torch.Tensor
    q_len: torch.Tensor
    kv_len: torch.Tensor
    is_varlen: bool


def _cumulative(lengths, total: int, name: str, op: str) -> list[int]:
    if lengths is None:
        raise _err(op, f"input_layout='TND' needs {name} (cumulative sequence lengths, e.g. [2, 4, 6]).")
    cum = [int(c) for c in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
    if not cum or any(b < a for a, b in zip([0] + cum, cum)) or cum[0] < 0:
        raise _err(op, f"{name}={cum} must be a non-empty, non-decreasing list of cumulative lengths.")
    if cum[-1] > total:
        raise _err(op, f"{name}[-1]={cum[-1]} exceeds the {total} tokens of the TND tensor.")
    return cum


def _doc_index(cum: list[int], total: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    starts = torch.tensor([0] + cum[:-1], device=device)
    ends = torch.tensor(cum, device=device)
    t = torch.arange(total, device=device)
    # Tokens past the last cumulative length belong to no document (doc id = -1): fully masked.
    doc = torch.searchsorted(ends, t, right=True)
    inside = doc < len(cum)
    doc_c = doc.clamp(max=len(cum) - 1)
    pos = torch.where(inside, t - starts[doc_c], 0)
    length = (ends - starts)[doc_c]
    return torch.where(inside, doc_c, -1), pos, length


def positions(geo: Geometry, input_layout: str, actual_seq_qlen, actual_seq_kvlen, device, op: str) -> Positions:
    """Document ids and positions of every q row and kv column (see :class:`Positions`)."""
    if input_layout != "TND":
        if actual_seq_qlen is not None or actual_seq_kvlen is not None:
            raise _err(op, f"actual_seq_qlen/actual_seq_kvlen are only used with input_layout='TND', got "
                       f"layout {input_layout!r}. Drop them or pack the batch as TND.")
        zq = torch.zeros(geo.seq_q, dtype=torch.long, device=device)
        zk = torch.zeros(geo.seq_kv, dtype=torch.long, device=device)
        return Positions(q_doc=zq, kv_doc=zk, q_pos=torch.arange(geo.seq_q, device=device),
                         kv_pos=torch.arange(geo.seq_kv, device=device), q_len=zq + geo.seq_q,
                         kv_len=zq + geo.seq_kv, is_varlen=False)
    cq = _cumulative(actual_seq_qlen, geo.seq_q, "actual_seq_qlen", op)
    ck = _cumulative(actual_seq_kvlen, geo.seq_kv, "actual_seq_kvlen", op)
    if len(cq) != len(ck):
        raise _err(op, f"actual_seq_qlen has {len(cq)} documents but actual_seq_kvlen has {len(ck)}.")
    q_doc, q_pos, q_len = _doc_index(cq, geo.seq_q, device)
    kv_doc, kv_pos, _ = _doc_index(ck, geo.seq_kv, device)
    kv_lengths = torch.tensor([b - a for a, b in zip([0] + ck[:-1], ck)], device=device)
    kv_len_of_q = kv_lengths[q_doc.clamp(min=0)]
    return Positions(q_doc=q_doc, kv_doc=kv_doc, q_pos=q_pos, kv_pos=kv_pos, q_len=q_len,
                     kv_len=kv_len_of_q, is_varlen=True)


def causal_mask_2048(device=None) -> torch.Tensor:
    """The compressed left-up causal mask torch_npu expects for sparse modes 2, 3 and 4.

    Returns:
        ``[2048, 2048]`` bool, True strictly above the diagonal (True = masked).
    """
    return torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.bool, device=device).triu(1)


def _check_compressed(atten_mask: torch.Tensor, sparse_mode: int, geo: Geometry, op: str) -> None:
    n = COMPRESSED_MASK_SIZE
    if tuple(atten_mask.shape) != (n, n):
        raise _err(op, f"sparse_mode={sparse_mode} needs the compressed {n}x{n} causal atten_mask, got shape "
                   f"{tuple(atten_mask.shape)}. Pass shardfn.npu.causal_mask_2048() (triu(ones, 1), True = masked).")
    # Checking the leading block the call can reach costs O(s^2) like the attention itself,
    # instead of 4M elements per call.
    m = min(n, max(geo.seq_q, geo.seq_kv) + 1)
    block = atten_mask[:m, :m].bool()
    if not torch.equal(block, torch.ones_like(block).triu(1)):
        raise _err(op, f"sparse_mode={sparse_mode}: atten_mask is {n}x{n} but not the upper-triangular causal mask "
                   "triu(ones, diagonal=1). Pass shardfn.npu.causal_mask_2048().")


def _dense_user_mask(atten_mask: torch.Tensor, geo: Geometry, pos: Positions, op: str) -> torch.Tensor:
    if pos.is_varlen:
        # Varlen masks are SS over (max Sq, max Skv), indexed by in-document positions.
        if atten_mask.ndim != 2:
            raise _err(op, f"with input_layout='TND' atten_mask must be 2-d (maxSq, maxSkv), got shape "
                       f"{tuple(atten_mask.shape)}.")
        need = (int(pos.q_pos.max()) + 1 if pos.q_pos.numel() else 0,
                int(pos.kv_pos.max()) + 1 if pos.kv_pos.numel() else 0)
        if atten_mask.shape[0] < need[0] or atten_mask.shape[1] < need[1]:
            raise _err(op, f"atten_mask shape {tuple(atten_mask.shape)} is smaller than the longest documents "
                       f"{need}.")
        return atten_mask.bool()[pos.q_pos[:, None], pos.kv_pos[None, :]][None, None]
    if atten_mask.ndim == 2:
        atten_mask = atten_mask[None, None]
    ok = (atten_mask.ndim == 4 and atten_mask.shape[-2:] == (geo.seq_q, geo.seq_kv)
          and atten_mask.shape[0] in (1, geo.batch) and atten_mask.shape[1] in (1, geo.num_heads))
    if not ok:
        raise _err(op, f"atten_mask shape {tuple(atten_mask.shape)} is not one of SS, 11SS, B1SS, BNSS for "
                   f"B={geo.batch}, N={geo.num_heads}, Sq={geo.seq_q}, Skv={geo.seq_kv}.")
    return atten_mask.bool()


def build_mask(atten_mask, sparse_mode: int, pre_tokens: int, next_tokens: int, geo: Geometry,
               pos: Positions, op: str) -> torch.Tensor | None:
    """The boolean mask (True = masked) broadcastable to ``[b, n, sq, skv]``, or None for none.

    Semantics follow the Ascend FlashAttentionScore sparse modes: without ``atten_mask`` nothing is
    masked whatever the mode; mode 0 uses the full mask plus the pre/next band with its origin at
    the top-left; mode 1 the full mask only; mode 2 causal from the top-left; mode 3 causal from
    the bottom-right; mode 4 the pre/next band from the bottom-right. Varlen applies the same rule
    inside each document and masks every cross-document pair.
    """
    if sparse_mode not in SUPPORTED_SPARSE_MODES:
        raise NotImplementedError(
            f"{op}: sparse_mode={sparse_mode} (prefix / varlen outer-split modes 5-8) has no reference "
            f"implementation; supported modes are {SUPPORTED_SPARSE_MODES}.")
    cross_doc = None
    if pos.is_varlen:
        cross_doc = ((pos.q_doc[:, None] != pos.kv_doc[None, :]) | (pos.q_doc[:, None] < 0))[None, None]
    if atten_mask is None:
        return cross_doc
    i = pos.q_pos[:, None]
    j = pos.kv_pos[None, :]
    shift = (pos.kv_len - pos.q_len)[:, None]  # right-down origin offset per q row
    if sparse_mode in (2, 3, 4):
        _check_compressed(atten_mask, sparse_mode, geo, op)
    if sparse_mode == 0:
        band = (j - i > next_tokens) | (i - j > pre_tokens)
        masked = _dense_user_mask(atten_mask, geo, pos, op) | band[None, None]
    elif sparse_mode == 1:
        masked = _dense_user_mask(atten_mask, geo, pos, op)
    elif sparse_mode == 2:
        masked = (j > i)[None, None]
    elif sparse_mode == 3:
        masked = (j > i + shift)[None, None]
    else:
        rel = j - i - shift
        masked = ((rel > next_tokens) | (rel < -pre_tokens))[None, None]
    return masked if cross_doc is None else masked | cross_doc


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes (Press et al., arXiv 2108.12409) for ``num_heads`` heads, in fp32.

    A power of two ``n`` gives ``2^(-8 (k+1) / n)``; otherwise the slopes of the nearest lower
    power of two ``p`` are followed by every other slope of ``2p``, up to ``n`` in total.
    """
    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (k + 1) / n) for k in range(n)]

    p = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = geometric(p) + geometric(2 * p)[0::2][: num_heads - p]
    return torch.tensor(slopes, dtype=torch.float32)


def generated_alibi(slopes: torch.Tensor, pse_type: int, geo: Geometry, pos: Positions, q_start_idx,
                    kv_start_idx, op: str) -> torch.Tensor:
    """Fusion Attention V2's in-kernel ALiBi (``pse_type`` 2 or 3) as an explicit fp32 bias.

    ``bias[h, i, j] = -slope_h * |(i + q_start_idx) - (j + kv_start_idx)|`` (type 3 takes the
    square root of the distance). Row 0 aligns with the top-left of ``QK^T``; a positive
    ``q_start_idx`` moves the zero diagonal up, a positive ``kv_start_idx`` moves it left.
    """
    if slopes.ndim == 1:
        slopes = slopes[None]
    if slopes.ndim != 2 or slopes.shape[-1] != geo.num_heads or slopes.shape[0] not in (1, geo.batch):
        raise _err(op, f"pse_type={pse_type} needs fp32 ALiBi slopes of shape [N] or [B, N] with N={geo.num_heads}, "
                   f"B={geo.batch}; got {tuple(slopes.shape)}. Use shardfn.npu.alibi_slopes(N).")
    q0 = int(q_start_idx[0]) if q_start_idx is not None else 0
    k0 = int(kv_start_idx[0]) if kv_start_idx is not None else 0
    dist = ((pos.q_pos[:, None] + q0) - (pos.kv_pos[None, :] + k0)).abs().to(torch.float32)
    if pse_type == 3:
        dist = dist.sqrt()
    return -slopes.to(torch.float32)[:, :, None, None] * dist[None, None]


def explicit_pse(pse: torch.Tensor, geo: Geometry, pos: Positions, op: str) -> torch.Tensor:
    """Check an explicit ``pse`` (BNSS, BN1Skv or 1NSS) and return it broadcastable to BNSS."""
    if pos.is_varlen:
        raise NotImplementedError(f"{op}: an explicit pse with input_layout='TND' (the NPU's compressed "
                                  "ALiBi form) has no reference; use npu_fusion_attention_v2 with pse_type=2.")
    ok = (pse.ndim == 4 and pse.shape[0] in (1, geo.batch) and pse.shape[1] == geo.num_heads
          and pse.shape[2] in (1, geo.seq_q) and pse.shape[3] == geo.seq_kv)
    if not ok:
        if pse.ndim == 4 and pse.shape[2] == 1024 and geo.seq_q > 1024:
            raise NotImplementedError(f"{op}: the compressed ALiBi pse (last 1024 rows) has no reference; "
                                      "pass the full BNSS bias, or use pse_type=2 with slopes.")
        raise _err(op, f"pse shape {tuple(pse.shape)} is not BNSS, BN1Skv or 1NSS for B={geo.batch}, "
                   f"N={geo.num_heads}, Sq={geo.seq_q}, Skv={geo.seq_kv}.")
    return pse
