"""``prumerge`` / ``prumerge_plus``: adaptive token count by IQR outliers of [CLS] attention, then merging.

LLaVA-PruMerge (Shang et al.) reads the tower's last layer (the official code hooks
``layers[23].self_attn.{q,k}_proj`` of CLIP-L's 24): the [CLS] token's attention over the patches (the
reference code uses the full-width dot product, no head split: so do we). Patches whose
attention is an outlier (above Q3 + 1.5 IQR) are kept, so the count adapts to the image (~32 of 576 on
average). Each kept token then absorbs its ``neighbors`` most key-similar tokens weighted by their
attention (``x_i + sum_j a_j x_j``), and one extra token carries the attention-weighted sum of all pruned
tokens. PruMerge+ adds spatially uniform tokens (stride ``floor(floor(1 / ratio) / 3)``), ~144 on average.

With ``keep`` set, the count is fixed instead (for comparisons at equal budgets): the top ``keep`` by
attention (PruMerge+: the IQR outliers, filled up to ``keep`` with uniformly spaced tokens). As with
VisionZip, the merge acts on the projected tokens and works per crop / frame on anyres and video inputs;
the newline slots ending anyres canvas rows are dropped (as VisionZip's LLaVA-NeXT code drops them; the
official PruMerge has no anyres code), lone separators stay (all stay when every crop keeps all its
tokens).

``variant="reference"`` reproduces the official code (42Shawn/LLaVA-PruMerge, LLaVA-1.5 only): the merge
acts on the tower's hidden states of the projected layer, which are then projected; the adaptive count is
``int(N * ratio)``; PruMerge+ adds ``arange(0, N - 1, int(int(1 / ratio) / 3))`` (the official ``575`` for
576 patches: the last patch is never a uniform token, where the default strides over all ``N``); the
tokens reach the LLM in the official order (kept tokens by decreasing attention, PruMerge+'s uniform ones
after them, the extra token last) under consecutive positions (sets ``renumber_positions``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokenreduce import kernels
from tokenreduce.core.config import MethodConfig, check_choice, check_range
from tokenreduce.core.reduction import ReduceContext, Reduction, VisionMethod
from tokenreduce.core.registry import register_method
from tokenreduce.ops.selection import iqr_outliers
from tokenreduce.ops.tower_space import TowerFeatures, padded_sources
from tokenreduce.ops.vision import attention_and_keys, content_groups, reduce_per_crop

FAMILIES = ("llava", "llava_next", "llava_next_video", "llava_onevision")
VARIANTS = ("default", "reference")


@dataclass
class PruMergeConfig(MethodConfig):
    """Options of ``prumerge``.

    Attributes:
        keep: ``None`` for the paper's adaptive count, or a fixed fraction of each crop's tokens.
        iqr_factor: outliers lie above ``Q3 + iqr_factor * IQR``.
        neighbors: tokens each kept token absorbs (by key cosine similarity).
        layer: tower layer whose attention and keys are read (the official: the last, ``-1``).
        variant: ``"default"`` or ``"reference"`` (the official LLaVA-1.5 code: merging in tower space,
            its counts, uniform stride and token order, consecutive positions; adaptive count only).
    """

    keep: float | None = None
    iqr_factor: float = 1.5
    neighbors: int = 32
    layer: int = -1
    variant: str = "default"

    def validate(self) -> None:
        if self.keep is not None:
            check_range("keep", self.keep, 0.0, 1.0, low_open=True)
        check_range("iqr_factor", self.iqr_factor, 0.0)
        check_range("neighbors", self.neighbors, 0, integer=True)
        check_range("layer", self.layer, integer=True)
        check_choice("variant", self.variant, VARIANTS)
        if self.variant == "reference":
            if self.keep is not None:
                raise ValueError(
                    f"`keep` must be None with variant='reference' (the official count is adaptive), got {self.keep!r}"
                )
            self.renumber_positions = True

    @classmethod
    def at_budget(cls, budget: float, num_layers: int | None = None, **options) -> PruMergeConfig:
        check_range("budget", budget, 0.0, 1.0, low_open=True)
        return cls(keep=float(budget), **options)


@dataclass
class PruMergePlusConfig(PruMergeConfig):
    """Options of ``prumerge_plus`` (those of ``prumerge``)."""


def first_true(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the first ``count`` True entries of the 1-d ``mask``, ascending, for a ``count`` the
    caller knows (a stable sort puts them first): no host read, unlike ``mask.nonzero()``."""
    return torch.sort((~mask).to(torch.uint8), stable=True).indices[:count]


def uniform_fill(kept: torch.Tensor, n: int, step: int | None = None, total: int | None = None,
                 count: int | None = None) -> torch.Tensor:
    """Positions in ``[0, n)`` at a uniform stride (or ``total - len(kept)`` evenly spread) not in ``kept``.

    With ``step``, how many stride positions ``kept`` leaves free depends on the data: ``count`` gives it
    (read by the caller); without it, it is read here.
    """
    free = torch.ones(n, dtype=torch.bool, device=kept.device).index_fill(0, kept, False)
    if step is not None:
        candidates = torch.arange(0, n, step, device=kept.device)
        if count is None:
            count = int(free[candidates].sum())
        return candidates[first_true(free[candidates], count)]
    need = max(0, (total or 0) - kept.numel())
    size = n - kept.numel()  # kept holds distinct positions
    pool = first_true(free, size)
    if need == 0 or size == 0:
        return pool[:0]
    # at most `size` picks at a stride >= 1: the rounded positions are distinct and ascending
    return pool[torch.linspace(0, size - 1, min(need, size), device=kept.device).round().long()]


def group_counts(attention: torch.Tensor, n: int, config: PruMergeConfig, plus: bool) -> torch.Tensor:
    """The data-dependent counts of one group, on the device: ``[outliers, stride positions PruMerge+ adds]``
    (the second is 0 unless ``plus`` with the adaptive count)."""
    a = attention.float()
    n_out = iqr_outliers(a, config.iqr_factor).sum().clamp_min(1)
    if not (plus and config.keep is None):
        return torch.stack([n_out, torch.zeros_like(n_out)])
    order = torch.sort(a, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=a.device))
    step = (torch.div(n, n_out, rounding_mode="floor") // 3).clamp_min(1)
    stride = torch.arange(n, device=a.device) % step == 0
    return torch.stack([n_out, (stride & (rank >= n_out)).sum()])


def prumerge_group(features, attention, keys, group, config: PruMergeConfig, plus: bool,
                   counts: tuple[int, int] | None = None):
    """PruMerge(+) on one group of tokens: ``(sources, outputs, slot)`` as in :func:`visionzip_select`.

    ``counts``: the group's :func:`group_counts`, read by the caller (batched over groups); read here when
    not given and the configuration needs them.
    """
    n = group.numel()
    a = attention[group].float()
    if counts is None and (config.keep is None or plus):
        counts = tuple(group_counts(a, n, config, plus).tolist())
    n_out, n_fill = counts if counts is not None else (1, 0)
    order = torch.sort(a, descending=True, stable=True).indices
    if config.keep is None:
        kept = order[:n_out]
        if plus:
            step = max(1, math.floor(math.floor(n / n_out) / 3))
            kept = torch.cat([kept, uniform_fill(kept, n, step=step, count=n_fill)])
    else:
        total = max(1, round(config.keep * n))
        if total < n:  # the extra token of pruned tokens counts within the budget
            total = max(1, total - 1)
        kept = order[: min(n_out, total) if plus else total]
        if plus:
            kept = torch.cat([kept, uniform_fill(kept, n, total=total)])
    kept = kept.sort().values
    pruned = torch.ones(n, dtype=torch.bool, device=group.device).index_fill(0, kept, False)
    x = features[group]
    out = x[kept].clone()
    if config.neighbors > 0 and n > 1:
        sim = kernels.pairwise_similarity(keys[group][kept][None], keys[group][None])[0]
        sim[torch.arange(kept.numel(), device=sim.device), kept] = float("-inf")  # not itself
        k = min(config.neighbors, n - 1)
        neighbor = sim.topk(k, dim=1).indices  # [K, k]
        weights = a[neighbor].to(x.dtype)
        out = out + (weights[..., None] * x[neighbor]).sum(1)
    slot = torch.full((n,), -1, dtype=torch.long, device=group.device)
    slot[kept] = torch.arange(kept.numel(), device=group.device)
    sources, outputs = [group[kept]], [out]
    if kept.numel() < n:
        idx = first_true(pruned, n - kept.numel())
        extra = (a[idx].to(x.dtype)[:, None] * x[idx]).sum(0, keepdim=True)
        sources.append(group[idx[a[idx].argmax().view(1)]])
        outputs.append(extra)
        slot[idx] = kept.numel()
    return torch.cat(sources), torch.cat(outputs), slot


def prumerge_reference(hidden: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor, config: PruMergeConfig,
                       plus: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PruMerge(+) as the official code computes it, on one image's tower-space patches ``hidden: [N, C]``.

    ``attention: [N]`` the [CLS] attention over the patches, ``keys: [N, C]`` their keys. Returns
    ``(kept, outputs, assignment)``: the patches kept in the official order (by decreasing attention,
    PruMerge+'s uniform ones after them), the ``[len(kept) + 1, C]`` tower-space outputs in that order (the
    extra token of the pruned patches last) and every patch's output slot. The count is read on the host.
    """
    n = hidden.shape[0]
    a = attention.float()
    outliers = max(1, int(iqr_outliers(a, config.iqr_factor).sum()))  # the official keeps none (or fails) at 0
    ratio = outliers / n
    kept = torch.topk(a, int(n * ratio)).indices
    if plus:
        step = max(1, int(int(1 / ratio) / 3))  # the official fails on a step of 0
        uniform = torch.arange(0, n - 1, step, device=kept.device)
        kept = torch.cat([kept, uniform[~torch.isin(uniform, kept)]])
    pruned = torch.ones(n, dtype=torch.bool, device=kept.device).index_fill(0, kept, False)
    rest = pruned.nonzero().flatten()
    x = hidden[kept]
    if config.neighbors > 0 and n > 1:
        unit = torch.nn.functional.normalize(keys.float(), dim=-1)
        sim = unit[kept] @ unit.T
        sim[torch.arange(kept.numel(), device=sim.device), kept] = float("-inf")  # not itself
        neighbor = sim.topk(min(config.neighbors, n - 1), dim=1).indices
        x = x + (a[neighbor].to(hidden.dtype)[..., None] * hidden[neighbor]).sum(1)
    extra = (a[rest].to(hidden.dtype)[:, None] * hidden[rest]).sum(0, keepdim=True)
    assignment = torch.full((n,), kept.numel(), dtype=torch.long, device=kept.device)
    assignment[kept] = torch.arange(kept.numel(), device=kept.device)
    return kept, torch.cat([x, extra]), assignment


class _PruMergeBase(VisionMethod):
    plus = False

    def attach(self, handle) -> None:
        self.tower_features = TowerFeatures(handle, self.name) if self.config.variant == "reference" else None

    @property
    def vision_layer(self) -> int:
        return self.config.layer

    def tower_signals(self, q, k, scale, num_prefix):
        return attention_and_keys(q, k, scale, num_prefix, single_head=True)

    def reduce(self, features: torch.Tensor, context: ReduceContext) -> Reduction:
        attention = context.signals["attention"].to(features.device)
        keys = context.signals["keys"].to(features.device)
        if self.config.variant == "reference":
            return self._reduce_reference(features, attention, keys, context)
        counts: list | None = None
        if self.config.keep is None or self.plus:
            # the one read of the stage: every group's data-dependent counts at once
            groups = content_groups(context.layout, per_crop=True)
            stacked = torch.stack([
                group_counts(attention[g.to(features.device)], g.numel(), self.config, self.plus) for g in groups
            ])
            counts = iter(stacked.tolist())
        return reduce_per_crop(
            features, context,
            lambda group: prumerge_group(
                features, attention, keys, group, self.config, self.plus,
                None if counts is None else tuple(next(counts)),
            ),
        )


    def _reduce_reference(self, features, attention, keys, context: ReduceContext) -> Reduction:
        if self.tower_features is None:
            raise RuntimeError(f"{self.name!r} with variant='reference' runs only inside a model wrapped by tr.wrap")
        (group,) = content_groups(context.layout, per_crop=False)
        group = group.to(features.device)
        row = self.tower_features.row(context.item, self.name).to(features.device)
        hidden = row[self.tower_features.num_prefix:][: group.numel()]
        kept, outputs, slot = prumerge_reference(hidden, attention[group], keys[group], self.config, self.plus)
        projected = self.tower_features.project(outputs).to(features.dtype)
        assignment = torch.full((features.shape[0],), -1, dtype=torch.long, device=features.device)
        assignment[group] = slot
        sources = padded_sources(group[kept], projected.shape[0])
        return Reduction(sources=sources, features=projected, assignment=assignment, info={"order": "reference"})


@register_method("prumerge", config_cls=PruMergeConfig, families=FAMILIES)
class PruMergeMethod(_PruMergeBase):
    """Adaptive count by IQR outliers of [CLS] attention, attention-weighted merging (PruMerge)."""


@register_method("prumerge_plus", config_cls=PruMergePlusConfig, families=FAMILIES)
class PruMergePlusMethod(_PruMergeBase):
    """PruMerge plus spatially uniform tokens (PruMerge+)."""

    plus = True
