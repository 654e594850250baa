"""``ares`` at generation time: entropy tracking and the difficulty-aware reasoning-budget controller.

What runs inside ``generate`` is one logits processor (:class:`EntropyController`) and one stopping
criterion (:class:`BudgetStop`), appended to the caller's own for every call. The processor computes the
token entropy of every step's scores with :func:`tokenreduce.kernels.token_entropy` (no probability tensor is
kept) and, when the controller is off, returns the scores it was given, untouched. Window entropy, the HWE
positions and the per-sample records are computed once ``generate`` returns and land in
``tr.stats(model)`` as ``SampleStats.extra["ares"]``.

The controller is tokenreduce's extension, not ARES: ARES (arXiv 2510.08457) shapes entropy during RL
training and decodes plainly at inference. Here the same signals steer decoding directly:

* **difficulty** of each row: a label given per sample (:func:`difficulty_labels`), a fixed bucket, or the
  mean token entropy of its first ``probe_tokens`` generated tokens;
* **budget**: once a row's reasoning span (everything generated before the end-of-reasoning sequence)
  reaches its bucket's budget, the controller waits for a low-entropy point (mean entropy of the last
  ``window`` steps at or below the row's running mean, or ``close_threshold``) and forces the
  end-of-reasoning ids there, at the latest ``window`` tokens later; with EOS as the end sequence the
  row is finished and padded;
* **exploration**: optionally divides the logits by ``explore_temperature`` where the last-``window``
  mean entropy reaches the calibrated HWE threshold.

Online decisions use the *trailing* window (the last ``window`` steps): the paper's forward window of a
position needs tokens that are not generated yet. The recorded window entropy uses the configured mode.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria

from tokenreduce.core.api import get_handle
from tokenreduce.core.api import stats as _stats
from tokenreduce.core.reduction import DecodeMethod
from tokenreduce.core.registry import register_method
from tokenreduce.core.stack import method_in
from tokenreduce.core.stats import Stats
from tokenreduce.kernels import token_entropy, window_entropy

from .config import BUCKETS, AresConfig
from .signals import hwe_mask, trajectory_thresholds

NO_BUDGET = 2**62
_OPEN, _MODEL, _FORCED = 0, 1, 2
_CLOSED_BY = {_OPEN: None, _MODEL: "model", _FORCED: "forced"}


class EntropyController(LogitsProcessor):
    """Records every step's token entropy; with the controller on, forces end-of-reasoning and explores.

    One instance serves one ``generate`` call (state is per row of the expanded batch).

    Args:
        config: the method's options.
        labels: per-row bucket (``"easy"``/``"medium"``/``"hard"``) or ``None`` (use ``config.difficulty``),
            for the rows the processor sees (already expanded for ``num_return_sequences``), or ``None``.
        end_ids: the end-of-reasoning sequence to force (resolved: EOS when ``config.end_ids`` is empty).
        pad_id: token forced on rows the controller finished (after a forced EOS).
        end_is_eos: whether forcing ``end_ids`` finishes the row.
    """

    def __init__(
        self,
        config: AresConfig,
        labels: Sequence[str | None] | None = None,
        end_ids: Sequence[int] = (),
        pad_id: int | None = None,
        end_is_eos: bool = False,
    ):
        self.config = config
        self.active = config.controller_enabled
        self.labels = list(labels) if labels is not None else None
        self.end_ids = tuple(int(i) for i in end_ids)
        self.pad_id = pad_id
        self.end_is_eos = end_is_eos
        if self.active and config.budgets and not self.end_ids:
            raise ValueError("EntropyController: `end_ids` is empty; give the end-of-reasoning ids or an EOS id")
        self.history: list[torch.Tensor] = []
        self.explored: list[torch.Tensor] = []
        self.step = 0
        self._ready = False

    # ----- state --------------------------------------------------------------------------------------
    def _init_state(self, scores: torch.Tensor) -> None:
        rows, device = scores.shape[0], scores.device
        cfg = self.config
        self.rows = rows
        diff = torch.full((rows,), -1, dtype=torch.long)
        source = ["entropy" if cfg.difficulty == "auto" else "fixed"] * rows
        if cfg.difficulty != "auto":
            diff[:] = BUCKETS.index(cfg.difficulty)
        if self.labels is not None:
            if len(self.labels) != rows:
                raise ValueError(
                    f"ares: {len(self.labels)} difficulty labels for {rows} generated rows; give one label per "
                    "prompt row"
                )
            for i, label in enumerate(self.labels):
                if label is not None:
                    diff[i] = BUCKETS.index(label)
                    source[i] = "label"
        self.difficulty = diff.to(device)
        self.difficulty_source = source
        table = [cfg.budgets.get(b, NO_BUDGET) for b in BUCKETS] + [NO_BUDGET]
        self.budget_table = torch.tensor(table, dtype=torch.long, device=device)
        self.open = torch.ones(rows, dtype=torch.bool, device=device)
        self.force = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.close_pos = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.closed_by = torch.zeros(rows, dtype=torch.long, device=device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.entropy_sum = torch.zeros(rows, dtype=torch.float32, device=device)
        self.probe_mean: torch.Tensor | None = None
        self.end_tensor = torch.tensor(self.end_ids or (0,), dtype=torch.long, device=device)
        self._ready = True

    def budgets(self) -> torch.Tensor:
        """``[rows]`` current budget per row (``NO_BUDGET`` while the bucket is unknown or unbudgeted)."""
        index = torch.where(self.difficulty >= 0, self.difficulty, torch.full_like(self.difficulty, 3))
        return self.budget_table[index]

    # ----- the step -----------------------------------------------------------------------------------
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        cfg = self.config
        if not self._ready:
            self._init_state(scores)
        t = self.step
        h = token_entropy(scores, cfg.temperature)
        self.history.append(h)
        self.step += 1
        if not self.active:
            return scores

        self.entropy_sum += torch.nan_to_num(h)
        done_before = self.done.clone()
        w = cfg.window
        trailing = torch.stack(self.history[-w:]).mean(0)

        # The model closed the reasoning span itself: the last generated tokens are the end sequence.
        n_end = len(self.end_ids)
        if n_end and t >= n_end:
            tail = input_ids[:, -n_end:].to(self.end_tensor.device)
            hit = (tail == self.end_tensor).all(1) & self.open & (self.force < 0)
            self.close_pos = torch.where(hit, torch.full_like(self.close_pos, t - n_end), self.close_pos)
            self.closed_by = torch.where(hit, torch.full_like(self.closed_by, _MODEL), self.closed_by)
            self.open &= ~hit

        # Difficulty from the entropy of the first `probe_tokens` steps.
        if cfg.difficulty == "auto" and t == cfg.probe_tokens - 1:
            probe = torch.stack(self.history[: cfg.probe_tokens]).mean(0)
            t_easy, t_hard = cfg.difficulty_thresholds
            bucket = torch.where(probe < t_easy, 0, torch.where(probe >= t_hard, 2, 1)).long()
            self.difficulty = torch.where(self.difficulty < 0, bucket, self.difficulty)
            self.probe_mean = probe

        forcing = torch.zeros_like(self.open)
        targets = torch.zeros_like(self.force)
        if cfg.budgets:
            budget = self.budgets()
            reference = (
                torch.full_like(trailing, cfg.close_threshold)
                if cfg.close_threshold is not None
                else self.entropy_sum / (t + 1)
            )
            due = self.open & (self.force < 0) & (t >= budget)
            start = due & ((trailing <= reference) | (t >= budget + w))
            self.force = torch.where(start, torch.zeros_like(self.force), self.force)
            self.close_pos = torch.where(start, torch.full_like(self.close_pos, t), self.close_pos)
            self.closed_by = torch.where(start, torch.full_like(self.closed_by, _FORCED), self.closed_by)
            self.open &= ~start
            forcing = self.force >= 0
            targets = self.end_tensor[self.force.clamp(0, n_end - 1)]
            advanced = torch.where(forcing, self.force + 1, self.force)
            finished = forcing & (advanced >= n_end)
            self.force = torch.where(finished, torch.full_like(advanced, -1), advanced)
            if self.end_is_eos:
                self.done |= finished

        if cfg.explore_temperature != 1.0:
            hot = self.open & (self.force < 0) & ~forcing & ~done_before & (trailing >= cfg.hwe_threshold)
            scores = torch.where(hot[:, None], scores / cfg.explore_temperature, scores)
            self.explored.append(hot)

        if cfg.budgets:
            pinned = forcing | done_before
            if self.pad_id is not None:
                targets = torch.where(done_before, torch.full_like(targets, self.pad_id), targets)
            else:
                pinned = forcing
            index = targets[:, None].to(scores.device)
            kept = scores.gather(1, index)
            scores = scores.masked_fill(pinned[:, None].to(scores.device), float("-inf"))
            scores.scatter_(1, index, torch.where(pinned[:, None].to(scores.device), torch.zeros_like(kept), kept))
        return scores


class BudgetStop(StoppingCriteria):
    """Marks rows the controller finished (forced EOS) as done, so ``generate`` can end without an EOS id."""

    def __init__(self, controller: EntropyController):
        self.controller = controller

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        c = self.controller
        if not c._ready:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return c.done.to(input_ids.device)


# ----------------------------------------------------------------------------------------------------
# Per-sample labels
# ----------------------------------------------------------------------------------------------------


@contextmanager
def difficulty_labels(model: Any, labels: Sequence[str | None]) -> Iterator[Any]:
    """Give each prompt row of the ``generate`` calls inside the block a difficulty bucket.

    ``labels[i]`` is ``"easy"``, ``"medium"``, ``"hard"`` or ``None`` (that row uses the config's
    ``difficulty``). Labels take precedence over the entropy probe::

        with difficulty_labels(model, ["easy", "hard"]):
            model.generate(**inputs)
    """
    handle = get_handle(model)
    method = method_in(handle, "decode") if handle is not None else None
    if not isinstance(method, AresMethod):
        raise ValueError("`difficulty_labels` needs a model wrapped with tokenreduce.wrap(model, 'ares', ...)")
    labels = list(labels)
    for label in labels:
        if label is not None and label not in BUCKETS:
            raise ValueError(f"`labels` entries must be one of {BUCKETS} or None, got {label!r}")
    previous, method.labels = method.labels, labels
    try:
        yield model
    finally:
        method.labels = previous


def end_sequence_ids(tokenizer: Any, text: str = "</think>") -> tuple[int, ...]:
    """Token ids of ``text`` (e.g. ``"</think>"``) without special tokens, for ``AresConfig.end_ids``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"`text`={text!r} tokenizes to no ids")
    return tuple(int(i) for i in ids)


# ----------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------


def _generation_value(handle: Any, inputs: dict[str, Any], name: str) -> Any:
    """A generation option as ``generate`` will see it: keyword, then generation config, then the model's."""
    if inputs.get(name) is not None:
        return inputs[name]
    for config in (inputs.get("generation_config"), getattr(handle.model, "generation_config", None)):
        value = getattr(config, name, None) if config is not None else None
        if value is not None:
            return value
    return None


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    if torch.is_tensor(value):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _clean(values: torch.Tensor) -> list[float | None]:
    return [None if not math.isfinite(v) else float(v) for v in values.tolist()]


def _positions(mask: torch.Tensor) -> list[int]:
    return [int(i) for i in mask.nonzero().flatten().tolist()]


@register_method("ares", config_cls=AresConfig, modalities=())
class AresMethod(DecodeMethod):
    """Entropy-tracked decoding with an optional difficulty-aware reasoning budget (ARES signals)."""

    def __init__(self, config: AresConfig):
        super().__init__(config)
        self.labels: list[str | None] | None = None
        self._call: tuple[EntropyController, list | None, int] | None = None

    def generation_hooks(self, handle: Any, inputs: dict[str, Any]) -> dict[str, list]:
        cfg: AresConfig = self.config
        beams = _generation_value(handle, inputs, "num_beams") or 1
        if int(beams) > 1:
            raise ValueError(
                f"`num_beams`={beams} is not supported by method 'ares': entropy traces follow one greedy or "
                "sampled trajectory per row; use num_beams=1"
            )
        for name in ("assistant_model", "prompt_lookup_num_tokens"):
            if inputs.get(name) is not None:
                raise ValueError(f"`{name}` (assisted generation) is not supported by method 'ares'")
        eos = _as_list(_generation_value(handle, inputs, "eos_token_id"))
        pad = _generation_value(handle, inputs, "pad_token_id")
        pad = int(_as_list(pad)[0]) if pad is not None else (eos[0] if eos else None)
        end_ids, end_is_eos = cfg.end_ids, False
        if cfg.budgets and not end_ids:
            if not eos:
                raise ValueError(
                    "`end_ids` is empty, so method 'ares' closes reasoning with EOS, but no `eos_token_id` is set "
                    "(generate keyword or generation config); give `end_ids` (e.g. the ids of '</think>') or an EOS"
                )
            end_ids, end_is_eos = (eos[0],), True
        num_return = int(_generation_value(handle, inputs, "num_return_sequences") or 1)
        labels = None
        if self.labels is not None:
            ids = inputs.get("input_ids")
            prompts = ids.shape[0] if ids is not None else len(self.labels)
            if len(self.labels) != prompts:
                raise ValueError(
                    f"`labels` has {len(self.labels)} entries for {prompts} prompt rows; give one per row"
                )
            labels = [lab for lab in self.labels for _ in range(num_return)]
        controller = EntropyController(cfg, labels, end_ids, pad, end_is_eos)
        rows = handle.current.samples if handle.current is not None else None
        self._call = (controller, rows, num_return)
        hooks: dict[str, list] = {"logits_processor": [controller]}
        if cfg.budgets and end_is_eos:
            hooks["stopping_criteria"] = [BudgetStop(controller)]
        return hooks

    def after_generate(self, handle: Any, inputs: dict[str, Any], output: Any) -> None:
        if self._call is None:
            return
        controller, rows, num_return = self._call
        self._call = None
        sequences = output if torch.is_tensor(output) else output.sequences
        prompt = inputs["input_ids"].shape[1] if inputs.get("input_ids") is not None else 0
        generated = sequences[:, prompt:]
        eos = _as_list(_generation_value(handle, inputs, "eos_token_id"))
        records = self.records(controller, generated, eos)
        expanded = len(records)
        batch = expanded // max(1, num_return)
        if rows is None or len(rows) != batch:
            rows = handle.stats.new_call(batch)
        for r, row in enumerate(rows):
            mine = records[r * num_return : (r + 1) * num_return]
            row.extra["ares"] = mine[0]
            if num_return > 1:
                row.extra["ares_sequences"] = mine

    # ----- records ------------------------------------------------------------------------------------
    def records(self, controller: EntropyController, generated: torch.Tensor, eos: Sequence[int]) -> list[dict]:
        """Per-row records of one call, from the controller's state and the generated ids ``[rows, T]``."""
        cfg: AresConfig = self.config
        rows = generated.shape[0]
        steps = min(len(controller.history), generated.shape[1])
        if steps == 0 or not controller._ready:
            return [{"generated_tokens": 0, "entropy": [], "window_entropy": [], "hwe_positions": []}
                    for _ in range(rows)]
        device = controller.history[0].device
        entropy = torch.stack(controller.history[:steps], 1).float()
        gen = generated[:, :steps].to(device)
        length = torch.full((rows,), steps, dtype=torch.long, device=device)
        if eos:
            is_eos = torch.isin(gen, torch.tensor(list(eos), device=device))
            first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, length)
            length = torch.minimum(length, first)
        if controller.active and controller.end_is_eos:
            stop = torch.where(controller.closed_by == _FORCED, controller.close_pos + len(controller.end_ids), length)
            length = torch.minimum(length, stop.clamp_min(0))
        positions = torch.arange(steps, device=device)
        valid = positions[None, :] < length[:, None]
        windows = window_entropy(entropy, cfg.window, valid, cfg.window_mode)
        theta = trajectory_thresholds(
            entropy, valid, quantile=cfg.hwe_quantile, window=cfg.window, mode=cfg.window_mode,
            source=cfg.hwe_quantile_source,
        )
        hwe = hwe_mask(windows, theta)
        fixed = hwe_mask(windows, cfg.hwe_threshold) if cfg.hwe_threshold is not None else None
        explored = torch.stack(controller.explored[:steps], 1) & valid if controller.explored else None

        entropy, windows, valid, hwe, theta, length = (x.cpu() for x in (entropy, windows, valid, hwe, theta, length))
        fixed = fixed.cpu() if fixed is not None else None
        explored = explored.cpu() if explored is not None else None
        out = []
        for i in range(rows):
            n = int(length[i])
            h = entropy[i, :n]
            rec: dict[str, Any] = {
                "generated_tokens": n,
                "temperature": cfg.temperature,
                "window": cfg.window,
                "window_mode": cfg.window_mode,
                "mean_entropy": float(h.nanmean()) if n else None,
                "hwe_quantile": cfg.hwe_quantile,
                "hwe_quantile_source": cfg.hwe_quantile_source,
                "hwe_theta": None if not math.isfinite(float(theta[i])) else float(theta[i]),
                "hwe_positions": _positions(hwe[i, :n]),
            }
            if cfg.record_traces:
                rec["entropy"] = _clean(h)
                rec["window_entropy"] = _clean(windows[i, :n])
            if fixed is not None:
                rec["hwe_threshold"] = cfg.hwe_threshold
                rec["hwe_threshold_positions"] = _positions(fixed[i, :n])
            if controller.active:
                rec.update(self._controller_record(controller, i, n))
                if explored is not None:
                    rec["explored_positions"] = _positions(explored[i, :n])
            out.append(rec)
        return out

    def _controller_record(self, controller: EntropyController, i: int, n: int) -> dict[str, Any]:
        diff = int(controller.difficulty[i])
        bucket = BUCKETS[diff] if diff >= 0 else None
        closed = int(controller.closed_by[i])
        close_pos = int(controller.close_pos[i])
        probe = controller.probe_mean
        budget = self.config.budgets.get(bucket) if bucket is not None else None
        # Closed inside what was generated: the first end token is at `close_pos`; otherwise still open.
        is_closed = closed != _OPEN and 0 <= close_pos < n
        probed = probe is not None and controller.difficulty_source[i] == "entropy"
        return {
            "difficulty": bucket,
            "difficulty_source": controller.difficulty_source[i] if bucket is not None else None,
            "probe_entropy": float(probe[i]) if probed else None,
            "budget": budget,
            "reasoning_tokens": close_pos if is_closed else n,
            "reasoning_closed": _CLOSED_BY[closed] if is_closed else None,
            "end_ids": list(controller.end_ids),
        }


def ares_records(model_or_stats: Any, last: bool = True) -> list[dict[str, Any]]:
    """The ``extra["ares"]`` records of a wrapped model's (or a ``Stats``'s) rows, of the last call by default."""
    record = model_or_stats if isinstance(model_or_stats, Stats) else _stats(model_or_stats)
    rows = record.last if last else record.samples
    return [r.extra["ares"] for r in rows if "ares" in r.extra]
