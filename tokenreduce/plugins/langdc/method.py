"""The registered ``langdc`` method and its config.

Per video, frames are grouped into segments of ``segment_frames`` consecutive frames (the layout's
``"frame"`` segments: a frame for the LLaVA families, a temporal patch of two frames for Qwen2-VL /
Qwen2.5-VL). For every segment the captioner reads the segment's visual tokens (each frame pooled to its
``frame_tokens`` grid) and writes a caption; the hidden states of the caption positions, through the
post-projector, become the segment's soft caption tokens, as many as the caption has tokens. With
``base=True`` the paper's BasePruner is added: every frame average-pooled (as ``pool``) to ``base_keep``
of the video's tokens. The LLM then reads the base tokens and the soft caption tokens of every segment.

Positions (what each output token stands for, ``Reduction.sources``):

* a base token stands at the centre token of its pooled cell, as in ``pool``;
* the ``L`` soft caption tokens of a segment stand at the segment's last ``L`` content tokens, in caption
  order (the caption summarises the segment, so it sits at its end): they get consecutive original
  position ids there, like the words of a sentence (on Qwen: the t/h/w ids of those tokens). If ``L``
  exceeds the segment's content tokens, the first caption tokens share the segment's first token;
* OneVision's trailing ``image_newline`` token is kept (``keep_newline``).

The core orders a row's tokens by source, so base tokens of a segment's last frame whose cell centre lies
inside the caption's stretch are read between caption tokens; a caption token sharing its source with a
base token comes after it. The paper instead concatenates ``[all base tokens][all caption tokens]`` after
renumbering; ``renumber_positions=True`` gives consecutive positions but keeps the order above.

``Reduction.info`` of every video: ``captions`` (text per segment), ``caption_tokens`` (per segment),
``segments`` (first and last frame time of each), ``base_tokens``, ``captioner_ms`` and
``captioner_flops`` (analytic, see :meth:`Captioner.flops`; the runner keeps item info in its records).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tokenreduce.core.config import MethodConfig, check_keep, check_range, resolve_keep
from tokenreduce.core.layout import TokenLayout
from tokenreduce.core.reduction import ProjectorMethod, ReduceContext, Reduction
from tokenreduce.core.registry import register_method
from tokenreduce.ops.pooling import pool_segment, pooled_grid

from .captioner import INPUT_WIDTHS, Captioner

VIDEO_FAMILIES = ("llava_next_video", "llava_onevision", "qwen2_vl", "qwen2_5_vl")


@dataclass
class LangDCConfig(MethodConfig):
    """Options of ``langdc``.

    Attributes:
        captioner: the trained captioner (local directory or hub repo id, see
            :class:`~tokenreduce.plugins.langdc.captioner.Captioner`); required to wrap a model. Trained by
            ``python -m tokenreduce.plugins.langdc.training``; the one for the shipped synthetic video
            model is ``assets/langdc/synthetic-onevision-video``.
        base: add the pooled base branch (the paper's BasePruner + CapPruner); ``False`` feeds the soft
            caption tokens only (the paper's "CapPruner only"); ``None``: as the captioner was aligned
            (its ``training["base"]``, else ``True``), since its post-projector and VLM adapters learnt to be
            read with or without base tokens.
        base_keep: tokens of a video the base branch keeps: a count (int >= 1) or a fraction of its
            content tokens (float in (0, 1]), shared by the frames in proportion to their size; every frame
            is average-pooled on its own grid. The paper pools 16x16 to 4x4 (1/16).
        segment_frames: frames (layout ``"frame"`` segments) per captioned segment; ``None``: what the
            captioner was trained with.
        max_caption_tokens: most caption tokens per segment; ``None``: the captioner's own limit.
        keep_newline: keep a video's lone trailing newline token (LLaVA-OneVision).
        modalities: videos by default. With ``"image"`` an image is captioned as one segment made of its
            grids (base image and high-resolution canvas).
    """

    captioner: str | None = None
    base: bool | None = None
    base_keep: int | float = 0.11
    segment_frames: int | None = None
    max_caption_tokens: int | None = None
    keep_newline: bool = True

    def validate(self) -> None:
        if self.captioner is not None and (not isinstance(self.captioner, str) or not self.captioner):
            raise ValueError(
                f"`captioner` must be a local directory or hub repo id (a non-empty str), got {self.captioner!r}"
            )
        if self.base is not None and not isinstance(self.base, bool):
            raise ValueError(f"`base` must be a bool or None (as the captioner was aligned), got {self.base!r}")
        if not isinstance(self.keep_newline, bool):
            raise ValueError(f"`keep_newline` must be a bool, got {self.keep_newline!r}")
        check_keep("base_keep", self.base_keep)
        if self.segment_frames is not None:
            check_range("segment_frames", self.segment_frames, 1, integer=True)
        if self.max_caption_tokens is not None:
            check_range("max_caption_tokens", self.max_caption_tokens, 0, integer=True)

    @classmethod
    def at_budget(cls, budget: float, num_layers: int | None = None, **options: Any) -> LangDCConfig:
        """The base branch keeps ``budget`` of the video's tokens; the soft caption tokens come on top, as
        many as the captions are long (each sample reports its count)."""
        check_range("budget", budget, 0.0, 1.0, low_open=True)
        return cls(base_keep=float(budget), **options)


@dataclass
class SegmentGroup:
    """One captioned segment of an item: its layout segments, the captioner's input, its content tokens.

    Attributes:
        segments: indices of the layout segments (frames) it covers.
        visual: ``[K, D]`` the captioner's input, every frame pooled to its ``frame_tokens`` grid (``[K, 2D]``
            or wider with the differences from the frame before, see :func:`segment_groups`).
        content: ascending indices (within the item) of its content tokens, newline slots excluded.
        frames: ``time`` of its first and last frame.
    """

    segments: list[int]
    visual: torch.Tensor
    content: torch.Tensor
    frames: tuple[int, int]


DIFFERENCES = tuple(INPUT_WIDTHS)  # "none", "cell", "neighbourhood"


def _neighbours(grid: torch.Tensor) -> torch.Tensor:
    """``[h, w, D]`` -> ``[h, w, 4D]``: each cell's neighbours above, below, left and right (zero off the grid)."""
    padded = F.pad(grid.permute(2, 0, 1), (1, 1, 1, 1)).permute(1, 2, 0)
    h, w = grid.shape[:2]
    return torch.cat([padded[:h, 1 : w + 1], padded[2:, 1 : w + 1], padded[1 : h + 1, :w], padded[1 : h + 1, 2:]], -1)


def segment_groups(features: torch.Tensor, layout: TokenLayout, segment_frames: int,
                   frame_tokens: int | None, differences: str = "none") -> list[SegmentGroup]:
    """Group a video's frames (layout ``"frame"`` segments) by ``segment_frames``, each frame pooled to the
    grid of about ``frame_tokens`` cells (``None``: unpooled). An item without frames (an image, or a flat
    layout) is one group of all its grids.

    ``differences`` appends, along the feature axis, each pooled token's difference from the same cell of the
    frame before (zero for the first frame, and where the grids differ in shape): ``"cell"`` its own
    (``[K, 2D]``), ``"neighbourhood"`` also those of the four cells around it (``[K, 6D]``). What changed is
    then a property of one token instead of a comparison across a whole frame of tokens, and with the
    neighbourhood so is where it went (an object stepping right leaves a loss on the left of its new cell)."""
    if differences not in DIFFERENCES:
        raise ValueError(f"`differences` must be one of {DIFFERENCES}, got {differences!r}")
    grids = [i for i, s in enumerate(layout.segments) if s.cols > 0]
    framed = any(layout.segments[i].kind == "frame" for i in grids)
    if framed:
        grids = [i for i in grids if layout.segments[i].kind == "frame"]
    slices = layout.segment_slices()
    pooled: dict[int, torch.Tensor] = {}
    for i in grids:
        seg, sl = layout.segments[i], slices[i]
        width = seg.cols + int(seg.newline)
        grid = features[sl].view(seg.rows, width, -1)[:, : seg.cols]
        h, w = pooled_grid(seg.rows, seg.cols, frame_tokens or seg.rows * seg.cols)
        if (h, w) != (seg.rows, seg.cols):
            grid = F.adaptive_avg_pool2d(grid.permute(2, 0, 1).float(), (h, w)).permute(1, 2, 0).to(features.dtype)
        pooled[i] = grid
    if differences != "none":
        previous = [None, *grids[:-1]] if framed else [None] * len(grids)
        for i, before in reversed(list(zip(grids, previous))):
            delta = torch.zeros_like(pooled[i])
            if before is not None and pooled[before].shape == pooled[i].shape:
                delta = pooled[i] - pooled[before]
            parts = [pooled[i], delta] + ([_neighbours(delta)] if differences == "neighbourhood" else [])
            pooled[i] = torch.cat(parts, dim=-1)
    pooled = {i: grid.reshape(-1, grid.shape[-1]) for i, grid in pooled.items()}
    chunks = [grids[j : j + segment_frames] for j in range(0, len(grids), segment_frames)] if framed else [grids]
    out = []
    for chunk in chunks:
        if not chunk:
            continue
        content = []
        for i in chunk:
            seg, sl = layout.segments[i], slices[i]
            width = seg.cols + int(seg.newline)
            cols = torch.arange(seg.cols).repeat(seg.rows) + torch.arange(seg.rows).repeat_interleave(seg.cols) * width
            content.append(sl.start + cols)
        times = (layout.segments[chunk[0]].time, layout.segments[chunk[-1]].time)
        visual = torch.cat([pooled[i] for i in chunk])
        out.append(SegmentGroup(chunk, visual, torch.cat(content).to(features.device), times))
    return out


@register_method(
    "langdc", config_cls=LangDCConfig, modalities=("video",), families=VIDEO_FAMILIES,
    description="LangDC: a small LM captions each segment of frames; its soft caption tokens (as many as "
                "the caption is long) plus a pooled base branch replace the video's tokens",
)
class LangDCMethod(ProjectorMethod):
    """LangDC: soft caption tokens of each segment (length set by the caption), plus pooled base tokens."""

    def __init__(self, config: LangDCConfig, captioner: Captioner | None = None):
        super().__init__(config)
        if captioner is None:
            if config.captioner is None:
                raise ValueError(
                    "`captioner` is required for langdc: a local directory or hub repo id of a captioner trained "
                    "for this model (python -m tokenreduce.plugins.langdc.training); the shipped synthetic "
                    "video model's is assets/langdc/synthetic-onevision-video"
                )
            captioner = Captioner.from_pretrained(config.captioner)
        self.captioner = captioner
        self.handle: Any = None
        self._hooks: list[Any] = []
        self._forced: list[list[list[int]]] | None = None

    # ----- the captioner -------------------------------------------------------------------------------
    def set_captioner(self, captioner: Captioner) -> None:
        """Use ``captioner`` (e.g. one being trained). On a wrapped model the previous captioner's VLM
        adapters are removed and ``captioner``'s installed."""
        self._remove_hooks()
        self.captioner = captioner
        if self.handle is not None:
            self._hooks = captioner.vlm_adapters.install(self.handle.adapter.language_model)

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def attach(self, handle: Any) -> None:
        width = int(handle.adapter.text_config.hidden_size)
        if self.captioner.config.vlm_hidden != width:
            raise ValueError(
                f"`captioner`={self.config.captioner!r} was trained for visual tokens of width "
                f"{self.captioner.config.vlm_hidden}; {handle.adapter.describe()} feeds its LLM tokens of width {width}"
            )
        param = next(handle.model.parameters())
        self.captioner.to(param.device)
        self.handle = handle
        self.set_captioner(self.captioner)

    def detach(self, handle: Any) -> None:
        self._remove_hooks()
        self.handle = None

    @property
    def base(self) -> bool:
        """Whether the pooled base branch is fed: the config's choice, else the captioner's alignment's."""
        if self.config.base is not None:
            return self.config.base
        return bool(self.captioner.config.training.get("base", True))

    @property
    def segment_frames(self) -> int:
        return self.config.segment_frames or self.captioner.config.segment_frames

    @property
    def max_caption_tokens(self) -> int:
        if self.config.max_caption_tokens is not None:
            return self.config.max_caption_tokens
        return self.captioner.config.max_caption_tokens

    @contextmanager
    def forced_captions(self, captions: Sequence[Sequence[Sequence[int]]]) -> Iterator[None]:
        """Training: inside the block the captioner is teacher-forced instead of generating. ``captions``
        holds, per item in the order the core reduces them (a batch's videos, row by row), the caption ids
        of each segment (e.g. the ground truth, or captions generated once and cached)."""
        previous, self._forced = self._forced, [[list(c) for c in item] for item in captions]
        try:
            yield
        finally:
            self._forced = previous

    # ----- reduction -----------------------------------------------------------------------------------
    def groups(self, features: torch.Tensor, layout: TokenLayout) -> list[SegmentGroup]:
        """The captioned segments of one item, with the captioner's pooled input."""
        config = self.captioner.config
        return segment_groups(features, layout, self.segment_frames, config.frame_tokens, config.differences)

    def caption(self, groups: list[SegmentGroup]) -> tuple[list[list[int]], list[torch.Tensor], float]:
        """Caption ids and hidden states per group (batched by input length), and the time it took in ms."""
        ids: list[list[int]] = [[] for _ in groups]
        hidden: list[torch.Tensor] = [torch.zeros(0) for _ in groups]
        forced = self._forced.pop(0) if self._forced else None
        if forced is not None and len(forced) != len(groups):
            raise ValueError(f"forced captions give {len(forced)} segments, the item has {len(groups)}")
        device = groups[0].visual.device if groups else torch.device("cpu")
        sync = device.type == "cuda"
        if sync:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        buckets: dict[int, list[int]] = {}
        for g, group in enumerate(groups):
            buckets.setdefault(group.visual.shape[0], []).append(g)
        for members in buckets.values():
            visual = torch.stack([groups[g].visual for g in members])
            if forced is None:
                out = self.captioner.generate(visual, self.max_caption_tokens)
                results = zip(out.ids, out.hidden)
            else:
                captions = [forced[g][: self.max_caption_tokens] for g in members]
                with torch.no_grad():
                    _, _, states = self.captioner.teacher_force(visual, captions)
                results = zip(captions, states)
            for g, (i, h) in zip(members, results):
                ids[g], hidden[g] = list(i), h
        if sync:
            torch.cuda.synchronize(device)
        return ids, hidden, (time.perf_counter() - start) * 1e3

    def reduce(self, features: torch.Tensor, context: ReduceContext) -> Reduction:
        layout = context.layout
        n = features.shape[0]
        device = features.device
        if context.modality not in (self.config.modalities or ("video",)):
            return Reduction(sources=torch.arange(n, device=device))
        cfg = self.config
        groups = self.groups(features, layout)
        ids, hidden, captioner_ms = self.caption(groups)

        feats, sources = [], []
        slices = layout.segment_slices()
        if self.base:
            sizes = [s.rows * s.cols for s in layout.segments]
            total = sum(sizes)
            k = resolve_keep(cfg.base_keep, total)
            for seg, sl, size in zip(layout.segments, slices, sizes):
                if size == 0 and not cfg.keep_newline:
                    continue
                target = max(1, round(k * size / total)) if size else 0
                f, s = pool_segment(features[sl], seg, sl.start, target)
                feats.append(f)
                sources.append(s.to(device))
        elif cfg.keep_newline:
            for seg, sl in zip(layout.segments, slices):
                if seg.cols == 0:
                    feats.append(features[sl])
                    sources.append(torch.arange(sl.start, sl.stop, device=device))
        base_tokens = sum(int(s.numel()) for s in sources)

        flops = 0.0
        for group, caption, states in zip(groups, ids, hidden):
            length = len(caption)
            flops += self.captioner.flops(int(group.visual.shape[0]), length)
            if length == 0:
                continue
            content = group.content.to(device)
            at = (torch.arange(length, device=device) + content.numel() - length).clamp_min(0)
            sources.append(content[at])
            feats.append(self.captioner.soft_tokens(states).to(features.dtype))
        info = {
            "captions": [self.captioner.decode(c) for c in ids],
            "caption_tokens": [len(c) for c in ids],
            "segments": [list(g.frames) for g in groups],
            "base_tokens": base_tokens,
            "captioner_ms": captioner_ms,
            "captioner_flops": flops,
        }
        if not sources:  # nothing to feed (no base, no caption, no newline): keep the item's first token
            return Reduction(sources=torch.zeros(1, dtype=torch.long, device=device), info=info)
        return Reduction(sources=torch.cat(sources), features=torch.cat(feats), info=info)
