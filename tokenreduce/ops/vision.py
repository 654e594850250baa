"""Shared pieces of the tower-signal baselines (VisionZip, PruMerge): signals and per-crop grouping."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenreduce import kernels
from tokenreduce.core.hostsync import host_only
from tokenreduce.core.layout import TokenLayout
from tokenreduce.core.reduction import ReduceContext, Reduction

GroupSelect = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def attention_and_keys(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int,
                       single_head: bool = False) -> dict[str, torch.Tensor]:
    """Per tower row: ``attention`` over patches ``[R, P]`` and head-mean ``keys`` ``[R, P, d]``.

    With a CLS token, ``attention`` is the CLS query's softmax attention over all keys, read at the
    patches (head mean; with ``single_head`` the full-width dot product scaled by ``C^-1/2``, as PruMerge's
    code computes it). Towers without CLS (SigLIP) get the attention each patch receives, averaged over
    all queries and heads.
    """
    r, h, n, d = k.shape
    if single_head:
        q = q.transpose(1, 2).reshape(r, 1, n, h * d)
        k = k.transpose(1, 2).reshape(r, 1, n, h * d)
        scale = (h * d) ** -0.5
    if num_prefix:
        attention = kernels.cls_attention(q[:, :, 0], k, scale=scale, drop_cls=False)[:, num_prefix:]
    else:
        attention = kernels.attention_importance(q, k, scale=scale)
    keys = k.mean(1)[:, num_prefix:] if not single_head else k[:, 0, num_prefix:]
    return {"attention": attention, "keys": keys}


def content_groups(layout: TokenLayout, per_crop: bool) -> list[torch.Tensor]:
    """Token indices of the groups a method works in: one per tower crop / frame, or one per item.

    Newline slots (and CLS segments) belong to no group. Read from the layout's host tables only.
    """
    with host_only():
        source = layout.extra.get("patch_source")
        content = layout.content_mask.clone()
        for seg, sl in zip(layout.segments, layout.segment_slices()):
            if seg.kind == "cls":
                content[sl] = False
        if not per_crop:
            return [content.nonzero().flatten()]
        if source is not None:
            keys = source[:, 0]
        else:
            frames = any(s.kind == "frame" for s in layout.segments)
            keys = layout.segment_ids if frames else torch.zeros_like(layout.segment_ids)
        keys = torch.where(content, keys, -1)
        return [(keys == g).nonzero().flatten() for g in torch.unique(keys[keys >= 0]).tolist()]


def count(value: int | float, n: int) -> int:
    """A per-group count: an int is taken as is (capped at ``n``), a float is a fraction of ``n``."""
    if isinstance(value, float):
        return min(n, round(value * n))
    return min(n, value)


def newline_slots(layout: TokenLayout, lone: bool) -> torch.Tensor:
    """Newline slots of ``layout`` (ascending, on the host): with ``lone``, the lone newline segments (a
    video's trailing separator, DocOwl's per-crop end token); without, the slot ending each canvas row."""
    with host_only():  # layout tables, built on the host
        newline = layout.is_newline.nonzero().flatten()
        if newline.numel() == 0:
            return newline
        is_lone = torch.tensor([s.cols == 0 for s in layout.segments])[layout.segment_ids[newline]]
        return newline[is_lone if lone else ~is_lone]


def add_newline_slots(layout: TokenLayout, features: torch.Tensor, sources: torch.Tensor, outputs: torch.Tensor,
                      assignment: torch.Tensor, rows: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append the lone newline slots (:func:`newline_slots`) to a reduction, and with ``rows`` the canvas
    rows' newline slots too (every newline slot, ascending). Every count comes from the layout, so nothing
    is read from the device.

    Returns the extended ``(sources, outputs, assignment)``.
    """
    if rows:
        with host_only():  # a layout table, built on the host
            slots = layout.is_newline.nonzero().flatten()
    else:
        slots = newline_slots(layout, lone=True)
    if slots.numel() == 0:
        return sources, outputs, assignment
    slots = slots.to(sources.device)
    assignment = assignment.clone()
    assignment[slots] = outputs.shape[0] + torch.arange(slots.numel(), device=sources.device)
    return torch.cat([sources, slots]), torch.cat([outputs, features[slots]]), assignment


def reduce_per_crop(features: torch.Tensor, context: ReduceContext, select: GroupSelect,
                    row_newlines: bool = False) -> Reduction:
    """Run ``select(group) -> (sources, outputs, slot)`` on each crop / frame group of an item and assemble
    the item's reduction: outputs group after group, then the lone newline slots. Canvas rows' newline
    slots are dropped, as VisionZip's LLaVA-NeXT code drops them, so the count is known from the budget;
    they stay with ``row_newlines`` (VisPruner's code keeps them all) or when every group keeps all its
    tokens (a full budget is the identity). That test reads the outputs' shapes, not the device."""
    sources, outputs = [], []
    assignment = torch.full((features.shape[0],), -1, dtype=torch.long, device=features.device)
    whole = True
    for group in content_groups(context.layout, per_crop=True):
        group = group.to(features.device)
        src, out, slot = select(group)
        whole = whole and src.numel() == group.numel()
        base = sum(x.numel() for x in sources)
        assignment[group] = torch.where(slot >= 0, slot + base, -1)
        sources.append(src)
        outputs.append(out)
    merged = add_newline_slots(context.layout, features, torch.cat(sources), torch.cat(outputs), assignment,
                               rows=row_newlines or whole)
    return Reduction(sources=merged[0], features=merged[1], assignment=merged[2])
