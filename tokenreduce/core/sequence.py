"""Rebuilding a batch of sequences when some columns are dropped or repeated.

Every count-changing reduction ends here: given, per row, the original columns the new sequence is made
of, gather ``input_ids``, ``attention_mask``, ``labels``, ``mm_token_type_ids`` and position ids, and
left-pad rows to a common length. Rows may keep different numbers of columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


def select_columns(tensor: torch.Tensor, index: torch.Tensor, fill: int = 0) -> torch.Tensor:
    """``tensor[..., index]`` for a one-row rebuild (``index`` ``[L']``, no padding: ``fill`` is unused)."""
    return tensor.index_select(-1, index if index.device == tensor.device else index.to(tensor.device))


# ----- positions
def text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1`` with padding at 0, as ``generate`` computes position ids."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


# ----- the llm stage under any cache and under torch.compile ---------------------------------------------
def padding_mask_2d(mask: Any) -> torch.Tensor | None:
    """The text model's ``attention_mask`` when it is a 2-D padding mask; None for a prepared 4-D mask or a
    per-layer-type dict (what ``generate`` builds up front for a static cache), or no mask."""
    return mask if torch.is_tensor(mask) and mask.dim() == 2 else None


def prefill_padding_mask(given: Any, prepared: torch.Tensor | None, rows: int, length: int) -> torch.Tensor | None:
    """The 2-D padding mask of a prefill of ``rows x length`` tokens: the text model's own when it got one,
    else the one the handle prepared (the caller's rows, repeated for ``generate``'s beams; columns past it,
    assisted decoding's candidates, are real tokens), else None (every token real)."""
    mask = padding_mask_2d(given)
    if mask is not None or prepared is None or rows % prepared.shape[0]:
        return mask
    mask = prepared.repeat_interleave(rows // prepared.shape[0], dim=0)
    if mask.shape[1] < length:
        mask = torch.cat([mask, mask.new_ones(rows, length - mask.shape[1])], dim=1)
    return mask[:, :length]


def is_empty_cache(cache: Any, layer: int) -> bool:
    """Whether ``cache`` holds nothing yet at ``layer`` (a prefill). Reads a static cache's counter from the
    device: called once per prepared call, never in the decode steps ``generate`` may compile."""
    return cache is None or bool(cache.get_seq_length(layer) == 0)


def decode_key_length(cache: Any, query: int, layer: int) -> int:
    """Columns of the 2-D mask for a decode step at ``layer``: the layer's keys after the step; for a static
    cache (its counter lives on the device) its fixed length, so that no shape depends on the step."""
    if cache is None:
        return query
    length = cache.get_seq_length(layer)
    if torch.is_tensor(length):
        return int(cache.get_mask_sizes(query, layer)[0])
    return length + query


def decode_positions(mask2d: torch.Tensor, cache: Any, query: int, layer: int) -> torch.Tensor:
    """Consecutive positions (padding not counted) of a decode step's ``query`` tokens at ``layer``: the
    count of real tokens before each, read at the layer's offset (a tensor in a static cache: no host read)."""
    offset = 0 if cache is None else cache.get_seq_length(layer)
    columns = torch.arange(query, device=mask2d.device) + offset
    return (mask2d.long().cumsum(-1) - 1).index_select(1, columns)


def cache_length(cache: Any) -> int:
    """Tokens held by a transformers ``Cache`` or legacy ``((k, v), ...)`` tuples (0 when empty / None)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:
        return int(cache[0][0].shape[2])
    except (IndexError, TypeError, AttributeError):
        return 0
