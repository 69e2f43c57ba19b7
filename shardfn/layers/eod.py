"""EOD reset (FEATURES.md 55): position ids and document boundaries of a packed sequence."""
from __future__ import annotations

import torch

__all__ = ["eod_reset"]


def eod_reset(tokens: torch.Tensor, eod_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(position_ids, cu_seqlens)`` for packed documents separated by EOD tokens.

    A document ends at each EOD (inclusive) and at the end of the sequence; positions restart
    at 0 after each EOD.

    Args:
      tokens: int tensor `[s]`.
      eod_id: the end-of-document token id.

    Returns:
      ``position_ids``: int64 `[s]`; ``cu_seqlens``: int32 `[n + 1]`, flash-attn's convention
      (0, then each document's end, last = s).

    Example:
      >>> eod_reset(torch.tensor([5, 0, 7, 8, 0, 9]), 0)
      (tensor([0, 1, 0, 1, 2, 0]), tensor([0, 2, 5, 6], dtype=torch.int32))
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        raise ValueError(
            f"eod_reset: tokens must be a 1-d tensor [s], got {getattr(tokens, 'shape', type(tokens).__name__)}."
            " Call it once per row of a batch."
        )
    s = tokens.shape[0]
    ends = (torch.nonzero(tokens == eod_id).flatten() + 1).tolist()
    if not ends or ends[-1] != s:
        ends.append(s)
    bounds = [0] + ends if s else [0]
    cu = torch.tensor(bounds, dtype=torch.int32, device=tokens.device)
    idx = torch.arange(s, device=tokens.device)
    lengths = (cu[1:] - cu[:-1]).long()
    starts = torch.repeat_interleave(cu[:-1].long(), lengths)
    return idx - starts, cu
