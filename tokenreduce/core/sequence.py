"""Rebuilding a batch of sequences when some columns are dropped or repeated.

Every count-changing reduction ends here: given, per row, the original columns the new sequence is made
of, gather ``input_ids``, ``attention_mask``, ``labels``, ``mm_token_type_ids`` and position ids, and
left-pad rows to a common length. Rows may keep different numbers of columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def column_index(columns: Sequence[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """Left-padded ``[B, L']`` index of original columns (``-1`` marks padding)."""
    length = max((int(c.numel()) for c in columns), default=0)
    index = torch.full((len(columns), length), -1, dtype=torch.long, device=device)
    for row, cols in enumerate(columns):
        if cols.numel():
            index[row, length - cols.numel() :] = cols.to(index.device)
    return index


def gather_columns(tensor: torch.Tensor, index: torch.Tensor, fill: int | float = 0) -> torch.Tensor:
    """Gather ``tensor[..., b, index[b]]`` along the last dim; ``-1`` entries become ``fill``.

    ``tensor`` is ``[B, L]`` or ``[..., B, L]`` (M-RoPE positions are ``[3, B, L]``).
    """
    safe = index.clamp_min(0).to(tensor.device)
    expanded = safe.expand(*tensor.shape[:-2], *safe.shape)
    out = torch.gather(tensor, -1, expanded)
    pad = (index < 0).to(tensor.device).expand_as(out)
    return out.masked_fill(pad, fill)


def padding_mask(index: torch.Tensor) -> torch.Tensor:
    """Attention mask (1 = token, 0 = padding) of a column index."""
    return (index >= 0).long()
