"""``visionzip``: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity.

VisionZip (CVPR'25) reads the vision tower's penultimate layer: the ``dominant`` patches the [CLS] token
attends to most are kept; of the rest, ``contextual`` targets are picked at a uniform stride and every
other remaining token is merged into its most key-similar target (target + mean of its members). The
paper's settings are 54 + 10 tokens for LLaVA-1.5 (64 in all; 108 + 20, 162 + 30 for 128 / 192) and
27 + 5 per crop for LLaVA-NeXT; we use the NeXT setting per crop / frame for the other anyres and video
families (our choice). Towers without [CLS] (SigLIP in LLaVA-OneVision) rank by the attention each
patch receives.

Differences from the reference code, on purpose: the tower is not monkey-patched (signals are read from
the attention's inputs of one instance, under any attention implementation), and the selection and
merging act on the projected tokens the LLM receives, so anyres packing and newline slots stay intact;
the dominant tokens are the same, a contextual token is the projection of its members summed rather than
the projection of the summed hidden states. A newline slot stays when its row keeps a token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenreduce import kernels
from tokenreduce.core.config import MethodConfig, check_range
from tokenreduce.core.reduction import ReduceContext, Reduction, VisionMethod
from tokenreduce.core.registry import register_method
from tokenreduce.ops.vision import attention_and_keys, count, reduce_per_crop

FAMILY_DEFAULTS = {"llava": (54, 10), "llava_next": (27, 5), "llava_next_video": (27, 5), "llava_onevision": (27, 5)}


@dataclass
class VisionZipConfig(MethodConfig):
    """Options of ``visionzip``.

    Attributes:
        dominant: dominant tokens per crop / frame: a count (int) or a fraction of its tokens (float);
            ``None`` takes the paper's setting for the model family.
        contextual: contextual (merged) tokens per crop / frame, same conventions.
        layer: tower layer whose attention is read (the paper: the penultimate, ``-2``).
    """

    dominant: int | float | None = None
    contextual: int | float | None = None
    layer: int = -2

    def validate(self) -> None:
        for name in ("dominant", "contextual"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, float):
                check_range(name, value, 0.0, 1.0)
            else:
                check_range(name, value, 0, integer=True)
        check_range("layer", self.layer, integer=True)

    @classmethod
    def at_budget(cls, budget: float, num_layers: int | None = None, **options) -> VisionZipConfig:
        """``budget`` of each crop's tokens, split 54 : 10 between dominant and contextual (all dominant at 1)."""
        check_range("budget", budget, 0.0, 1.0, low_open=True)
        contextual = min(budget * 10 / 64, 1.0 - budget)
        return cls(dominant=budget - contextual, contextual=contextual, **options)


def visionzip_select(features, attention, keys, group, dominant: int, contextual: int):
    """VisionZip on one group of token indices.

    Returns ``(sources, outputs, slot)``: the token each output stands for, the ``[M, D]`` outputs
    (dominant tokens first, then contextual ones), and for every token of ``group`` its output slot.
    """
    order = torch.sort(attention[group], descending=True, stable=True).indices
    dom_pos = order[:dominant].sort().values
    rest_pos = order[dominant:].sort().values
    device = group.device
    slot = torch.empty(group.numel(), dtype=torch.long, device=device)
    slot[dom_pos] = torch.arange(dom_pos.numel(), device=device)
    sources, outputs = [group[dom_pos]], [features[group[dom_pos]]]
    rest = rest_pos.numel()
    contextual = min(contextual, rest)
    if contextual > 0:
        step = max(1, rest // contextual)
        target_pos = torch.arange(0, rest, step, device=device)[:contextual]  # every step-th of the rest
        is_target = torch.zeros(rest, dtype=torch.bool, device=device).index_fill(0, target_pos, True)
        # the rest - contextual others in order (a stable sort puts them first): counts known, no host read
        other_pos = torch.sort(is_target.to(torch.uint8), stable=True).indices[: rest - contextual]
        targets, others = group[rest_pos[target_pos]], group[rest_pos[other_pos]]
        merged = features[targets].clone()
        slot[rest_pos[target_pos]] = dom_pos.numel() + torch.arange(contextual, device=device)
        if others.numel():
            sim = kernels.pairwise_similarity(keys[others][None], keys[targets][None])[0]
            assign = sim.argmax(dim=1)
            sums = torch.zeros_like(merged).index_add_(0, assign, features[others])
            counts = torch.zeros(contextual, dtype=torch.long, device=device).index_add_(0, assign, torch.ones_like(assign))
            merged = merged + sums / counts.clamp_min(1).to(merged.dtype)[:, None]
            slot[rest_pos[other_pos]] = dom_pos.numel() + assign
        sources.append(targets)
        outputs.append(merged)
    else:
        slot[rest_pos] = -1
    return torch.cat(sources), torch.cat(outputs), slot


@register_method("visionzip", config_cls=VisionZipConfig,
                 families=tuple(FAMILY_DEFAULTS))
class VisionZipMethod(VisionMethod):
    """Dominant tokens by [CLS] attention plus similarity-merged contextual tokens (VisionZip)."""

    def attach(self, handle) -> None:
        default = FAMILY_DEFAULTS[handle.adapter.name]
        self.dominant = default[0] if self.config.dominant is None else self.config.dominant
        self.contextual = default[1] if self.config.contextual is None else self.config.contextual

    @property
    def vision_layer(self) -> int:
        return self.config.layer

    def tower_signals(self, q, k, scale, num_prefix):
        return attention_and_keys(q, k, scale, num_prefix)

    def reduce(self, features: torch.Tensor, context: ReduceContext) -> Reduction:
        attention = context.signals["attention"].to(features.device)
        keys = context.signals["keys"].to(features.device)

        def select(group: torch.Tensor):
            n = group.numel()
            dominant = max(1, count(self.dominant, n))
            return visionzip_select(features, attention, keys, group, dominant, count(self.contextual, n))

        return reduce_per_crop(features, context, select)
