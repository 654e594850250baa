"""Continuing a conversation from the cache a wrapped ``generate`` returned.

A reducing call's cache holds the sequence the LLM read, not the caller's: with a method acting before the
LLM every layer holds the reduced prompt (``L'`` columns for the caller's ``L``), with an in-LLM method the
layers from the first pruning layer on hold fewer columns than the ones before it. The caller continues as
with the plain model: ``generate(input_ids=previous sequences + new text, past_key_values=cache)``.

``generate`` leaves on the cache it returns a :class:`ReducedPrompt`: the caller's prompt ids (to check
that a continuation extends them) and the LLM-input tensors of the prompt (``input_ids``, the attention
mask, position ids, token types), when they differ from the caller's. A continuation is then mapped onto
the cache: the cached prompt's tensors, followed by the caller's columns after the prompt, whose positions
continue from the prompt's last one as ``generate``'s own decode steps do. The in-LLM stage keeps its
per-layer masks on the cache too (:mod:`tokenreduce.core.llm`), so every layer finds its own length.

Refused, in one line each: a continuation whose ids do not begin with the cached prompt, new pixels (a new
image or video) in a continuation, a conversation begun from ``inputs_embeds``, and pixels given with a
non-empty cache tokenreduce did not produce (reducing them would misalign the cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokenreduce.core.sequence import is_empty_cache

PROMPT_ATTR = "_tokenreduce_prompt"
# Per-column inputs of the LLM that a continuation extends with the caller's columns after the prompt.
COLUMN_KEYS = ("input_ids", "attention_mask", "position_ids", "mm_token_type_ids", "token_type_ids")


@dataclass
class ReducedPrompt:
    """What a wrapped ``generate`` left on the cache it returned.

    Attributes:
        original_ids: ``[B, L]`` the caller's prompt ids (None: the call gave ``inputs_embeds`` only).
        prefix: the LLM-input tensors of the prompt (``COLUMN_KEYS``; ``[.., B, L']``), or None when the LLM
            read the caller's own sequence (in-LLM methods: their cache's first layers hold all of it).
        rope_deltas: Qwen's M-RoPE offsets of the call (``model.model.rope_deltas``), restored for a
            continuation that lets the model compute its positions.
    """

    original_ids: torch.Tensor | None
    prefix: dict[str, torch.Tensor] | None
    rope_deltas: torch.Tensor | None = None


def cache_of(inputs: dict[str, Any]) -> Any:
    return inputs.get("cache", inputs.get("past_key_values"))


def is_empty(cache: Any) -> bool:
    """Whether ``cache`` is absent or holds nothing (a static cache's counter is read from the device)."""
    if cache is None or not hasattr(cache, "get_seq_length"):
        return cache is None
    return is_empty_cache(cache, 0)


def prompt_of(cache: Any) -> ReducedPrompt | None:
    return getattr(cache, PROMPT_ATTR, None) if cache is not None else None


def remember(cache: Any, original_ids: torch.Tensor | None, llm_inputs: dict[str, Any], rebuilt: bool,
             rope_deltas: torch.Tensor | None) -> None:
    """Leave on ``cache`` what a continuation needs (see :class:`ReducedPrompt`); ``llm_inputs`` are the
    inputs the model's ``generate`` got, ``rebuilt`` whether they differ from the caller's."""
    if cache is None:
        return
    prefix = None
    if rebuilt:
        prefix = {k: llm_inputs[k] for k in COLUMN_KEYS if torch.is_tensor(llm_inputs.get(k))}
    deltas = rope_deltas.clone() if torch.is_tensor(rope_deltas) else None
    setattr(cache, PROMPT_ATTR, ReducedPrompt(original_ids, prefix, deltas))


def forget(cache: Any) -> None:
    """Drop the record of a cache a new conversation begins on (a reused, emptied cache)."""
    if cache is not None and getattr(cache, PROMPT_ATTR, None) is not None:
        delattr(cache, PROMPT_ATTR)


def refuse_foreign(inputs: dict[str, Any], has_pixels: bool, entry: str, placeholders: tuple[int, ...]) -> None:
    """Pixels with a non-empty cache tokenreduce did not produce: refused when the cache reaches a visual
    token (it would be read misaligned with the reduced prompt). A cache of text before the first visual
    token (a cached system prompt) lines up with the reduced prompt in ``generate``, which passes the whole
    sequence; ``forward`` gets only the columns after the cache, so it is refused there."""
    cache = cache_of(inputs)
    if not has_pixels or prompt_of(cache) is not None or is_empty(cache):
        return
    ids = inputs.get("input_ids")
    if entry == "generate" and ids is not None:
        visual = torch.zeros_like(ids, dtype=torch.bool)
        for token in placeholders:
            visual |= ids == token
        columns = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        first = int(torch.where(visual, columns, ids.shape[1]).min())
        if int(cache.get_seq_length()) <= first:
            return
    raise ValueError(
        f"`{entry}` got pixel values with a `past_key_values` that tokenreduce did not produce and that holds "
        "visual tokens (or, in `forward`, any tokens): the reduced prompt would not line up with it; pass the "
        "whole conversation with its pixel values and no `past_key_values`, or continue from the cache a wrapped "
        "`generate` returned"
    )


def _expand(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` (``[.., B, L]``) with each row repeated for ``generate``'s ``rows`` copies."""
    batch = tensor.shape[-2]
    if rows == batch:
        return tensor
    return tensor.repeat_interleave(rows // batch, dim=-2)


def continued_inputs(inputs: dict[str, Any], record: ReducedPrompt, pixel_keys: tuple[str, ...]) -> dict[str, Any]:
    """The caller's continuation (``input_ids`` = the cached prompt + later columns) as the cache reads it:
    the cached prompt's LLM inputs, then the caller's columns after the prompt."""
    entry = "generate"
    if record.original_ids is None:
        raise ValueError(
            f"`{entry}` cannot continue from `past_key_values` of a conversation begun from `inputs_embeds`: "
            "the cache does not know the prompt's ids; begin it with `input_ids`, or pass the whole conversation "
            "and no `past_key_values`"
        )
    given = [k for k in pixel_keys if inputs.get(k) is not None]
    if given:
        raise ValueError(
            f"`{entry}` cannot add pixel values ({', '.join(given)}) to a conversation continued from "
            "`past_key_values` of a wrapped model (its visual tokens are in the cache); pass the whole conversation "
            "with all its pixel values and no `past_key_values`"
        )
    ids = inputs.get("input_ids")
    original = record.original_ids
    rows, length = original.shape
    if ids is None or ids.dim() != 2 or ids.shape[1] < length or ids.shape[0] % rows:
        shape = None if ids is None else tuple(ids.shape)
        raise ValueError(
            f"`{entry}` continuing from `past_key_values` of a wrapped model needs `input_ids` holding the whole "
            f"conversation (the cached prompt of {rows} x {length} ids, then the new ones), got input_ids of shape "
            f"{shape}; pass the returned `sequences` followed by the new ids"
        )
    if not torch.equal(ids[:, :length], _expand(original.to(ids.device), ids.shape[0])):
        raise ValueError(
            f"`{entry}`: `input_ids` do not begin with the prompt the `past_key_values` were computed for "
            f"({length} ids per row); continue from the returned `sequences`, or pass no `past_key_values`"
        )
    out = dict(inputs)
    if record.prefix is None:
        return out
    batch = ids.shape[0]
    caller_mask = inputs.get("attention_mask")
    tail_mask = (caller_mask[:, length:] if caller_mask is not None
                 else torch.ones_like(ids[:, length:]))
    if tail_mask.shape[1] != ids.shape[1] - length:
        raise ValueError(
            f"`{entry}`: `attention_mask` has {caller_mask.shape[1]} columns for {ids.shape[1]} `input_ids`; "
            "pass one mask column per id"
        )
    prefix = {k: _expand(v, batch) for k, v in record.prefix.items()}
    out["input_ids"] = torch.cat([prefix["input_ids"], ids[:, length:]], dim=1)
    out["attention_mask"] = torch.cat([prefix["attention_mask"], tail_mask.to(prefix["attention_mask"])], dim=1)
    positions = prefix.get("position_ids")
    if positions is not None:
        # as generate's decode steps count on from the prompt's last position (padding does not count)
        tail = positions[..., -1:] + tail_mask.to(positions).cumsum(-1)
        out["position_ids"] = torch.cat([positions, tail], dim=-1)
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in prefix:
            given_types = inputs.get(key)
            tail_types = (given_types[:, length:] if given_types is not None and given_types.shape[1] == ids.shape[1]
                          else torch.zeros_like(ids[:, length:]))
            out[key] = torch.cat([prefix[key], tail_types.to(prefix[key])], dim=1)
        else:
            out.pop(key, None)
    return out
