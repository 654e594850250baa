"""``tome``: Token Merging inside the ViT blocks (Bolya et al., ICLR'23).

In every block, between attention and MLP, the tokens split alternately into sets A and B; each A token
finds its most similar B token by the attention keys (head mean, cosine); the ``r`` best-matched A tokens
are merged into their matches by a size-weighted average. Token sizes are tracked and attention is
proportional (``log(size)`` added to the logits) so a merged token weighs as much as its members. Prefix
tokens (CLS, registers) are never merged. Kept tokens stay in spatial order (``variant="reference"``: in the
official code's order, ``cat([unmerged, dst])`` after each merge).

Works on a bare timm / open_clip / HF CLIP-SigLIP ViT (``tr.wrap(vit, "tome", r=8)``) and on LLaVA-1.5,
whose single-grid tower output can shrink; there, merging runs in the blocks up to the feature layer and
each merged token is placed at the position of its first member in raster order. Anyres and video
families pack fixed crop grids after the tower, so merging inside their tower is not supported.

``tome_projector`` runs the same bipartite soft matching on the projected tokens of each item instead
(cosine of the features, size-weighted averages, ``r`` per round at most half of what remains) until
``keep`` tokens are left. It works on every family and merges across a whole video, so it reaches budgets
below one token per frame, where video token-reduction papers compare against ToMe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokenreduce import kernels
from tokenreduce.adapters.towers import merging_block_forward
from tokenreduce.core.config import MethodConfig, check_choice, check_keep, check_range, resolve_keep
from tokenreduce.core.reduction import ProjectorMethod, ReduceContext, Reduction, VisionMethod
from tokenreduce.core.registry import register_method
from tokenreduce.core.stats import ItemStats

VARIANTS = ("default", "reference")
ORDERS = {"default": "spatial", "reference": "reference"}


@dataclass
class ToMeConfig(MethodConfig):
    """Options of ``tome``. Set ``r`` or ``keep`` (neither: ``r = 16``).

    Attributes:
        r: tokens merged in every block (ToMe's setting; at most half of the mergeable tokens per block).
        keep: alternatively, the fraction of patch tokens left at the tower output; ``r`` per block is then
            spread evenly over the merging blocks.
        proportional_attention: add ``log(size)`` to attention logits (the paper's default).
        variant: ``"default"`` keeps the tokens in spatial order after every merge; ``"reference"``
            orders them as the official code does (``cat([unmerged, dst])``), which changes which tokens
            the next block's alternating split pairs.
    """

    r: int | None = None
    keep: float | None = None
    proportional_attention: bool = True
    variant: str = "default"

    def validate(self) -> None:
        if self.r is not None and self.keep is not None:
            raise ValueError(f"set one of `r` and `keep`, not both; got r={self.r!r}, keep={self.keep!r}")
        if self.r is None and self.keep is None:
            self.r = 16
        if self.r is not None:
            check_range("r", self.r, 0, integer=True)
        if self.keep is not None:
            check_range("keep", self.keep, 0.0, 1.0, low_open=True)
        check_choice("variant", self.variant, VARIANTS)


def merge_schedule(num_patches: int, blocks: int, r: int | None, keep: float | None) -> list[int]:
    """Tokens to merge in each of ``blocks`` blocks (each at most half of what remains)."""
    schedule, remaining = [], num_patches
    target = None if keep is None else max(1, math.ceil(keep * num_patches - 1e-9))
    for i in range(blocks):
        if keep is None:
            step = r
        else:
            step = math.ceil((remaining - target) / (blocks - i))
        step = max(0, min(step, remaining // 2, remaining - 1))
        schedule.append(step)
        remaining -= step
    return schedule


def merge_step(x, size, metric, slot, r: int, prefix: int, order: str = "spatial"):
    """Merge ``r`` tokens of ``x: [B, N, D]`` by bipartite soft matching on ``metric: [B, N, d]``.

    ``size: [B, N]`` patches per token; ``slot: [B, N0]`` current index of every original token (updated).
    Returns the merged ``x``, ``size`` and ``slot``. ``order="spatial"`` keeps the tokens in their order;
    ``order="reference"`` returns them as the official ToMe does, ``cat([unmerged A, all of B])``: the
    unmerged A tokens (even positions) ascending when a prefix token is protected, else by decreasing
    match score, then every B token (odd positions) in order; with two prefix tokens (class and
    distillation) those two lead (see :func:`reference_permutation`).
    """
    b, n, d = x.shape
    if r <= 0:
        return x, size, slot
    protect = torch.zeros(b, n, dtype=torch.bool, device=x.device)
    protect[:, :prefix] = True
    # A row of NaN / inf (a corrupt image) must not fail its batch: it is matched on zeros, its merged tokens
    # stay NaN as the unwrapped model's would, and finite rows are untouched.
    metric = torch.nan_to_num(metric, nan=0.0, posinf=0.0, neginf=0.0)
    best, score = kernels.bipartite_matching(metric, protect=protect, assume_finite=True)
    ranked = torch.sort(score, dim=1, descending=True, stable=True).indices
    order_a = ranked[:, :r]  # A positions merged
    src = 2 * order_a
    dst = 2 * torch.gather(best, 1, order_a) + 1
    weighted = x * size[..., None]
    summed = weighted.scatter_add(1, dst[..., None].expand(-1, -1, d), torch.gather(weighted, 1, src[..., None].expand(-1, -1, d)))
    sizes = size.scatter_add(1, dst, torch.gather(size, 1, src))
    keep = torch.ones(b, n, dtype=torch.bool, device=x.device).scatter(1, src, False)
    if order == "reference":
        kept = reference_permutation(ranked, r, n, prefix)
        rank = torch.arange(n - r, device=x.device).expand(b, -1)
        new_index = torch.zeros(b, n, dtype=torch.long, device=x.device).scatter(1, kept, rank)
    else:
        new_index = keep.long().cumsum(1) - 1  # new position of every kept token
        # the n - r kept positions in order (a stable sort puts kept before merged): sizes known, no host read
        kept = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, : n - r]
    new_index = new_index.scatter(1, src, torch.gather(new_index, 1, dst))  # merged tokens follow their target
    means = summed / sizes[..., None].to(summed.dtype)
    merged = torch.gather(means, 1, kept[..., None].expand(-1, -1, d)).to(x.dtype)
    return merged, torch.gather(sizes, 1, kept), torch.gather(new_index, 1, slot)


def reference_permutation(ranked: torch.Tensor, r: int, n: int, prefix: int) -> torch.Tensor:
    """``[B, n - r]`` old position of each token after a merge, in the official ToMe's order.

    ``ranked``: A indices by decreasing match score (protected A tokens last). The official returns
    ``cat([unm, dst])``: the unmerged A tokens (sorted ascending when there is a class token, which
    keeps it first; in score order otherwise), then all B tokens; with a class and a distillation token,
    ``[unm[:1], dst[:1], unm[1:], dst[1:]]``.
    """
    b = ranked.shape[0]
    unmerged = ranked[:, r:]
    if prefix > 0:
        unmerged = unmerged.sort(dim=1).values
    unmerged = 2 * unmerged
    odd = torch.arange(1, n, 2, device=ranked.device).expand(b, -1)
    if prefix >= 2:
        return torch.cat([unmerged[:, :1], odd[:, :1], unmerged[:, 1:], odd[:, 1:]], dim=1)
    return torch.cat([unmerged, odd], dim=1)


class _State:
    def __init__(self, prefix: int):
        self.prefix = prefix
        self.size = None
        self.slot = None
        self.schedule: list[int] = []
        self.block = 0
        self.merged = False  # whether a block merged tokens yet


@register_method(
    "tome", config_cls=ToMeConfig,
    families=("llava", "hf_vision_tower", "timm_vit", "open_clip_vit"),
)
class ToMeMethod(VisionMethod):
    """Token Merging inside the vision tower's blocks, with proportional attention."""

    changes_encoder_output = True

    def attach(self, handle) -> None:
        self.handle = handle
        tower = handle.adapter.tower
        if tower is None:
            raise TypeError(f"tome needs a ViT tower; {handle.adapter.describe()} has none that is supported")
        self.tower = tower
        blocks = tower.blocks
        merge_until = len(blocks)
        if handle.adapter.is_vlm:
            layer = handle.adapter.config.vision_feature_layer
            if not isinstance(layer, int):
                raise TypeError("tome needs a single `vision_feature_layer`; this model concatenates several")
            merge_until = layer if layer > 0 else len(blocks) + 1 + layer  # hidden_states[i] = after block i-1
        self.merge_blocks = merge_until
        self.state = _State(tower.num_prefix_tokens)
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []
        target = tower._visual if tower.kind == "open_clip" else tower.module
        handle.register_hook(target.register_forward_pre_hook(self._start))
        if not handle.adapter.is_vlm:
            handle.register_hook(target.register_forward_hook(self._finish_bare))
        for i, block in enumerate(blocks):
            handle.patch(block, "forward", self._block_forward(i, block, tower.parts(block)))

    def _start(self, module, args):
        self.state = _State(self.tower.num_prefix_tokens)
        self.records.clear()

    def _block_forward(self, index: int, block, parts):
        original = type(block).forward.__get__(block)
        tome = self

        def forward(x, *args, **kwargs):
            state = tome.state
            if not tome.handle.enabled or index >= tome.merge_blocks:
                return original(x, *args, **kwargs)
            batch_first = not (tome.tower.kind == "open_clip" and not getattr(block.attn, "batch_first", True))
            h = x if batch_first else x.transpose(0, 1)
            if state.slot is None:
                b, n = h.shape[:2]
                state.size = torch.ones(b, n, device=h.device, dtype=torch.float32)
                state.slot = torch.arange(n, device=h.device).expand(b, -1).contiguous()
                state.schedule = merge_schedule(n - state.prefix, tome.merge_blocks, tome.config.r, tome.config.keep)
            r = state.schedule[index]
            if r == 0 and not state.merged:
                # Nothing merged so far: the block itself, as the plain model runs it (attention weights too).
                out = original(x, *args, **kwargs)
                if index == tome.merge_blocks - 1:
                    tome.records.append(state.slot.clone())
                return out
            state.merged = True

            def merge(y, metric):
                y, state.size, state.slot = merge_step(y, state.size, metric, state.slot, r, state.prefix,
                                                       ORDERS[tome.config.variant])
                return y, state.size

            size = state.size if tome.config.proportional_attention else None
            out, _ = merging_block_forward(parts, h, size, merge)
            if index == tome.merge_blocks - 1:
                tome.records.append(state.slot.clone())
            return out if batch_first else out.transpose(0, 1)

        return forward

    def _finish_bare(self, module, args, output):
        if self.records:
            slots = torch.cat(self.records)
            self.records.clear()
            prefix = self.state.prefix
            rows = self.handle.stats.new_call(slots.shape[0])
            for r, sample in enumerate(rows):
                n_out = int(slots[r].max()) + 1 - prefix
                sample.items.append(ItemStats("image", slots.shape[1] - prefix, n_out, 0.0))
        return None

    def reduce(self, features: torch.Tensor, context: ReduceContext) -> Reduction:
        if not self.records:  # features computed elsewhere (precomputed): nothing was merged
            return Reduction(sources=torch.arange(features.shape[0], device=features.device))
        slot = torch.cat(self.records)[context.item].to(features.device)
        n_layout = context.layout.num_tokens
        # Layout token j is tower token j + offset (the CLS token is dropped under "default").
        offset = slot.numel() - n_layout
        slot_of_token = slot[offset:] - offset
        n_out = features.shape[0]
        owner = torch.arange(n_layout, device=features.device)
        first = torch.full((n_out,), n_layout, dtype=torch.long, device=features.device)
        first.scatter_reduce_(0, slot_of_token, owner, reduce="amin")
        return Reduction(sources=first, features=features, assignment=slot_of_token)


@dataclass
class ToMeProjectorConfig(MethodConfig):
    """Options of ``tome_projector``.

    Attributes:
        keep: tokens left per item: a count (int >= 1) or a fraction of its tokens (float in (0, 1]).
        variant: ``"default"`` (spatial order after each round) or ``"reference"`` (each round orders
            the tokens as the official ToMe's merge does; no [CLS] here, so unmerged ones by match score).
    """

    keep: int | float = 0.25
    variant: str = "default"

    def validate(self) -> None:
        check_keep("keep", self.keep)
        check_choice("variant", self.variant, VARIANTS)


def merge_tokens(x: torch.Tensor, k: int, order: str = "spatial") -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x: [N, D]`` down to ``k`` tokens by rounds of bipartite soft matching on ``x`` itself.

    Returns the merged ``[k, D]`` tokens (size-weighted means, in the order the rounds keep) and the
    ``[N]`` slot every original token ended in.
    """
    n = x.shape[0]
    merged = x[None].float()
    size = torch.ones(1, n, device=x.device)
    slot = torch.arange(n, device=x.device)[None]
    while merged.shape[1] > k:
        r = min(merged.shape[1] // 2, merged.shape[1] - k)
        merged, size, slot = merge_step(merged, size, merged, slot, r, 0, order)
    return merged[0].to(x.dtype), slot[0]


@register_method("tome_projector", config_cls=ToMeProjectorConfig)
class ToMeProjectorMethod(ProjectorMethod):
    """ToMe's bipartite soft matching on each item's projected tokens, down to ``keep`` tokens."""

    def reduce(self, features: torch.Tensor, context: ReduceContext) -> Reduction:
        n = features.shape[0]
        merged, slot = merge_tokens(features, resolve_keep(self.config.keep, n), ORDERS[self.config.variant])
        # each merged token stands at its first member
        first = torch.full((merged.shape[0],), n, dtype=torch.long, device=features.device)
        first.scatter_reduce_(0, slot, torch.arange(n, device=features.device), reduce="amin")
        return Reduction(sources=first, features=merged, assignment=slot)
