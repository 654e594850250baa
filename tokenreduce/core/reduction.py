"""What a method returns, and the stage classes methods derive from.

A method only scores, selects, merges or replaces tokens. It returns a :class:`Reduction` saying which
original token each output token stands for; positions, masks, caches and labels follow from that in the
core, in one place, for every method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tokenreduce.core.config import MethodConfig
from tokenreduce.core.layout import TokenLayout

if TYPE_CHECKING:
    from tokenreduce.core.llm import LLMContext


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
        sources, order = torch.sort(self.sources, stable=True)
        assignment = self.assignment
        if assignment is not None:
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
            assignment = torch.where(assignment >= 0, inverse[assignment.clamp_min(0)], assignment)
        return Reduction(
            sources=sources,
            features=None if self.features is None else self.features.index_select(
                0, order if order.device == self.features.device else order.to(self.features.device)),
            assignment=assignment,
            info=self.info,
        )

    @staticmethod
    def keep(indices: torch.Tensor, **info: Any) -> Reduction:
        """Keep the original tokens at ``indices`` (any order; sorted by the core)."""
        return Reduction(sources=indices.long(), info=dict(info))


def slots_of(sources: torch.Tensor, n: int) -> torch.Tensor:
    """``[n]`` output slot of each of an item's ``n`` tokens when output ``j`` is token ``sources[j]`` alone
    (``-1``: dropped): the ``assignment`` of a selection that merges nothing."""
    slots = torch.full((n,), -1, dtype=torch.long, device=sources.device)
    slots[sources] = torch.arange(sources.numel(), device=sources.device)
    return slots


@dataclass
class ReduceContext:
    """Everything a projector/vision-stage method may look at for one item.

    Attributes:
        layout: the item's token layout.
        modality: ``"image"`` or ``"video"``.
        row: batch row the item belongs to.
        item: index of the item among the batch's items of this modality.
        text_embeds: ``[L, D]`` input embeddings of the row's every column, for text-guided methods;
            ``text_mask`` ``[L]`` (bool) marks its text tokens (not padding, not visual placeholders). The
            whole row, so that no count read on the host sizes it.
        signals: per-item signals captured inside the vision tower (CLS attention, keys, hidden states)
            by vision-stage methods; empty otherwise.
        generator: seeded random generator for stochastic methods.
    """

    layout: TokenLayout
    modality: str
    row: int
    item: int
    text_embeds: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    signals: dict[str, Any] = field(default_factory=dict)
    generator: torch.Generator | None = None


class Method:
    """Base class of every method; a registered method derives from one stage class below.

    A method's stage is its class: :class:`ProjectorMethod` (reduces each item's visual tokens before the
    LLM), :class:`VisionMethod` (reads or changes the vision tower, then reduces like a projector method),
    :class:`LLMMethod` (drops visual tokens between decoder layers) or :class:`DecodeMethod` (acts on
    generation). :func:`tokenreduce.core.registry.register_method` reads :attr:`stages` from the class.

    The core asks every method the three questions below (class attributes; the defaults say "no"), and
    calls the hooks of the method's stage class; everything else (positions, masks, caches, labels) it does
    itself. ``attach`` / ``detach`` install and undo anything beyond the stage's own hooks, through the
    handle, which removes what it tracks on unwrap.
    """

    #: The stages the method acts in, set by its stage class; the registry records them.
    stages: ClassVar[tuple[str, ...]] = ()
    #: Set by the registry: the name the method is registered under.
    name: str = ""
    #: Tower layer (or tuple of layers) whose queries and keys the core captures while the tower runs and
    #: hands to :meth:`VisionMethod.tower_signals`; ``None``: nothing is captured.
    vision_layer: int | tuple[int, ...] | None = None
    #: Whether the encoder's output already holds fewer tokens than the layout (the method merged inside
    #: the tower, as ToMe does): the core then takes the item sizes from the layout, not the features.
    changes_encoder_output: bool = False
    #: Whether :meth:`ProjectorMethod.reduce` reads the row's text (``ReduceContext.text_embeds``); the
    #: core embeds it only then.
    uses_text: bool = False

    def __init__(self, config: MethodConfig):
        self.config = config

    def attach(self, handle: Any) -> None:
        """Install hooks beyond the stage's own (the handle tracks and removes them)."""

    def detach(self, handle: Any) -> None:
        """Undo anything :meth:`attach` did that the handle does not track."""


class ProjectorMethod(Method):
    """Reduces each item's visual tokens after the projector, before the LLM reads them.

    The core encodes the pixels, calls :meth:`reduce` once per image / video item, and rebuilds the
    sequence around the result.
    """

    stages: ClassVar[tuple[str, ...]] = ("projector",)

    def reduce(self, features: torch.Tensor, context: ReduceContext) -> Reduction:
        """Reduce one item's ``[N, D]`` visual tokens; ``context`` holds its layout (and, for a vision
        method, the tower signals mapped onto its tokens)."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement `reduce`")


class VisionMethod(ProjectorMethod):
    """Reads (or changes) the vision tower's internals, then reduces each item like a projector method.

    With :attr:`vision_layer` set, the core captures that layer's queries and keys while the tower runs and
    calls :meth:`tower_signals` on them; the signals, mapped onto the item's tokens by the family's own
    spatial transforms, reach :meth:`reduce` as ``context.signals``. A method that merges inside the tower
    (installing its own block hooks in :meth:`attach`) sets :attr:`changes_encoder_output`; it then acts in
    the vision stage only, and its :meth:`reduce` says which original token each merged one stands for.
    """

    stages: ClassVar[tuple[str, ...]] = ("vision", "projector")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.stages = ("vision",) if cls.changes_encoder_output else ("vision", "projector")

    def tower_signals(self, q: Any, k: Any, scale: float, num_prefix: int) -> dict[str, torch.Tensor]:
        """Per-patch signals from the captured tower attention inputs.

        ``q, k``: ``[R, H, N, d]`` queries and keys of :attr:`vision_layer` for every tower row (a dict
        ``{layer: tensor}`` each when :attr:`vision_layer` is a tuple); ``scale`` the attention's scale;
        ``num_prefix`` the leading non-patch tokens ([CLS]). Returns ``{name: [R, P, ...]}`` over the ``P``
        patches; the core maps each onto the items' tokens.
        """
        raise NotImplementedError(f"{type(self).__qualname__} sets `vision_layer` but does not implement `tower_signals`")


class LLMMethod(Method):
    """Drops visual tokens between decoder layers: layers ``>= K`` see only the tokens kept at ``K``.

    The core hooks the layers :meth:`llm_layers` names and, at each, asks :meth:`select` which visual tokens
    survive; masks, positions and the cache follow in prefill and every decode step.
    """

    stages: ClassVar[tuple[str, ...]] = ("llm",)

    def llm_layers(self, num_layers: int) -> list[int]:
        """The decoder layers ``K`` (in ``[1, num_layers - 1]``) at which the method prunes."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement `llm_layers`")

    def select(self, ctx: LLMContext) -> list[torch.Tensor]:
        """Per row, indices into ``ctx.visual[row]`` of the visual tokens kept from layer ``ctx.layer`` on."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement `select`")


class DecodeMethod(Method):
    """Acts on generation (sampling, reasoning length); keeps every visual token."""

    stages: ClassVar[tuple[str, ...]] = ("decode",)

    def generation_hooks(self, handle: Any, inputs: dict[str, Any]) -> dict[str, list]:
        """``{"logits_processor": [...], "stopping_criteria": [...]}`` for one ``generate`` call, appended
        to the caller's own."""
        return {}

    def after_generate(self, handle: Any, inputs: dict[str, Any], output: Any) -> None:
        """Record per-sample results (``handle.stats``) once ``generate`` returns."""


STAGE_CLASSES: dict[str, type[Method]] = {
    "vision": VisionMethod, "projector": ProjectorMethod, "llm": LLMMethod, "decode": DecodeMethod,
}
