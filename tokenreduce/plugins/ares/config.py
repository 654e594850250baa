"""Options of the ``ares`` decode-stage method (entropy tracking and the difficulty-aware budget controller)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from tokenreduce.core.config import MethodConfig, check_choice, check_range

BUCKETS = ("easy", "medium", "hard")
WINDOW_MODES = ("forward", "next")
QUANTILE_SOURCES = ("token", "window")


@dataclasses.dataclass
class AresConfig(MethodConfig):
    """Options of ``ares``: what is tracked during ``generate`` and, optionally, how reasoning is budgeted.

    Tracking (always on, never changes a token):

    Attributes:
        temperature: softmax temperature of the tracked entropy, ``H_t`` of ``softmax(z_t / T)`` (paper App. B).
            The tracked logits are the ones the sampling warpers (temperature, top-k, top-p) have not yet
            changed, so ``T`` is stated here rather than read from the generation config.
        window: window length ``w`` of the window entropy (paper and released code: 4).
        window_mode: ``"forward"`` (the paper's ``mean(H[t : t+w])``) or ``"next"`` (the released code's
            ``mean(H[t+1 : t+1+w])``).
        hwe_quantile: quantile ``q`` of the per-trajectory high-window-entropy (HWE) rule (paper: 0.95).
        hwe_quantile_source: what the per-trajectory quantile is taken over: ``"token"`` (the paper's
            ``θ_i = Quantile_q({H_t})``) or ``"window"`` (the released code's quantile of window entropies).
            Position ``t`` is HWE when its window entropy is ``>= θ_i``.
        hwe_threshold: a fixed, calibrated HWE threshold in nats (see :func:`calibrate_threshold`); when set,
            positions with window entropy ``>=`` it are recorded as well. ``None``: not recorded.
        record_traces: keep the per-position entropy and window-entropy lists in ``tr.stats(model)``; with
            ``False`` only the positions and summaries are kept.

    Difficulty-aware budget controller (tokenreduce's extension, not part of ARES: ARES is a training method
    and decodes plainly at inference). Off while ``budgets`` is empty and ``explore_temperature`` is 1.

    Attributes:
        budgets: reasoning-token budget per difficulty bucket, e.g. ``{"easy": 256, "medium": 1024,
            "hard": 4096}``; a bucket without an entry is unlimited. Once a row's reasoning span reaches its
            budget, the controller forces ``end_ids`` at the first low-entropy point, and at the latest after
            ``window`` more tokens: the reasoning span holds at most ``budget + window`` tokens.
        difficulty: ``"auto"`` estimates each row's bucket from the mean token entropy of its first
            ``probe_tokens`` generated tokens; a bucket name fixes it for every row. Per-row labels given
            with :func:`tokenreduce.plugins.ares.difficulty_labels` take precedence.
        probe_tokens: generated tokens whose mean entropy estimates the difficulty (``difficulty="auto"``).
        difficulty_thresholds: ``(t_easy, t_hard)`` in nats: probe entropy ``< t_easy`` is easy, ``>= t_hard``
            hard, medium in between.
        end_ids: token ids of the end-of-reasoning sequence the controller forces (e.g. the ids of
            ``</think>``, see :func:`end_sequence_ids`); empty forces EOS, which ends the row.
        close_threshold: a step is a low-entropy point when the mean entropy of the last ``window`` steps is
            ``<=`` this (nats); ``None`` compares against the row's running mean token entropy instead.
        explore_temperature: divides the logits of rows whose last-``window`` mean entropy is
            ``>= hwe_threshold`` while they reason (extra exploration at HWE positions when sampling; no
            effect on greedy decoding). Needs ``hwe_threshold``. 1 disables it.
    """

    temperature: float = 1.0
    window: int = 4
    window_mode: str = "forward"
    hwe_quantile: float = 0.95
    hwe_quantile_source: str = "token"
    hwe_threshold: float | None = None
    record_traces: bool = True
    budgets: dict[str, int] = dataclasses.field(default_factory=dict)
    difficulty: str = "auto"
    probe_tokens: int = 32
    difficulty_thresholds: tuple[float, float] = (1.0, 2.5)
    end_ids: tuple[int, ...] = ()
    close_threshold: float | None = None
    explore_temperature: float = 1.0

    def validate(self) -> None:
        check_range("temperature", self.temperature, 0.0, low_open=True)
        if not math.isfinite(self.temperature):
            raise ValueError(f"`temperature` must be finite, got {self.temperature!r}")
        check_range("window", self.window, 1, integer=True)
        check_choice("window_mode", self.window_mode, WINDOW_MODES)
        check_range("hwe_quantile", self.hwe_quantile, 0.0, 1.0)
        check_choice("hwe_quantile_source", self.hwe_quantile_source, QUANTILE_SOURCES)
        if self.hwe_threshold is not None:
            check_range("hwe_threshold", self.hwe_threshold, 0.0)
        if not isinstance(self.record_traces, bool):
            raise ValueError(f"`record_traces` must be a bool, got {self.record_traces!r}")
        if not isinstance(self.budgets, dict):
            raise ValueError(
                f"`budgets` must be a dict mapping buckets {BUCKETS} to token counts, got {self.budgets!r}"
            )
        for bucket, budget in self.budgets.items():
            if bucket not in BUCKETS:
                raise ValueError(f"`budgets` keys must be one of {BUCKETS}, got {bucket!r}")
            check_range(f"budgets[{bucket!r}]", budget, 1, integer=True)
        check_choice("difficulty", self.difficulty, ("auto", *BUCKETS))
        check_range("probe_tokens", self.probe_tokens, 1, integer=True)
        self.difficulty_thresholds = tuple(self.difficulty_thresholds)
        if len(self.difficulty_thresholds) != 2:
            raise ValueError(
                f"`difficulty_thresholds` must be two numbers (t_easy, t_hard), got {self.difficulty_thresholds!r}"
            )
        for value in self.difficulty_thresholds:
            check_range("difficulty_thresholds", value, 0.0)
        if self.difficulty_thresholds[0] > self.difficulty_thresholds[1]:
            raise ValueError(
                f"`difficulty_thresholds` must satisfy t_easy <= t_hard, got {self.difficulty_thresholds!r}"
            )
        self.end_ids = tuple(self.end_ids)
        for token in self.end_ids:
            check_range("end_ids", token, 0, integer=True)
        if self.close_threshold is not None:
            check_range("close_threshold", self.close_threshold, 0.0)
        check_range("explore_temperature", self.explore_temperature, 0.0, low_open=True)
        if self.explore_temperature != 1.0 and self.hwe_threshold is None:
            raise ValueError(
                f"`explore_temperature`={self.explore_temperature} needs `hwe_threshold` (a calibrated threshold "
                "in nats, see tokenreduce.plugins.ares.calibrate_threshold): the per-trajectory quantile is only "
                "known once generation ends"
            )
        if self.difficulty == "auto" and self.budgets:
            small = {b: n for b, n in self.budgets.items() if n < self.probe_tokens}
            if small:
                raise ValueError(
                    f"`budgets` {small} are below `probe_tokens`={self.probe_tokens}: with difficulty='auto' the "
                    "bucket is known only after the probe; lower `probe_tokens` or raise the budgets"
                )

    @property
    def controller_enabled(self) -> bool:
        """Whether the controller may change tokens (a budget or extra exploration is configured)."""
        return bool(self.budgets) or self.explore_temperature != 1.0

    @classmethod
    def at_budget(cls, budget: float, num_layers: int | None = None, **options: Any) -> AresConfig:
        """``ares`` acts on generated tokens and keeps every visual token.

        A budget of 1.0 (all visual tokens) is therefore met by the plain config; any other visual-token
        budget is refused, since this method cannot reach it.
        """
        check_range("budget", budget, 0.0, 1.0, low_open=True)
        if budget != 1.0:
            raise ValueError(
                f"`budget`={budget} is a visual-token budget; ares is a decode-stage method that keeps every "
                "visual token (only budget=1.0 is accepted). Set reasoning-token budgets with `budgets` instead"
            )
        return cls(**options)
