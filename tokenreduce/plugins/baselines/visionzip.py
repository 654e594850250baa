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
merging act on the projected tokens the LLM receives, so anyres packing stays intact; the dominant
tokens are the same, a contextual token is the projection of its members summed rather than the
projection of the summed hidden states. The newline slots ending anyres canvas rows are dropped, as the
official LLaVA-NeXT code drops them (lone separators such as OneVision's trailing video newline stay;
all stay when every crop keeps all its tokens), so the count is fixed by the budget. The default's ``dominant`` counts patches only; the official passes ``dominant - 1`` and prepends [CLS].

``variant="reference"`` reproduces the official code (dvlab-research/VisionZip, LLaVA-1.5 only):
``dominant`` counts [CLS] plus ``dominant - 1`` patches, the contextual targets are picked among the
other patches accordingly, the merge acts on the tower's hidden states of the projected layer (then
projected), and the tokens reach the LLM as [CLS], dominant, contextual under consecutive positions
(sets ``renumber_positions``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenreduce import kernels
from tokenreduce.core.config import MethodConfig, check_choice, check_range
from tokenreduce.core.reduction import ReduceContext, Reduction, VisionMethod
from tokenreduce.core.registry import register_method
from tokenreduce.ops.tower_space import TowerFeatures, padded_sources
from tokenreduce.ops.vision import attention_and_keys, content_groups, count, reduce_per_crop

FAMILY_DEFAULTS = {"llava": (54, 10), "llava_next": (27, 5), "llava_next_video": (27, 5), "llava_onevision": (27, 5)}
VARIANTS = ("default", "reference")


@dataclass
class VisionZipConfig(MethodConfig):
    """Options of ``visionzip``.

    Attributes:
        dominant: dominant tokens per crop / frame: a count (int) or a fraction of its tokens (float);
            ``None`` takes the paper's setting for the model family.
        contextual: contextual (merged) tokens per crop / frame, same conventions.
        layer: tower layer whose attention is read (the paper: the penultimate, ``-2``).
        variant: ``"default"`` or ``"reference"`` (the official LLaVA-1.5 code: [CLS] among the dominant
            tokens, merging in tower space, its token order, consecutive positions).
    """

    dominant: int | float | None = None
    contextual: int | float | None = None
    layer: int = -2
    variant: str = "default"

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
        check_choice("variant", self.variant, VARIANTS)
        if self.variant == "reference":
            self.renumber_positions = True

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


def visionzip_reference(cls: torch.Tensor, hidden: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor,
                        dominant: int, contextual: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionZip as the official code computes it, on one image's tower-space states.

    ``cls: [C]`` the [CLS] state, ``hidden: [N, C]`` the patches, ``attention: [N]`` the [CLS] attention
    over them, ``keys: [N, d]`` their head-mean keys; ``dominant`` counts [CLS] too. Returns
    ``(columns, outputs, assignment)``: the patches standing for an output (dominant ones, then the
    contextual targets), the ``[dominant + contextual, C]`` outputs in the official order ([CLS], dominant
    patches ascending, contextual tokens) and every patch's output slot (``-1``: dropped).
    """
    n = hidden.shape[0]
    device = hidden.device
    dom = torch.topk(attention.float(), min(n, dominant - 1)).indices.sort().values
    rest = torch.ones(n, dtype=torch.bool, device=device).index_fill(0, dom, False).nonzero().flatten()
    assignment = torch.full((n,), -1, dtype=torch.long, device=device)
    assignment[dom] = 1 + torch.arange(dom.numel(), device=device)
    outputs = [cls[None], hidden[dom]]
    columns = [dom]
    contextual = min(contextual, rest.numel())
    if contextual > 0:
        metric = keys[rest].float()
        metric = metric / metric.norm(dim=-1, keepdim=True)
        step = max(1, rest.numel() // contextual)
        targets = torch.arange(0, rest.numel(), step, device=device)[:contextual]
        others = rest.new_ones(rest.numel(), dtype=torch.bool).index_fill(0, targets, False).nonzero().flatten()
        assign = (metric[others] @ metric[targets].T).argmax(dim=1)
        sums = torch.zeros(contextual, hidden.shape[1], dtype=hidden.dtype, device=device)
        sums.index_add_(0, assign, hidden[rest[others]])
        counts = torch.bincount(assign, minlength=contextual).clamp_min(1).to(hidden.dtype)
        outputs.append(hidden[rest[targets]] + sums / counts[:, None])
        columns.append(rest[targets])
        base = 1 + dom.numel()
        assignment[rest[targets]] = base + torch.arange(contextual, device=device)
        assignment[rest[others]] = base + assign
    return torch.cat(columns), torch.cat(outputs), assignment


@register_method("visionzip", config_cls=VisionZipConfig,
                 families=tuple(FAMILY_DEFAULTS))
class VisionZipMethod(VisionMethod):
    """Dominant tokens by [CLS] attention plus similarity-merged contextual tokens (VisionZip)."""

    def attach(self, handle) -> None:
        default = FAMILY_DEFAULTS[handle.adapter.name]
        self.dominant = default[0] if self.config.dominant is None else self.config.dominant
        self.contextual = default[1] if self.config.contextual is None else self.config.contextual
        self.tower_features = TowerFeatures(handle, self.name) if self.config.variant == "reference" else None

    @property
    def vision_layer(self) -> int:
        return self.config.layer

    def tower_signals(self, q, k, scale, num_prefix):
        return attention_and_keys(q, k, scale, num_prefix)

    def reduce(self, features: torch.Tensor, context: ReduceContext) -> Reduction:
        attention = context.signals["attention"].to(features.device)
        keys = context.signals["keys"].to(features.device)
        if self.config.variant == "reference":
            return self._reduce_reference(features, attention, keys, context)

        def select(group: torch.Tensor):
            n = group.numel()
            dominant = max(1, count(self.dominant, n))
            return visionzip_select(features, attention, keys, group, dominant, count(self.contextual, n))

        return reduce_per_crop(features, context, select)

    def _reduce_reference(self, features, attention, keys, context: ReduceContext) -> Reduction:
        if self.tower_features is None:
            raise RuntimeError(f"{self.name!r} with variant='reference' runs only inside a model wrapped by tr.wrap")
        (group,) = content_groups(context.layout, per_crop=False)
        group = group.to(features.device)
        n = group.numel()
        row = self.tower_features.row(context.item, self.name).to(features.device)
        prefix = self.tower_features.num_prefix
        columns, outputs, slot = visionzip_reference(
            row[0], row[prefix:][:n], attention[group], keys[group],
            max(1, count(self.dominant, n)), count(self.contextual, n),
        )
        projected = self.tower_features.project(outputs).to(features.dtype)
        assignment = torch.full((features.shape[0],), -1, dtype=torch.long, device=features.device)
        assignment[group] = slot
        sources = padded_sources(group[columns], projected.shape[0])
        return Reduction(sources=sources, features=projected, assignment=assignment, info={"order": "reference"})
