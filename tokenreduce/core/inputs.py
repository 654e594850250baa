"""Entry points of the plain model that need more than ``input_ids``: ``inputs_embeds`` with pixels.

transformers finds the visual positions of a call given ``inputs_embeds`` (and no ``input_ids``) by
comparing every embedding with the embedding of the placeholder token id (``get_placeholder_mask``).
The core works on ids: :func:`placeholder_ids` makes ids that hold the placeholder id exactly where
transformers would see a placeholder (and ``fill`` elsewhere); the rebuilt sequence then gathers the
caller's embeddings with the same column index as the ids (:func:`gather_embeds`), so a reduction of
``inputs_embeds`` is the reduction of the same call made with ``input_ids``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from tokenreduce.adapters.base import Adapter
from tokenreduce.core.sequence import gather_tokens, rope_positions


def placeholder_ids(
    inputs_embeds: torch.Tensor, embed: Any, placeholders: dict[str, int], fill: int
) -> torch.Tensor:
    """``[B, L]`` ids: a modality's placeholder id where ``inputs_embeds`` equals its embedding on every
    channel (transformers' test), ``fill`` elsewhere. ``embed`` maps ids to embeddings."""
    batch, length = inputs_embeds.shape[:2]
    ids = torch.full((batch, length), fill, dtype=torch.long, device=inputs_embeds.device)
    for token in placeholders.values():
        reference = embed(torch.full((), token, dtype=torch.long, device=inputs_embeds.device))
        ids = torch.where((inputs_embeds == reference.to(inputs_embeds)).all(-1), token, ids)
    return ids


def ids_from_embeds(adapter: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """The ids the core works on for a call given ``inputs_embeds`` and no ``input_ids``: the family's
    placeholder ids where transformers would find placeholders, ``-1`` (no token) elsewhere."""
    if type(adapter).expand_inputs is not Adapter.expand_inputs:  # placeholders that stand for many tokens
        raise ValueError(f"`inputs_embeds` with pixels is not supported for {adapter.describe()}: its placeholder "
                         "stands for several visual tokens; pass `input_ids`")
    placeholders = {m: adapter.placeholder_id(m) for m in adapter.modalities}
    with torch.no_grad():
        return placeholder_ids(inputs["inputs_embeds"], adapter.embed, placeholders, fill=-1)


def gather_embeds(inputs_embeds: torch.Tensor, index: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """``inputs_embeds`` at the columns of ``index: [B, L']`` (``-1``: padding, given ``pad``'s embedding,
    as a padded ``input_ids`` row would be embedded)."""
    out = gather_tokens(inputs_embeds, index.clamp_min(0).to(inputs_embeds.device))
    return torch.where((index < 0).to(out.device)[..., None], pad.to(out), out)


def rebuilt_embeds(out: dict[str, Any], inputs: dict[str, Any], index: torch.Tensor, embed: Any, pad_id: int,
                   given_ids: bool) -> dict[str, Any]:
    """The rebuilt call when the caller gave ``inputs_embeds``: the embeddings gathered like the ids, and the
    ids dropped when the caller gave none (they were :func:`placeholder_ids`, not the caller's)."""
    embeds = inputs.get("inputs_embeds")
    if embeds is None:
        return out
    pad = embed(torch.full((), pad_id, dtype=torch.long, device=embeds.device))
    out["inputs_embeds"] = gather_embeds(embeds, index, pad)
    if not given_ids:
        out.pop("input_ids", None)
    return out


def plain_embeds_positions(adapter: Any, inputs: dict[str, Any], generating: bool) -> torch.Tensor | None:
    """The M-RoPE positions (``[3, B, L]``) the plain model gives a call with ``inputs_embeds`` and no
    ``input_ids``, or None for families whose positions do not depend on the ids (the usual path then).

    Without ids, Qwen's ``forward`` cannot compute the image positions: it uses the cached ``rope_deltas``
    of an earlier call, or consecutive positions; its ``generate`` uses the mask's text positions. A
    keep-all call must read the same, and a reduction keeps each kept token's position among them.
    """
    compute = getattr(adapter.inner, "compute_3d_position_ids", None)
    if compute is None:
        return None
    embeds = inputs["inputs_embeds"]
    batch, length = embeds.shape[:2]
    mask = inputs.get("attention_mask")
    if generating:
        mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device) if mask is None else mask
        return adapter.sequential_positions(mask)
    cache = inputs.get("cache", inputs.get("past_key_values"))
    params = inspect.signature(compute).parameters
    skip = ("input_ids", "inputs_embeds", "attention_mask", "cache")
    # every parameter named (Qwen2.5-VL's grids have no default), None where the call has none
    kwargs = {k: inputs.get(k) for k in params if k not in skip}
    positions = compute(input_ids=None, inputs_embeds=embeds, attention_mask=mask, cache=cache, **kwargs)
    if positions is None:  # what the text model then uses
        past = 0 if cache is None else cache.get_seq_length()
        consecutive = torch.arange(past, past + length, device=embeds.device).expand(batch, -1)
        positions = rope_positions(consecutive, adapter.position_axes)
    return positions
