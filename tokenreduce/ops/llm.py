"""Shared pieces of the in-LLM baselines: layer validation, budgets averaged over depth, top-k by score."""

from __future__ import annotations

import math
from typing import Any

import torch

from tokenreduce.core.config import check_range, resolve_keep
from tokenreduce.core.llm import LLMContext


def check_layers(name: str, layers: tuple[int, ...], num_layers: int) -> list[int]:
    """Pruning layers must lie in ``[1, num_layers - 1]`` (layer ``K-1`` scores the tokens)."""
    bad = [k for k in layers if not 1 <= k < num_layers]
    if bad:
        raise ValueError(
            f"`{name}` must be in [1, {num_layers - 1}] for this model ({num_layers} decoder layers), got {bad[0]}"
        )
    return list(layers)


def one_layer(config: Any, num_layers: int) -> list[int]:
    """The pruning layer of a one-layer method (``config.layer``): the paper's default K=2 becomes the deepest
    layer that still has one before it on a shallower model; a value given is kept (and checked)."""
    layer = config.layer
    if layer == type(config).layer and 2 <= num_layers <= layer:
        layer = num_layers - 1
    return check_layers("layer", (layer,), num_layers)


def average_keep(layers: list[int], keeps: list[float], num_layers: int) -> float:
    """Visual tokens kept, averaged over all decoder layers, as a fraction of the LLM-input count."""
    total, previous_layer, fraction = 0.0, 0, 1.0
    for layer, keep in zip(layers, keeps):
        total += (layer - previous_layer) * fraction
        previous_layer, fraction = layer, keep
    total += (num_layers - previous_layer) * fraction
    return total / num_layers


def one_layer_at_budget(cls: type, name: str, budget: float, num_layers: int | None, options: dict[str, Any]):
    """Config of a method pruning once, at ``layer``, to ``keep``: ``budget`` kept after the layer, or, given
    ``num_layers``, ``budget`` averaged over all layers (the first ``layer`` layers see every token, so the
    paper's K=2 moves up when it leaves no room)."""
    check_range("budget", budget, 0.0, 1.0, low_open=True)
    if num_layers is None:
        return cls(keep=float(budget), **options)
    layer = options.pop("layer", min(cls.layer, max(1, math.ceil(num_layers * budget) - 1)))
    keep = (num_layers * budget - layer) / (num_layers - layer)
    if keep <= 0:
        # `layer` at its minimum of 1 leaves only the budget to change.
        advice = "a smaller `layer` or a larger budget" if layer > 1 else f"a budget above {1 / num_layers:.0%}"
        first = "the first layer sees" if layer == 1 else f"the first {layer} layers see"
        raise ValueError(
            f"{name} with `layer`={layer} cannot average {budget:.0%} of the visual tokens over {num_layers} "
            f"layers ({first} all of them); choose {advice}"
        )
    return cls(layer=layer, keep=min(1.0, keep), **options)


def scores_for(ctx: LLMContext, query: str) -> torch.Tensor:
    """Attention scores of every column from the chosen queries: ``"last"`` token or all ``"text"`` tokens."""
    return ctx.last_token_attention() if query == "last" else ctx.text_attention()


def top_visual(ctx: LLMContext, scores: torch.Tensor, keep: int | float) -> list[torch.Tensor]:
    """Per row, indices (into ``ctx.visual[row]``) of the ``keep`` best-scored visual tokens."""
    out = []
    for r, cols in enumerate(ctx.visual):
        k = min(cols.numel(), resolve_keep(keep, ctx.original_visual[r])) if cols.numel() else 0
        row_scores = scores[r, cols]
        # stable order: higher score first, lower index on ties
        order = torch.sort(row_scores, descending=True, stable=True).indices[:k]
        out.append(order)
    return out
