"""Layout of one image's or one video's visual tokens as the language model receives them.

An item's tokens are a concatenation of segments: LLaVA-1.5 has one 24x24 grid; LLaVA-NeXT has the base
image's grid followed by the unpadded high-resolution canvas, each row ended by an ``image_newline``
token; a video has one grid per frame (and LLaVA-OneVision one trailing newline). Methods use the layout
to work per crop, per frame and per row, and to leave newline slots alone; the core uses it for
overlays and statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass(frozen=True)
class Segment:
    """A grid of ``rows x cols`` tokens in raster order, with a newline token after each row if ``newline``.

    ``kind`` is ``"base"`` (the thumbnail of an anyres image, or the single image), ``"crop"`` (the
    high-resolution canvas of an anyres image, made of ``crop_grid`` sub-images), ``"frame"`` (one video
    frame or temporal patch), or ``"newline"`` (a lone newline token: ``rows=1, cols=0, newline=True``).
    ``source_rows`` / ``source_cols`` give the grid's extent in the source crop grid when the canvas was
    resized (LLaVA-OneVision's anyres_max downsampling); they equal ``rows`` / ``cols`` otherwise.
    ``crop_index`` ``(row, col)`` marks a ``"crop"`` segment that is ONE sub-image, at that cell of the
    ``crop_grid`` (cropping models such as mPLUG-DocOwl, which encode every sub-image as its own grid);
    ``None`` for a canvas that spans the whole grid.
    """

    kind: str
    rows: int
    cols: int
    newline: bool = False
    time: int = 0
    crop_grid: tuple[int, int] = (1, 1)
    source_rows: int | None = None
    source_cols: int | None = None
    crop_index: tuple[int, int] | None = None

    @property
    def num_tokens(self) -> int:
        return self.rows * (self.cols + int(self.newline))


@dataclass(frozen=True)
class TokenLayout:
    """Segments of one item (an image or a video), in the order their tokens reach the LLM."""

    modality: str
    segments: tuple[Segment, ...]
    # Size of the image (height, width) in pixels when known; used for overlays.
    image_size: tuple[int, int] | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @cached_property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.segments)

    @cached_property
    def _arrays(self) -> dict[str, torch.Tensor]:
        seg, row, col, nl, time = [], [], [], [], []
        for i, s in enumerate(self.segments):
            width = s.cols + int(s.newline)
            r = torch.arange(s.rows).repeat_interleave(width)
            c = torch.arange(width).repeat(s.rows)
            seg.append(torch.full((s.num_tokens,), i))
            row.append(r)
            col.append(c)
            nl.append(c == s.cols if s.newline else torch.zeros(s.num_tokens, dtype=torch.bool))
            time.append(torch.full((s.num_tokens,), s.time))
        cat = (lambda xs: torch.cat(xs)) if seg else (lambda xs: torch.zeros(0, dtype=torch.long))
        return {
            "segment": cat(seg).long(),
            "row": cat(row).long(),
            "col": cat(col).long(),
            "newline": cat(nl).bool() if nl else torch.zeros(0, dtype=torch.bool),
            "time": cat(time).long(),
        }

    @property
    def segment_ids(self) -> torch.Tensor:
        """Segment index of every token, shape ``[N]``."""
        return self._arrays["segment"]

    @property
    def rows(self) -> torch.Tensor:
        """Row of every token inside its segment's grid."""
        return self._arrays["row"]

    @property
    def cols(self) -> torch.Tensor:
        """Column of every token inside its segment's grid (the newline slot has column ``cols``)."""
        return self._arrays["col"]

    @property
    def is_newline(self) -> torch.Tensor:
        """True for newline slots."""
        return self._arrays["newline"]

    @property
    def times(self) -> torch.Tensor:
        """Frame (temporal) index of every token; 0 for images."""
        return self._arrays["time"]

    @property
    def content_mask(self) -> torch.Tensor:
        """True for tokens that carry visual content (everything but newline slots)."""
        return ~self.is_newline

    def segment_slices(self) -> list[slice]:
        """Token range of each segment."""
        out, start = [], 0
        for s in self.segments:
            out.append(slice(start, start + s.num_tokens))
            start += s.num_tokens
        return out

    @staticmethod
    def grid(modality: str, rows: int, cols: int, **kwargs) -> TokenLayout:
        """A single-grid layout (LLaVA-1.5 style)."""
        return TokenLayout(modality, (Segment("base", rows, cols),), **kwargs)

    @staticmethod
    def flat(modality: str, num_tokens: int) -> TokenLayout:
        """A layout with no known structure: one row of ``num_tokens`` tokens."""
        return TokenLayout(modality, (Segment("base", 1, num_tokens),))

    @staticmethod
    def square_or_flat(modality: str, num_tokens: int) -> TokenLayout:
        """A square grid when ``num_tokens`` is a square, else a flat layout: what a count alone tells."""
        side = round(num_tokens**0.5)
        return TokenLayout.grid(modality, side, side) if side * side == num_tokens else TokenLayout.flat(modality, num_tokens)
