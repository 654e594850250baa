"""What a method returns, and the base class methods derive from.

A method only scores, selects, merges or replaces tokens. It returns a :class:`Reduction` saying which
original token each output token stands for; positions, masks, caches and labels follow from that in the
core, in one place, for every method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tokenreduce.core.config import MethodConfig
from tokenreduce.core.layout import TokenLayout


@dataclass
class Reduction:
    """Result of reducing one item's ``N`` visual tokens to ``M``.

    Attributes:
        sources: ``[M]`` index of the original token each output token stands for; its position id is
            that token's. Ascending unless the method documents otherwise (the core sorts it).
        features: ``[M, D]`` output tokens, or ``None`` when they are the original tokens at ``sources``.
        assignment: optional ``[N]`` output slot every original token went into (``-1``: dropped); set by
            merging methods, used by overlays.
        info: free-form per-item details a method wants in the stats (scores, budgets, captions...).
    """

    sources: torch.Tensor
    features: torch.Tensor | None = None
    assignment: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.sources.numel())

    def output_features(self, original: torch.Tensor) -> torch.Tensor:
        if self.features is not None:
            return self.features
        return original.index_select(0, self.sources.to(original.device))

    def sorted(self) -> Reduction:
        """The same reduction with output tokens in ascending source order (stable). Always sorts (a
        no-op order when already sorted): checking first would make the host wait for the device."""
        if self.sources.numel() < 2:
            return self
        order = torch.sort(self.sources, stable=True).indices
        assignment = self.assignment
        if assignment is not None:
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
            assignment = torch.where(assignment >= 0, inverse[assignment.clamp_min(0)], assignment)
        return Reduction(
            sources=self.sources[order],
            features=None if self.features is None else self.features[order.to(self.features.device)],
            assignment=assignment,
            info=self.info,
        )

    @staticmethod
    def keep(indices: torch.Tensor, **info: Any) -> Reduction:
        """Keep the original tokens at ``indices`` (any order; sorted by the core)."""
        return Reduction(sources=indices.long(), info=dict(info))


@dataclass
class ReduceContext:
    """Everything a projector/vision-stage method may look at for one item.

    Attributes:
        layout: the item's token layout.
        modality: ``"image"`` or ``"video"``.
        row: batch row the item belongs to.
        item: index of the item among the batch's items of this modality.
        text_embeds: ``[T, D]`` input embeddings of the row's text tokens (padding excluded), for
            text-guided methods.
        signals: per-item signals captured inside the vision tower (CLS attention, keys, hidden states)
            by vision-stage methods; empty otherwise.
        generator: seeded random generator for stochastic methods.
    """

    layout: TokenLayout
    modality: str
    row: int
    item: int
    text_embeds: torch.Tensor | None = None
    signals: dict[str, Any] = field(default_factory=dict)
    generator: torch.Generator | None = None


class Method:
    """Base class of every registered method.

    ``stages`` and ``name`` are set by :func:`tokenreduce.core.registry.register_method`. A method that
    acts at the projector (or after the vision tower) implements :meth:`reduce`; methods acting inside
    the vision tower or the LLM override :meth:`attach` / :meth:`detach` to install their hooks through
    the handle, which removes them on unwrap.
    """

    name: str = ""

    def __init__(self, config: MethodConfig):
        self.config = config

    def reduce(self, features: torch.Tensor, context: ReduceContext) -> Reduction:
        """Reduce one item's ``[N, D]`` visual tokens."""
        raise NotImplementedError

    def generation_hooks(self, handle: Any, inputs: dict[str, Any]) -> dict[str, list]:
        """Decode-stage methods: ``{"logits_processor": [...], "stopping_criteria": [...]}`` for one
        ``generate`` call, appended to the caller's own."""
        return {}

    def after_generate(self, handle: Any, inputs: dict[str, Any], output: Any) -> None:
        """Decode-stage methods: record per-sample results (``handle.stats``) once ``generate`` returns."""

    def attach(self, handle: Any) -> None:
        """Install hooks beyond the projector stage (the handle tracks and removes them)."""

    def detach(self, handle: Any) -> None:
        """Undo anything :meth:`attach` did that the handle does not track."""
