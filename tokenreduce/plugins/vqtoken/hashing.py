"""The token hash: where every code occurs in the video, kept next to the code tokens.

The paper indexes grid token ``(f, h, w)`` as ``i = f*H*W + h*W + w`` and keeps the index map
``M[f, h, w] = code of token i`` (``T x H x W``), so positions and motion survive although only one token
per code reaches the LLM. Here the map lives in ``Reduction.info["index_map"]`` and is what VQ-attention
reads.

Which original token a code token stands at (its ``source``) decides its place in the sequence, and
with ``renumber_positions=False`` its position ids:

* ``"first"``: the code's first occurrence in raster order ``(f, h, w)``; code tokens then appear in the
  order the codes first show up in the video;
* ``"representative"``: the member closest to its codeword; with ``renumber_positions=False`` the code
  token takes that token's position (on Qwen2-VL its temporal/height/width M-RoPE ids).
"""

from __future__ import annotations

import torch

from tokenreduce.core.layout import TokenLayout

ANCHORS = ("first", "representative")


def anchors(codes: torch.Tensor, similarity: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    """Per code ``0..k-1``: the index (into ``codes``) of its anchor token, ``-1`` for unused codes."""
    n = codes.numel()
    index = torch.arange(n, device=codes.device)
    if mode == "first":
        out = torch.full((k,), n, dtype=torch.long, device=codes.device)
        out.scatter_reduce_(0, codes, index, reduce="amin")
    elif mode == "representative":
        # the most similar member; ties go to the earliest token
        best = torch.full((k,), float("-inf"), dtype=torch.float32, device=codes.device)
        best.scatter_reduce_(0, codes, similarity.float(), reduce="amax")
        is_best = similarity.float() == best[codes]
        out = torch.full((k,), n, dtype=torch.long, device=codes.device)
        out.scatter_reduce_(0, codes[is_best], index[is_best], reduce="amin")
    else:
        raise ValueError(f"`anchor` must be one of {ANCHORS}, got {mode!r}")
    return torch.where(out < n, out, torch.full_like(out, -1))


def grid_coordinates(layout: TokenLayout, content: torch.Tensor) -> torch.Tensor:
    """``[N_content, 3]`` float coordinates ``(t, y, x)`` in ``[0, 1)`` of the content tokens.

    ``t`` is the frame's time over the number of frames (0 for images); ``y``, ``x`` the row and column over
    the segment's grid. Works for any layout (frames, anyres crops of different grids, flat sequences).
    """
    times = layout.times[content].float()
    frames = float(int(layout.times.max()) + 1) if layout.num_tokens else 1.0
    seg = layout.segment_ids[content]
    rows = torch.tensor([max(1, s.rows) for s in layout.segments], dtype=torch.float32)[seg]
    cols = torch.tensor([max(1, s.cols) for s in layout.segments], dtype=torch.float32)[seg]
    return torch.stack(
        [times / frames, layout.rows[content].float() / rows, layout.cols[content].float() / cols], 1
    )


def frame_grid(layout: TokenLayout, num_content: int) -> tuple[int, int, int] | None:
    """``(frames, rows, cols)`` when the item's ``num_content`` content tokens fill content segments that all
    share one grid (video frames), else ``None``."""
    segments = [s for s in layout.segments if s.cols > 0]
    grids = {(s.rows, s.cols) for s in segments}
    if len(grids) != 1 or sum(s.rows * s.cols for s in segments) != num_content:
        return None
    rows, cols = grids.pop()
    return len(segments), rows, cols


def index_map(layout: TokenLayout, content: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The ``T x H x W`` map of code ids when every content segment has the same grid, else ``[1, 1, N]``.

    ``content`` are the item's content-token indices (raster order), ``codes`` their code ids.
    """
    grid = frame_grid(layout, codes.numel())
    if grid is not None:
        return codes.reshape(grid)
    return codes.reshape(1, 1, -1)


def occupancy(coords: torch.Tensor, codes: torch.Tensor, k: int, bins: tuple[int, int, int]) -> torch.Tensor:
    """``[k, bt*bh*bw]``: for every code, the share of each space-time bin's tokens that carry it.

    The one-hot index map pooled onto a fixed ``bins`` grid, so one VQ-attention module serves any frame
    count and resolution (the paper flattens the full map, which fixes ``T x H x W``). A bin's shares sum to
    1 over the codes; empty bins (fewer frames than time bins) are filled from the nearest earlier bin.
    """
    bt, bh, bw = bins
    scale = torch.tensor([bt, bh, bw], dtype=torch.float32, device=coords.device)
    cell = (coords.to(scale.device) * scale).floor().long()
    cell = torch.minimum(cell, (scale.long() - 1)[None])
    flat = (cell[:, 0] * bh + cell[:, 1]) * bw + cell[:, 2]
    size = bt * bh * bw
    counts = torch.zeros(size, device=coords.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.float32)
    )
    hist = torch.zeros(k, size, device=coords.device)
    hist.index_put_(
        (codes.to(coords.device), flat), torch.ones_like(flat, dtype=torch.float32), accumulate=True
    )
    hist = hist / counts.clamp_min(1.0)[None]
    # time bins without tokens (short clips): copy the previous filled time bin
    hist = hist.view(k, bt, bh * bw)
    filled = counts.view(bt, bh * bw).sum(1) > 0
    last = 0
    for t in range(bt):
        if bool(filled[t]):
            last = t
        elif bool(filled[: t + 1].any()):
            hist[:, t] = hist[:, last]
    return hist.reshape(k, size)


def _code_time_bins(coords: torch.Tensor, codes: torch.Tensor, bins: int, device: torch.device) -> torch.Tensor:
    """Per token, the flat index ``code * bins + time bin`` of its code's time bin."""
    cell = (coords[:, 0].to(device) * bins).floor().long().clamp_(0, bins - 1)
    return codes.to(device) * bins + cell


def trajectories(
    coords: torch.Tensor, codes: torch.Tensor, members: torch.Tensor, k: int, bins: int
) -> torch.Tensor:
    """``[k, bins, D]``: every code's mean member per time bin, zeros where the code has none in that bin.

    ``coords`` are the members' ``(t, y, x)`` from :func:`grid_coordinates`, ``codes`` their code ids and
    ``members`` their features (what the codewords average). The codeword is the mean over all bins; how the
    bin means differ from it says what joins or leaves the code over time.
    """
    flat = _code_time_bins(coords, codes, bins, members.device)
    sums = torch.zeros(k * bins, members.shape[1], dtype=members.dtype, device=members.device)
    sums.index_add_(0, flat, members)
    counts = torch.bincount(flat, minlength=k * bins).clamp_min(1).to(members.dtype)
    return (sums / counts[:, None]).view(k, bins, -1)


def frame_differences(layout: TokenLayout, content: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``[N, D]``: every content token minus the token at the same cell of the frame before it.

    Zeros in the first frame, and for every token when the content segments do not share one grid (then no
    cell has a frame before it). ``tokens`` are the item's content tokens in raster order ``(f, h, w)``.
    """
    out = torch.zeros_like(tokens)
    grid = frame_grid(layout, content.numel())
    if grid is None or grid[0] < 2:
        return out
    frames = tokens.view(grid[0], -1, tokens.shape[1])
    out.view_as(frames)[1:] = frames[1:] - frames[:-1]
    return out


def changes(
    coords: torch.Tensor, codes: torch.Tensor, differences: torch.Tensor, k: int, bins: int
) -> torch.Tensor:
    """``[k, bins, D]``: per code and time bin, its members' differences from the frame before, averaged
    with each difference weighted by its own norm (zeros where nothing changed).

    A colour change, an appearance or a step of a motion shows as a difference at a few cells of one frame;
    a plain mean over a code's members would dilute it by the static ones, and weighting by the norm keeps
    the changed cells' difference at its own scale without a threshold.
    """
    flat = _code_time_bins(coords, codes, bins, differences.device)
    weight = differences.norm(dim=1)
    sums = torch.zeros(k * bins, differences.shape[1], dtype=differences.dtype, device=differences.device)
    sums.index_add_(0, flat, differences * weight[:, None])
    total = torch.zeros(k * bins, dtype=differences.dtype, device=differences.device)
    total.index_add_(0, flat, weight)
    return (sums / total.clamp_min(1e-12)[:, None]).view(k, bins, -1)
