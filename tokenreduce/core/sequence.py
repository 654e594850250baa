"""The one place where the sequence an LLM reads is edited: columns, masks, positions, labels, decode steps.

Every count-changing reduction ends here, whichever stage makes it:

* **columns**: a sequence is rebuilt from, per row, the original columns it is made of (a column dropped,
  or repeated where a method keeps a token twice), left-padded to a common length: a ``[B, L']`` column
  index with ``-1`` for padding (:func:`column_index`, :func:`row_index`, :func:`one_row_index`,
  :func:`repeat_index`), and every per-token tensor gathered through it (:func:`gather_columns` for
  ``[..., B, L]`` ids, masks, labels and positions, :func:`gather_tokens` for ``[B, L, D]`` states and
  rotary tables, :class:`Columns` for many tensors through one index); the projector stage rebuilds the caller's inputs (:func:`gather_inputs`), the LLM stage
  the sequence between decoder layers, DocOwl its one-placeholder-per-crop prompts;
* **positions**: plain text positions, renumbered ones, a decode step's, and a prompt's continuation
  (:func:`continued_positions`); M-RoPE families take the same positions on each of their rotary axes,
  which the adapter names (``Adapter.position_axes``) and :func:`rope_positions` applies;
* **attention masks**: the 2-D padding mask of a prefill or a decode step under any cache (a static cache
  keeps its length on the device: nothing here reads it on the host in a decode step), and the 4-D causal
  mask of a pruned stage taken from the previous stage's (:func:`gathered_causal_mask`);
* **labels**: gathered with ``-100`` (:data:`IGNORE_INDEX`) at padding.

Nothing here imports the rest of the package: adapters and the core both build on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

# Label of a column no loss is computed for (padding, visual tokens), as transformers' losses ignore it.
IGNORE_INDEX = -100


# ----- columns -------------------------------------------------------------------------------------------
def column_index(columns: Sequence[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """Left-padded ``[B, L']`` index of original columns (``-1`` marks padding)."""
    length = max((int(c.numel()) for c in columns), default=0)
    index = torch.full((len(columns), length), -1, dtype=torch.long, device=device)
    for row, cols in enumerate(columns):
        if cols.numel():
            index[row, length - cols.numel() :] = cols.to(index.device)
    return index


class Columns:
    """A column index to gather through, with its clamped form and its padding worked out once: one row's
    ``[L']`` (no padding: plain selects) or several rows' left-padded ``[B, L']`` (``-1``: padding). A
    rebuild gathers many tensors through one index."""

    __slots__ = ("index", "pad", "safe")

    def __init__(self, index: torch.Tensor):
        self.index = index
        if index.dim() == 1:
            self.safe, self.pad = index, None
        else:
            self.safe, self.pad = index.clamp_min(0), index < 0

    def take(self, tensor: torch.Tensor, fill: int | float = 0) -> torch.Tensor:
        """``tensor`` (``[B, L]``, or ``[..., B, L]``: M-RoPE positions are ``[3, B, L]``) at the columns,
        ``fill`` at padding."""
        safe = self.safe if self.safe.device == tensor.device else self.safe.to(tensor.device)
        if self.pad is None:
            return tensor.index_select(-1, safe)
        out = torch.gather(tensor, -1, safe.expand(*tensor.shape[:-2], *safe.shape))
        return out.masked_fill(self.pad.to(tensor.device).expand_as(out), fill)

    def tokens(self, states: torch.Tensor) -> torch.Tensor:
        """Per-token states ``[B, L, D]`` at the columns (padding reads column 0, which its mask hides)."""
        return gather_tokens(states, self.safe)


def gather_columns(tensor: torch.Tensor, index: torch.Tensor, fill: int | float = 0) -> torch.Tensor:
    """Gather ``tensor[..., b, index[b]]`` along the last dim through a ``[B, L']`` index; ``-1`` entries
    become ``fill``. ``tensor`` is ``[B, L]`` or ``[..., B, L]`` (M-RoPE positions are ``[3, B, L]``)."""
    return Columns(index).take(tensor, fill)


def take_columns(tensor: torch.Tensor, index: torch.Tensor, fill: int | float = 0) -> torch.Tensor:
    """``tensor[..., index]`` for a one-row index ``[L']`` (no padding: ``fill`` is unused), else
    :func:`gather_columns` for a left-padded ``[B, L']`` one."""
    return Columns(index).take(tensor, fill)


def gather_tokens(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``states[b, index[b]]`` of per-token states ``[B, L, D]`` (hidden states, rotary tables): ``[B, L', D]``.

    ``index`` is ``[B, L']`` with no ``-1`` (clamp a padded index first: padding then reads column 0, which
    its mask hides), or ``[L']`` for every row alike."""
    if index.dim() == 1:
        return states.index_select(1, index)
    if index.shape[0] == 1 and states.shape[0] == 1:  # one row: a plain select (fewer ops than a gather)
        return states.index_select(1, index[0])
    return torch.gather(states, 1, index[..., None].expand(-1, -1, states.shape[-1]))


def padding_mask(index: torch.Tensor) -> torch.Tensor:
    """Attention mask (1 = token, 0 = padding) of a column index."""
    return (index >= 0).long()


def repeat_index(copies: torch.Tensor, lengths: Sequence[int] | None = None) -> torch.Tensor:
    """The left-padded ``[B, L']`` column index of rows where column ``c`` of row ``b`` appears ``copies[b, c]``
    times, in order. ``lengths``: each row's ``copies`` sum when the host knows it (else it is read)."""
    batch, length = copies.shape
    if lengths is None:
        lengths = copies.sum(1).tolist()
    width = max(lengths, default=0)
    index = torch.full((batch, width), -1, dtype=torch.long, device=copies.device)
    columns = torch.arange(length, device=copies.device)
    for r, n in enumerate(lengths):
        index[r, width - n :] = torch.repeat_interleave(columns, copies[r], output_size=n)
    return index


def one_row_index(
    length: int, placeholders: Sequence[torch.Tensor], kept: Sequence[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The ``[L']`` original column of each column of a rebuilt row of ``length`` columns (its padding kept),
    and where each item's tokens land in it.

    ``placeholders``: per modality, the columns of its visual placeholders (every other column is text and
    stays); ``kept``: per item, the original columns it keeps, ascending (a column kept twice lands twice,
    consecutively). One stable sort of (text columns, kept columns); the sort's inverse places every kept
    token. All sizes come from shapes: the host reads nothing."""
    placeholder = torch.zeros(length, dtype=torch.bool, device=device)
    for cols in placeholders:
        placeholder.index_fill_(0, cols, True)
    n_text = length - sum(int(c.shape[0]) for c in placeholders)
    text = torch.nonzero_static(~placeholder, size=n_text).view(-1)
    index, order = torch.sort(torch.cat([text, *kept]), stable=True)
    where = torch.empty_like(order).index_put_((order,), torch.arange(order.numel(), device=order.device))
    landed, at = [], n_text
    for cols in kept:
        landed.append(where[at : at + cols.numel()])
        at += cols.numel()
    return index, landed


def row_index(
    attention_mask: torch.Tensor, placeholders: Sequence[torch.Tensor], kept: Sequence[tuple[int, torch.Tensor]],
    text_counts: Sequence[int],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The ``[B, L']`` original column of each column of rebuilt rows (``-1``: left padding; the caller's
    padding dropped), and where each item's tokens land.

    ``placeholders``: per modality, the ``[T, 2]`` (row, column) of its placeholders; ``kept``: per item, its
    row and the original columns it keeps, ascending; ``text_counts``: each row's text tokens. Every row's
    length is known on the host from them, so the index is built without reading the device."""
    # How many times each original column appears in the new sequence: once for a text column, as often
    # as the method kept it for a visual one.
    copies = (attention_mask != 0).long()
    lengths = list(text_counts)
    for coords in placeholders:
        copies[coords[:, 0], coords[:, 1]] = 0
    for row, cols in kept:
        copies[row].index_add_(0, cols, torch.ones_like(cols))
        lengths[row] += cols.numel()
    index = repeat_index(copies, lengths)
    width = index.shape[1]
    # An item's columns are sorted; a column repeated by the method appears that many times, consecutively.
    before = copies.cumsum(1) - copies
    landed = []
    for row, cols in kept:
        rank = torch.arange(cols.numel(), device=cols.device) - torch.searchsorted(cols, cols)
        landed.append(before[row, cols] + rank + (width - lengths[row]))
    return index, landed


def gather_inputs(inputs: dict[str, Any], columns: Columns, pad_id: int) -> dict[str, Any]:
    """The per-token inputs of a call other than masks and positions, at ``columns``: ``input_ids`` (padding
    ``pad_id``), ``labels`` (padding :data:`IGNORE_INDEX`), ``mm_token_type_ids`` / ``token_type_ids``
    (padding 0); the rest as given."""
    out = dict(inputs)
    if inputs.get("input_ids") is not None:
        out["input_ids"] = columns.take(inputs["input_ids"], pad_id)
    if inputs.get("labels") is not None:
        out["labels"] = columns.take(inputs["labels"], IGNORE_INDEX)
    for key in ("mm_token_type_ids", "token_type_ids"):
        if inputs.get(key) is not None:
            out[key] = columns.take(inputs[key], 0)
    return out


def scatter_tokens(length: int, pieces: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Per-token states put back at their original columns: ``[B, length, D]``, each ``(columns [B, L'],
    states [B, L', D])`` of ``pieces`` written in turn (a later piece overwrites a column an earlier one
    holds; ``-1`` columns are dropped, a column no piece holds is zero).

    Every padding slot goes to one spare column that is cut off: no boolean indexing, so the host does not
    wait for the device. Whole rows are copied (``index_copy_`` over the flattened rows: ~6x faster on the
    CPU than an element-wise ``scatter_`` with the index expanded over the hidden size)."""
    first = pieces[0][1]
    batch, width = first.shape[0], first.shape[-1]
    full = first.new_zeros(batch, length + 1, width)
    offsets = torch.arange(batch, device=first.device)[:, None] * (length + 1)
    for cols, states in pieces:
        target = cols.remainder(length + 1) + offsets  # -1 -> the row's spare column
        full.view(-1, width).index_copy_(0, target.flatten(), states.reshape(-1, width).to(full.dtype))
    return full[:, :length]


# ----- positions -----------------------------------------------------------------------------------------
def text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1`` with padding at 0, as ``generate`` computes position ids."""
    mask = attention_mask if attention_mask.dtype == torch.long else attention_mask.long()
    positions = mask.cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def renumbered_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Consecutive positions of a pruned sequence, padding not counted: ``cumsum(mask) - 1``, at least 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def rope_positions(positions: torch.Tensor, axes: int) -> torch.Tensor:
    """``[B, L]`` positions as a family with ``axes`` rotary axes reads them: as they are for one axis, the
    same positions on every axis (``[axes, B, L]``) for M-RoPE (t/h/w); per-axis positions pass as given."""
    if axes == 1 or positions.dim() == 3:
        return positions
    return positions[None].expand(axes, *positions.shape)


def next_positions(positions: torch.Tensor) -> torch.Tensor:
    """``[B]``: the position of the token after a prompt whose ``[B, L]`` positions are given (past the largest
    one: with M-RoPE or kept original positions the last column need not hold it)."""
    return positions.max(dim=-1).values + 1


def continued_positions(start: torch.Tensor, offset: int, length: int) -> torch.Tensor:
    """``[B, length]`` positions of ``length`` new tokens, ``offset`` tokens after the prompt's end, each row
    counting on from its ``start`` (:func:`next_positions`)."""
    return start[:, None] + offset + torch.arange(length, device=start.device)[None]


# ----- attention masks and decode steps under any cache (the llm stage, static caches, torch.compile) -----
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


def decode_mask(kept: torch.Tensor, given: Any, prompt_length: int, key_length: int) -> torch.Tensor:
    """The 2-D mask of a pruned stage's keys in a decode step: the stage's ``kept`` prompt mask ``[B, L']``
    followed by the mask of the ``key_length - L'`` tokens after the prompt, taken from the text model's 2-D
    ``given`` mask past its ``prompt_length`` original prompt columns (all real without one)."""
    extra = key_length - kept.shape[1]
    given = padding_mask_2d(given)
    if given is not None:
        tail = given[:, prompt_length:][:, :extra]
    else:
        tail = kept.new_ones(kept.shape[0], extra)
    return torch.cat([kept, tail.to(kept)], dim=1)


def full_causal(config: Any, layer: int) -> bool:
    """Whether ``layer`` of a text model with ``config`` attends causally to every earlier token (no window)."""
    types = getattr(config, "layer_types", None)
    return types is None or types[layer] == "full_attention"


def causal_mask_builder(config: Any, layer: int) -> Callable[..., Any]:
    """transformers' builder of ``layer``'s mask: sliding-window for a sliding-attention layer, else causal."""
    # Imported here: masking_utils pulls in torch._dynamo, seconds at `import tokenreduce` time.
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    types = getattr(config, "layer_types", None)
    if types is not None and types[layer] == "sliding_attention":
        return create_sliding_window_causal_mask
    return create_causal_mask


def gathered_causal_mask(prior: Any, length: int, kept: torch.Tensor) -> tuple[Any] | None:
    """The full causal prefill mask of a one-row sequence cut to its ``kept`` columns, from ``prior``, the
    mask of the ``length`` columns before the cut: ``(mask,)``, or None where it cannot be taken from it.

    A full causal mask is ``causal(q, k) and not padding(k)`` entry by entry and kept columns keep their
    order, so its rows and columns at the kept columns are the mask the builder would make (two index ops
    instead of building it). ``prior`` None (no padding, causal: the builder skips the mask) gives
    ``(None,)``; a 2-D or block mask, or one of another size, gives None."""
    if prior is None:
        return (None,)
    if not torch.is_tensor(prior) or prior.dim() != 4 or prior.shape[-2:] != (length, length):
        return None
    return (prior.index_select(-2, kept).index_select(-1, kept),)


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
