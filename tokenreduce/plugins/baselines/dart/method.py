"""``dart``: after layer ``K``, keep the visual tokens least duplicated by a few pivots (DART, 2025).

"Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More" (Wen et al.):
at layer ``K`` (the paper: 2) a few pivot tokens are chosen by the L1 norm of their keys in layer ``K-1``
(4 visual, 4 text after the image), and every pivot keeps, of the visual tokens, those whose hidden states
(final norm applied) are least similar to its own. No attention matrix is read, so the model keeps SDPA /
flash attention and the scoring costs one matrix product of a few pivots against the visual tokens.

``variant="reference"`` is the official code (ZichenWen1/DART, ``get_retained_image_token``): each pivot
takes ``keep // pivots`` tokens, so the image pivots come on top (132 tokens for the paper's 128), and the
pivots take their turns in the order a Python ``set`` of their positions iterates; it reads the chosen
positions on the host. The default keeps exactly ``keep`` tokens (the picks spread over the pivots, image
pivots first by decreasing norm, then text pivots), never waits for the device, and takes the key norms before
the rotary embedding: the L1 norm of a rotated key depends on its absolute position, so a row would choose
differently left-padded in a batch than alone. Both keep the original positions, as the official code does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokenreduce.core.config import MethodConfig, check_choice, check_keep, check_range, resolve_keep
from tokenreduce.core.llm import LLMContext, apply_rope
from tokenreduce.core.reduction import LLMMethod
from tokenreduce.core.registry import register_method
from tokenreduce.ops.llm import one_layer, one_layer_at_budget

from .select import duplication_select, official_select

VARIANTS = ("default", "reference")


@dataclass
class DARTConfig(MethodConfig):
    """Options of ``dart``.

    Attributes:
        layer: ``K``, the first decoder layer that sees the pruned sequence (pivots and keys come from
            layer K-1's output). The default (2) becomes the last layer on a model of 2 decoder layers.
        keep: visual tokens kept after layer K: a count or a fraction of the row's visual tokens (the
            paper keeps 128 of LLaVA-1.5's 576: 0.222).
        pivot_image: pivots among the visual tokens (kept themselves), by largest key norm; >= 1.
        pivot_text: pivots among the text tokens after the row's last visual token; >= 0.
        variant: ``"default"`` or ``"reference"`` (the official code's counts and pivot order).
    """

    layer: int = 2
    keep: int | float = 0.222
    pivot_image: int = 4
    pivot_text: int = 4
    variant: str = "default"

    def validate(self) -> None:
        check_range("layer", self.layer, 1, integer=True)
        check_keep("keep", self.keep)
        check_range("pivot_image", self.pivot_image, 1, integer=True)
        check_range("pivot_text", self.pivot_text, 0, integer=True)
        check_choice("variant", self.variant, VARIANTS)

    @classmethod
    def at_budget(cls, budget: float, num_layers: int | None = None, **options: Any) -> DARTConfig:
        """Keep ``budget`` after layer K, or, given ``num_layers``, ``budget`` averaged over all layers."""
        return one_layer_at_budget(cls, "dart", budget, num_layers, options)


@register_method("dart", config_cls=DARTConfig)
class DARTMethod(LLMMethod):
    """Prune visual tokens after layer K by duplication against pivot tokens (DART)."""

    def __init__(self, config: DARTConfig):
        super().__init__(config)
        self._norm: torch.nn.Module | None = None

    def attach(self, handle: Any) -> None:
        self._norm = handle.adapter.language_model.norm

    def detach(self, handle: Any) -> None:
        self._norm = None

    def llm_layers(self, num_layers: int) -> list[int]:
        return one_layer(self.config, num_layers)

    def select(self, ctx: LLMContext) -> list[torch.Tensor]:
        keys = ctx.capture.key_states()  # [B, Hkv, L, d] after RoPE, as the cache holds them
        if self.config.variant != "reference":  # the rotation undone: norms that do not depend on the position
            keys = apply_rope(keys, ctx.capture.cos, -ctx.capture.sin)
        norms = keys.float().abs().sum(dim=(1, 3))  # [B, L]
        states = self._norm(ctx.hidden)
        real = ctx.attention_mask.bool()
        config = self.config
        out = []
        for r, cols in enumerate(ctx.visual):
            if cols.numel() == 0:
                out.append(cols)
                continue
            keep = min(cols.numel(), resolve_keep(config.keep, ctx.original_visual[r]))
            text = ctx.text[r]
            after = real[r, text] & (text > cols[-1])
            if config.variant == "reference":
                out.append(self._official(norms[r], states[r], cols, text[after], keep, real[r]))
                continue
            text_norms = norms[r, text].masked_fill(~after, float("-inf"))
            out.append(duplication_select(norms[r, cols], states[r, cols], text_norms, states[r, text], keep,
                                          config.pivot_image, config.pivot_text))
        return out

    def _official(self, norms, states, cols, text, keep, real) -> torch.Tensor:
        # The official code runs one unpadded row: its sequence indices are the row's positions.
        start = int(real.long().argmax())
        visual, text = (cols - start).tolist(), (text - start).tolist()
        kept = official_select(norms[cols].tolist(), states[start:], visual, text,
                               norms[[t + start for t in text]].tolist(), keep, self.config.pivot_image,
                               self.config.pivot_text)
        place = {c: i for i, c in enumerate(visual)}
        return torch.tensor([place[c] for c in kept], dtype=torch.long, device=cols.device)
