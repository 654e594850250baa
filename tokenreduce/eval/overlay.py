"""Which visual tokens a method kept (or merged into which), drawn on the image, page or video frames.

The mapping from the token layout to pixels lives in :func:`token_boxes`, in one place:

* a single grid (LLaVA-1.5) covers the part of the image the processor fed to the vision tower:
  the centred crop (``fit="center_crop"``, CLIP's default), the image padded to the grid's aspect
  (``"pad"``, LLaVA's ``expand2square``) or the whole image resized (``"stretch"``);
* an anyres image (LLaVA-NeXT / OneVision) has a base grid of the whole image squashed to a square and a
  high-resolution canvas whose grid, once the model has removed the padding, spans the whole image;
* Qwen2-VL grids span the whole (resized) image; a video has one grid per frame (Qwen: per temporal
  patch of ``frames / segments`` frames);
* a crop segment with a ``crop_index`` (one sub-image of a cropping model such as mPLUG-DocOwl) covers its
  cell of the ``crop_grid`` over the whole image; such crops share one panel.

When a method records per-crop budgets (``info["crops"]`` and ``info["token_crop"]``, as
``doc_correlation`` does), every crop is outlined and labelled with the tokens it kept out of its total.

Newline slots and CLS tokens have no area (NaN boxes).
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tokenreduce.core.layout import Segment, TokenLayout

FITS = ("center_crop", "pad", "stretch")


# ----------------------------------------------------------------------------------------------------
# Layout (de)serialisation, for records
# ----------------------------------------------------------------------------------------------------


def layout_to_dict(layout: TokenLayout) -> dict[str, Any]:
    return {
        "modality": layout.modality,
        "image_size": list(layout.image_size) if layout.image_size else None,
        "segments": [
            {"kind": s.kind, "rows": s.rows, "cols": s.cols, "newline": s.newline, "time": s.time,
             "crop_grid": list(s.crop_grid), **({"crop_index": list(s.crop_index)} if s.crop_index else {})}
            for s in layout.segments
        ],
    }


def layout_from_dict(data: Mapping[str, Any]) -> TokenLayout:
    segments = tuple(
        Segment(kind=s["kind"], rows=int(s["rows"]), cols=int(s["cols"]), newline=bool(s.get("newline")),
                time=int(s.get("time", 0)), crop_grid=tuple(s.get("crop_grid", (1, 1))),
                crop_index=tuple(s["crop_index"]) if s.get("crop_index") is not None else None)
        for s in data["segments"]
    )
    size = data.get("image_size")
    return TokenLayout(data["modality"], segments, image_size=tuple(size) if size else None)


# ----------------------------------------------------------------------------------------------------
# Token -> pixels
# ----------------------------------------------------------------------------------------------------


def _region(fit: str, height: float, width: float, rows: int, cols: int) -> tuple[float, float, float, float]:
    """(x0, y0, w, h) of the area a ``rows x cols`` grid covers, in original image pixels."""
    if fit == "stretch":
        return 0.0, 0.0, float(width), float(height)
    aspect = cols / rows  # width / height of the model's input for this grid
    if fit == "center_crop":
        w = min(width, height * aspect)
        h = w / aspect
    elif fit == "pad":
        w = max(width, height * aspect)
        h = w / aspect
    else:
        raise ValueError(f"`fit` must be one of {FITS}, got {fit!r}")
    return (width - w) / 2, (height - h) / 2, w, h


def token_boxes(layout: TokenLayout, image_size: tuple[int, int], fit: str = "stretch") -> np.ndarray:
    """``[N, 5]`` array of ``(segment_time, x0, y0, x1, y1)`` per token, in pixels of the original image.

    ``image_size`` is ``(height, width)`` of the image (or video frame) as given to the processor.
    ``fit`` says how a single grid or a video frame was fitted (see the module doc); anyres images ignore
    it. Boxes are clipped to the image; tokens with no area, or padding outside the image, are NaN.
    """
    if fit not in FITS:
        raise ValueError(f"`fit` must be one of {FITS}, got {fit!r}")
    height, width = (float(v) for v in image_size)
    anyres = any(s.kind == "crop" for s in layout.segments)
    out = np.full((layout.num_tokens, 5), np.nan)
    start = 0
    for seg in layout.segments:
        n = seg.num_tokens
        if seg.cols > 0 and seg.kind != "cls":
            seg_fit = "stretch" if (anyres and seg.kind in ("base", "crop")) else fit
            x0, y0, w, h = _region(seg_fit, height, width, seg.rows, seg.cols)
            if seg.kind == "crop" and seg.crop_index is not None:  # one sub-image: its cell of the grid
                grid_h, grid_w = seg.crop_grid
                w, h = width / grid_w, height / grid_h
                x0, y0 = seg.crop_index[1] * w, seg.crop_index[0] * h
            width_slots = seg.cols + int(seg.newline)
            r = np.repeat(np.arange(seg.rows), width_slots)
            c = np.tile(np.arange(width_slots), seg.rows)
            content = c < seg.cols
            boxes = np.stack([
                np.full(n, float(seg.time)),
                x0 + c * w / seg.cols, y0 + r * h / seg.rows,
                x0 + (c + 1) * w / seg.cols, y0 + (r + 1) * h / seg.rows,
            ], axis=1)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, width)
            boxes[:, [2, 4]] = boxes[:, [2, 4]].clip(0, height)
            empty = (boxes[:, 3] <= boxes[:, 1]) | (boxes[:, 4] <= boxes[:, 2])
            boxes[~content | empty] = np.nan
            out[start : start + n] = boxes
        start += n
    return out


def fit_for(processor: Any, family: str, modality: str) -> str:
    """How ``processor`` fits an image / video frame into a single grid: ``center_crop``, ``pad`` or ``stretch``."""
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return "stretch"
    if modality == "image" and family in ("llava_next", "llava_next_video", "llava_onevision"):
        return "stretch"  # anyres: base squashed to a square, canvas unpadded by the model
    proc = getattr(processor, "video_processor" if modality == "video" else "image_processor", None)
    if proc is None:
        return "stretch"
    if getattr(proc, "do_pad", False) and modality == "image":
        return "pad"
    if getattr(proc, "do_center_crop", False):
        return "center_crop"
    return "stretch"


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------


def _colour(i: int) -> tuple[int, int, int]:
    h = (i * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.75, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def crop_labels(info: Mapping[str, Any] | None, boxes: np.ndarray) -> list[tuple[tuple[float, ...], str, int]]:
    """Per crop of a method's ``info`` (``crops`` + ``token_crop``): ``(x0, y0, x1, y1)`` around the crop's
    tokens among ``boxes`` (NaN rows ignored), a ``"c<i> kept/tokens"`` label and the crop index.

    Crops with no token in ``boxes`` are left out, so each panel labels only the crops it shows.
    """
    if not info or "crops" not in info or "token_crop" not in info:
        return []
    token_crop = np.asarray(info["token_crop"], dtype=int)
    out = []
    for crop in info["crops"]:
        sel = (token_crop == int(crop["crop"])) & ~np.isnan(boxes[:, 1])
        if not sel.any():
            continue
        b = boxes[sel]
        region = (float(b[:, 1].min()), float(b[:, 2].min()), float(b[:, 3].max()), float(b[:, 4].max()))
        kept = crop.get("kept", crop.get("budget"))
        out.append((region, f"c{crop['crop']} {kept}/{crop['tokens']}", int(crop["crop"])))
    return out


def _panel(image: np.ndarray, boxes: np.ndarray, kept: np.ndarray, slots: np.ndarray | None, title: str,
           side: int, labels: Sequence[tuple[tuple[float, ...], str, int]] = (),
           group_sizes: np.ndarray | None = None) -> Any:
    """One picture: dropped tokens dimmed, kept tokens outlined; the members of a merge group of several
    tokens outlined and lightly tinted in the group's colour (the image stays visible beneath; a token
    kept as itself is outlined like any kept token); ``labels`` (see :func:`crop_labels`) outline and name
    regions such as crops with their budgets."""
    from PIL import Image, ImageDraw

    pil = Image.fromarray(image).convert("RGB")
    scale = side / max(pil.size)
    pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))))
    shade = Image.new("RGBA", pil.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    valid = ~np.isnan(boxes[:, 1])
    merged = np.zeros(len(boxes), dtype=bool)
    if slots is not None:
        sizes = group_sizes if group_sizes is not None else np.bincount(np.maximum(slots, 0), minlength=1)
        merged = (slots >= 0) & (sizes[np.maximum(slots, 0)] > 1)
    for i in np.flatnonzero(valid):
        x0, y0, x1, y1 = (boxes[i, 1:] * scale).tolist()
        if merged[i]:
            draw.rectangle([x0, y0, x1, y1], fill=(*_colour(int(slots[i])), 45))
        elif (slots is not None and slots[i] < 0) or (slots is None and not kept[i]):
            draw.rectangle([x0, y0, x1, y1], fill=(0, 0, 0, 170))
    out = Image.alpha_composite(pil.convert("RGBA"), shade)
    draw = ImageDraw.Draw(out)
    for i in np.flatnonzero(valid & merged):
        x0, y0, x1, y1 = (boxes[i, 1:] * scale).tolist()
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(*_colour(int(slots[i])), 255), width=1)
    for i in np.flatnonzero(valid & kept & ~merged):
        x0, y0, x1, y1 = (boxes[i, 1:] * scale).tolist()
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(0, 255, 0, 255), width=1)
    for region, text, index in labels:
        x0, y0, x1, y1 = (v * scale for v in region)
        colour = _colour(index + 3)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(*colour, 255), width=2)
        tx, ty = x0 + 3, y0 + 3
        draw.rectangle([tx - 1, ty - 1, tx + 6 * len(text) + 1, ty + 10], fill=(255, 255, 255, 220))
        draw.text((tx, ty - 1), text, fill=(*colour, 255))
    canvas = Image.new("RGB", (out.width, out.height + 14), "white")
    canvas.paste(out.convert("RGB"), (0, 14))
    ImageDraw.Draw(canvas).text((2, 1), title, fill="black")
    return canvas


def _frames_for(modality: str, image: Any, video: Any) -> np.ndarray:
    if modality == "video":
        if video is None:
            raise ValueError("a video item needs `video` frames ([T, H, W, 3])")
        return np.asarray(video)
    if image is None:
        raise ValueError("an image item needs `image`")
    return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)[None]


def render_item(item: Mapping[str, Any], *, image: Any = None, video: Any = None, fit: str = "stretch",
                layers: Mapping[str, Sequence[int]] | None = None, side: int = 320) -> Any:
    """A PIL image of one item's kept tokens: one panel per grid (base / canvas / frame), one row per stage.

    ``item`` is a kept map as the runner records it: ``layout`` (dict or TokenLayout), ``sources`` (the
    original token each kept token stands for) and optional ``assignment`` (the output slot every
    original token was merged into, -1 dropped). ``layers`` maps an in-LLM pruning layer to the original
    token indices still present from that layer on; each adds a row.
    """
    from PIL import Image

    layout = item["layout"] if isinstance(item["layout"], TokenLayout) else layout_from_dict(item["layout"])
    frames = _frames_for(layout.modality, image, video)
    height, width = frames.shape[1:3]
    boxes = token_boxes(layout, (height, width), fit)
    n = layout.num_tokens
    content = visual_slots(layout)
    kept = np.zeros(n, dtype=bool)
    kept[np.asarray(item["sources"], dtype=int)] = True
    slots = None if item.get("assignment") is None else np.asarray(item["assignment"], dtype=int)
    group_sizes = None if slots is None else np.bincount(slots[slots >= 0], minlength=max(1, int(slots.max()) + 1))
    stages = [("LLM input", kept, slots)]
    for layer, tokens in sorted((layers or {}).items(), key=lambda kv: int(kv[0])):
        k = np.zeros(n, dtype=bool)
        k[np.asarray(list(tokens), dtype=int)] = True
        stages.append((f"layer {layer}+", k, None))
    # panels: every grid segment (frames: one per time step); the sub-images of a cropping model share one
    slices = layout.segment_slices()
    panels = []
    for seg, sl in zip(layout.segments, slices):
        if seg.cols == 0 or seg.kind == "cls":
            continue
        if seg.crop_index is not None and panels and panels[-1][0].crop_index is not None:
            panels[-1] = (panels[-1][0], panels[-1][1] + [sl])
        else:
            panels.append((seg, [sl]))
    info = item.get("info")
    n_times = max(1, len({seg.time for seg, _ in panels if seg.kind == "frame"}))
    per_time = max(1, frames.shape[0] // n_times)
    # Many frames: a grid of small panels per stage rather than one long strip.
    per_row = len(panels) if len(panels) <= 4 else math.ceil(math.sqrt(len(panels)))
    if len(panels) > 4:
        side = max(120, side * 5 // (2 * per_row))
    rows = []
    for title, keep, slot in stages:
        row = []
        for seg, sls in panels:
            frame = frames[min(frames.shape[0] - 1, seg.time * per_time)] if layout.modality == "video" else frames[0]
            mask = np.zeros(n, dtype=bool)
            for sl in sls:
                mask[sl] = True
            b = np.where(mask[:, None], boxes, np.nan)
            kind = "crops" if len(sls) > 1 else seg.kind
            where = f"t={seg.time}" if seg.kind == "frame" else kind
            visual = mask & content  # newline slots are not visual tokens
            if slot is not None:
                groups = len(set(slot[visual & (slot >= 0)].tolist()))
                label = f"{title} | {where} | {int(visual.sum())} -> {groups} slots"
            else:
                label = f"{title} | {where} | kept {int((keep & visual).sum())}/{int(visual.sum())}"
            regions = crop_labels(info, b) if title == "LLM input" else []
            row.append(_panel(frame, b, keep, None if slot is None else np.where(mask, slot, -1), label, side,
                              regions, group_sizes))
        rows += [row[i : i + per_row] for i in range(0, len(row), per_row)]
    width_px = max(sum(p.width for p in row) for row in rows)
    height_px = sum(max(p.height for p in row) for row in rows)
    sheet = Image.new("RGB", (width_px, height_px), "white")
    y = 0
    for row in rows:
        x = 0
        for p in row:
            sheet.paste(p, (x, y))
            x += p.width
        y += max(p.height for p in row)
    return sheet


def visual_slots(layout: TokenLayout) -> np.ndarray:
    """``[N]`` bool: which positions of ``layout`` are visual tokens (not newline slots, not CLS)."""
    out = np.zeros(layout.num_tokens, dtype=bool)
    for seg, sl in zip(layout.segments, layout.segment_slices()):
        if seg.cols == 0 or seg.kind == "cls":
            continue
        width = seg.cols + int(seg.newline)
        out[sl] = (np.arange(sl.stop - sl.start) % width) < seg.cols
    return out


def record_header(record: Mapping[str, Any], sample: Any, item: Mapping[str, Any] | None = None) -> list[str]:
    """The lines above an overlay: the cell, the question, the expected answer and the prediction (with its
    score), and a caption per segment when the method wrote captions (``langdc``)."""
    budget = record.get("budget")
    cell = f"{record.get('method')}{'' if budget is None else f' @ {100 * budget:g}%'} on {record.get('model')}"
    lines = [f"{cell} | sample {record.get('sample_id')}",
             f"Q: {getattr(sample, 'question', '')}",
             f"answer: {record.get('answer', getattr(sample, 'answer', ''))} | predicted: {record.get('prediction')!s}"
             + ("" if record.get("score") is None else f" (score {record['score']:g})")]
    info = (item or {}).get("info") or {}
    for i, caption in enumerate(info.get("captions") or []):
        frames = (info.get("segments") or [None] * (i + 1))[i]
        tokens = (info.get("caption_tokens") or [None] * (i + 1))[i]
        where = f"frames {frames[0]}-{frames[1]}" if frames else f"segment {i}"
        lines.append(f"caption, {where}{'' if tokens is None else f' ({tokens} tok)'}: {caption}")
    return lines


def with_header(picture: Any, lines: Sequence[str]) -> Any:
    """``picture`` below ``lines`` of text, wrapped to its width."""
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(picture)
    wrapped: list[str] = []
    for line in lines:
        words, current = line.split(" "), ""
        for word in words:
            trial = f"{current} {word}".strip()
            if current and draw.textlength(trial) > picture.width - 4:
                wrapped.append(current)
                current = word
            else:
                current = trial
        wrapped.append(current)
    step = 12
    sheet = Image.new("RGB", (picture.width, picture.height + step * len(wrapped) + 4), "white")
    text = ImageDraw.Draw(sheet)
    for i, line in enumerate(wrapped):
        text.text((2, 2 + step * i), line, fill="black")
    sheet.paste(picture, (0, step * len(wrapped) + 4))
    return sheet


def render_record(record: Mapping[str, Any], sample: Any, fits: Mapping[str, str] | None = None, side: int = 320) -> list[Any]:
    """Overlays (one PIL image per visual item) of a runner record that holds a ``kept`` map, each under the
    cell, the question, the answer and the prediction (:func:`record_header`)."""
    kept = record.get("kept")
    if not kept:
        raise ValueError(f"record {record.get('key')!r} holds no kept-token map (the runner stores them for "
                         "the first `keep_maps` samples of each cell)")
    images = list(getattr(sample, "images", []) or [])
    out = []
    image_i = 0
    for i, item in enumerate(kept["items"]):
        layers = {k: [t for it, t in pairs if it == i] for k, pairs in (kept.get("layers") or {}).items()}
        fit = (fits or {}).get(item["modality"], item.get("fit", "stretch"))
        if item["modality"] == "image":
            image = images[image_i] if image_i < len(images) else None
            image_i += 1
            picture = render_item(item, image=image, fit=fit, layers=layers, side=side)
        else:
            picture = render_item(item, video=sample.video, fit=fit, layers=layers, side=side)
        out.append(with_header(picture, record_header(record, sample, item)))
    return out
