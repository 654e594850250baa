"""Entropy signals shared by generation-time tracking and the training pieces.

Token entropy and window entropy come from :mod:`tokenreduce.kernels` (``token_entropy``,
``window_entropy``); this module adds the per-trajectory quantile rule that marks high-window-entropy
(HWE) positions and the calibration of a fixed threshold from a set of trajectories.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tokenreduce.kernels import token_entropy, window_entropy

from .config import QUANTILE_SOURCES, WINDOW_MODES


def entropies_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``[..., V]`` logits -> ``[...]`` float32 token entropies in nats (streaming, differentiable)."""
    return token_entropy(logits, temperature)


def pad_traces(traces: Sequence[Sequence[float] | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad per-trajectory entropy lists into ``[B, T]`` float32 values and a ``[B, T]`` bool mask."""
    rows = [torch.as_tensor(t, dtype=torch.float32).flatten() for t in traces]
    length = max((r.numel() for r in rows), default=0)
    values = torch.zeros(len(rows), length, dtype=torch.float32)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, r in enumerate(rows):
        values[i, : r.numel()] = r
        mask[i, : r.numel()] = True
    return values, mask


def row_quantile(values: torch.Tensor, mask: torch.Tensor | None, q: float) -> torch.Tensor:
    """Per-row ``q``-quantile (linear interpolation, as ``numpy.percentile``) of the valid, finite entries.

    ``values`` is ``[B, T]``; entries outside ``mask`` or NaN are ignored; a row with none gives NaN.
    """
    x = values.float()
    valid = torch.isfinite(x)
    if mask is not None:
        valid &= mask
    x = torch.where(valid, x, torch.full_like(x, float("nan")))
    if x.shape[1] == 0:
        return torch.full((x.shape[0],), float("nan"), device=x.device)
    return torch.nanquantile(x, float(q), dim=1)


def trajectory_thresholds(
    entropy: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    quantile: float = 0.95,
    window: int = 4,
    mode: str = "forward",
    source: str = "token",
) -> torch.Tensor:
    """``[B]`` per-trajectory HWE thresholds ``θ_i``.

    ``source="token"`` is the paper's ``θ_i = Quantile_q({H_t})`` over the trajectory's token entropies;
    ``source="window"`` takes the quantile over its (complete) window entropies, as the released code does
    (the code additionally fills incomplete tail windows with the running mean; see
    :func:`tokenreduce.plugins.ares.training.code_window_percentile` for that exact variant).
    """
    if source not in QUANTILE_SOURCES:
        raise ValueError(f"`source` must be one of {QUANTILE_SOURCES}, got {source!r}")
    if source == "token":
        return row_quantile(entropy, mask, quantile)
    return row_quantile(window_entropy(entropy.float(), window, mask, mode), None, quantile)


def hwe_mask(window_values: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """``[B, T]`` bool: window entropy ``>= threshold`` (a float or ``[B]`` per row); NaN windows are never HWE."""
    if not torch.is_tensor(threshold):
        threshold = torch.tensor(float(threshold), device=window_values.device)
    thr = threshold.to(window_values.device, torch.float32)
    if thr.dim() == 1:
        thr = thr[:, None]
    out = window_values.float() >= thr
    return out & torch.isfinite(window_values)


def _trace_of(item: Any) -> Sequence[float] | torch.Tensor:
    """The token-entropy trace of a trajectory given as a list/tensor, a stats record or a ``SampleStats``."""
    extra = getattr(item, "extra", None)
    if isinstance(extra, Mapping):
        item = extra
    if isinstance(item, Mapping):
        if "ares" in item:
            item = item["ares"]
        elif "extra" in item and isinstance(item["extra"], Mapping) and "ares" in item["extra"]:
            item = item["extra"]["ares"]
        if "entropy" not in item:
            raise ValueError(
                "a trajectory record holds no `entropy` trace; wrap with ares(record_traces=True) to calibrate"
            )
        return item["entropy"]
    return item


def calibrate_threshold(
    trajectories: Sequence[Any],
    *,
    quantile: float = 0.95,
    window: int = 4,
    mode: str = "forward",
    source: str = "window",
    reduce: str = "mean",
) -> float:
    """A fixed HWE threshold (nats) from a set of trajectories, e.g. a validation run.

    Each trajectory's ``q``-quantile (of its window entropies by default, as the released code; of its
    token entropies with ``source="token"``, as the paper) is computed, then reduced over trajectories:
    ``reduce="mean"`` is how the released code initialises its threshold from validation (and the paper's
    batch cutoff ``τ``), ``"median"`` is the statistic the code's EMA tracks during training.

    Args:
        trajectories: per-trajectory token entropies, as lists/tensors, as ``tr.stats(model)`` rows
            (``SampleStats`` or their ``to_dict()``), or as their ``extra["ares"]`` records.
        quantile: the per-trajectory quantile (0.95 in paper and code).
        window: window length.
        mode: ``"forward"`` (paper) or ``"next"`` (code) windows.
        source: ``"window"`` or ``"token"``.
        reduce: ``"mean"`` or ``"median"``.
    """
    if reduce not in ("mean", "median"):
        raise ValueError(f"`reduce` must be 'mean' or 'median', got {reduce!r}")
    if mode not in WINDOW_MODES:
        raise ValueError(f"`mode` must be one of {WINDOW_MODES}, got {mode!r}")
    if not len(trajectories):
        raise ValueError("`trajectories` is empty; give at least one entropy trace")
    values, mask = pad_traces([_trace_of(t) for t in trajectories])
    theta = trajectory_thresholds(values, mask, quantile=quantile, window=window, mode=mode, source=source)
    theta = theta[torch.isfinite(theta)]
    if theta.numel() == 0:
        raise ValueError(
            f"no trajectory is long enough for a full window of {window} tokens; give longer trajectories"
        )
    # numpy-style median (the mean of the two middle values), as the released code uses np.median
    return float(theta.mean() if reduce == "mean" else torch.quantile(theta, 0.5))
