"""Entropy over generated positions, with HWE positions and the budget controller's decisions marked.

``tokenreduce show`` (or anyone holding ``tr.stats(model)`` rows or their JSON) calls
:func:`save_entropy_plots` to write one PNG per sample; :func:`plot_entropy` draws one record into a
matplotlib ``Figure`` (or onto a given ``Axes``). matplotlib is imported only here (the ``eval`` extra) and
without pyplot, so nothing global changes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def _record(item: Any) -> Mapping[str, Any]:
    """The ares record of a ``SampleStats``, a ``SampleStats.to_dict()``, an ``extra`` dict or a record."""
    extra = getattr(item, "extra", None)
    if isinstance(extra, Mapping):
        item = extra
    if isinstance(item, Mapping):
        if "ares" in item and isinstance(item["ares"], Mapping):
            return item["ares"]
        if isinstance(item.get("extra"), Mapping) and "ares" in item["extra"]:
            return item["extra"]["ares"]
        if "hwe_positions" in item:
            return item
    raise ValueError(
        "not an ares record: give a tr.stats(model) row (SampleStats or its to_dict()) of a model wrapped "
        "with method 'ares', or its extra['ares'] dict"
    )


def plot_entropy(item: Any, ax: Any = None, title: str | None = None) -> Any:
    """Draw token entropy and window entropy over generated positions, HWE positions marked.

    Also draws the per-trajectory HWE threshold ``θ_i``, the fixed threshold when one was set, and, with
    the budget controller on, the budget and the position where the reasoning span was closed.

    Args:
        item: a ``tr.stats(model)`` row of an ``ares``-wrapped model (or its ``to_dict()`` / record); it
            must hold traces (``record_traces=True``, the default).
        ax: matplotlib ``Axes`` to draw on; a new figure is made when ``None``.
        title: axes title; a summary line by default.

    Returns:
        The matplotlib ``Figure``.
    """
    from matplotlib.figure import Figure

    rec = _record(item)
    if "entropy" not in rec:
        raise ValueError("the record holds no entropy trace; wrap with ares(record_traces=True) to plot it")
    if ax is None:
        fig = Figure(figsize=(10, 3.6), dpi=100)
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    entropy = [math.nan if v is None else v for v in rec["entropy"]]
    windows = [math.nan if v is None else v for v in rec.get("window_entropy", [])]
    positions = list(range(len(entropy)))
    ax.plot(positions, entropy, color="#9aa5b1", linewidth=0.9, label="token entropy")
    if windows:
        label = f"window entropy (w={rec.get('window')}, {rec.get('window_mode')})"
        ax.plot(positions[: len(windows)], windows, color="#1f5fa8", linewidth=1.6, label=label)
        hwe = [p for p in rec.get("hwe_positions", []) if p < len(windows)]
        if hwe:
            ax.scatter(hwe, [windows[p] for p in hwe], color="#d1495b", s=18, zorder=3,
                       label=f"HWE (q={rec.get('hwe_quantile')})")
    if rec.get("hwe_theta") is not None:
        ax.axhline(rec["hwe_theta"], color="#d1495b", linestyle="--", linewidth=0.9, label="θ (trajectory)")
    if rec.get("hwe_threshold") is not None:
        ax.axhline(rec["hwe_threshold"], color="#edae49", linestyle=":", linewidth=1.2, label="fixed threshold")
    if rec.get("budget") is not None:
        ax.axvline(rec["budget"], color="#66a182", linestyle="--", linewidth=1.0, label="budget")
    if rec.get("reasoning_closed"):
        ax.axvline(rec["reasoning_tokens"], color="#00798c", linewidth=1.4,
                   label=f"reasoning closed ({rec['reasoning_closed']})")
    ax.set_xlabel("generated position")
    ax.set_ylabel("entropy (nats)")
    if title is None:
        parts = [f"{rec.get('generated_tokens', len(entropy))} tokens",
                 f"{len(rec.get('hwe_positions', []))} HWE"]
        if rec.get("difficulty"):
            parts.append(f"difficulty {rec['difficulty']} ({rec.get('difficulty_source')})")
        title = ", ".join(parts)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.25)
    fig.tight_layout()
    return fig


def save_entropy_plots(
    samples: Any, out_dir: str | os.PathLike, prefix: str = "ares", dpi: int = 100
) -> list[Path]:
    """Write ``<prefix>_call<c>_row<r>.png`` for every sample that holds an ares trace; returns the paths.

    ``samples`` is a ``Stats`` (``tr.stats(model)``), an iterable of ``SampleStats`` or of their
    ``to_dict()`` (as stored in run records), or of bare ares records.
    """
    rows: Iterable[Any] = getattr(samples, "samples", samples)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, row in enumerate(rows):
        try:
            rec = _record(row)
        except ValueError:
            continue
        if "entropy" not in rec:
            continue
        call = getattr(row, "call", None) if not isinstance(row, Mapping) else row.get("call")
        index = getattr(row, "row", None) if not isinstance(row, Mapping) else row.get("row")
        stem = f"{prefix}_call{call}_row{index}" if call is not None and index is not None else f"{prefix}_{i}"
        path = out / f"{stem}.png"
        fig = plot_entropy(rec)
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    return paths
