"""ARES training pieces, usable from TRL's ``GRPOTrainer`` (see :mod:`.grpo`) or a plain PyTorch loop.

ARES (arXiv 2510.08457) trains with Adaptive-Entropy Policy Optimization (AEPO). Its paper and its released
code (shawn0728/ARES, the version that actually ran) differ in several places; both are implemented and
every function says which one it is:

* **HWE counting.** Paper (§3.2.1, Alg. 1): ``θ_i = Quantile_0.95({H_t})`` per trajectory, ``τ`` the mean of
  the ``θ_i`` over the batch (Alg. 1: over a prompt's group), ``N_HE = Σ_t 1[H̄_{t:w} >= τ]`` —
  :func:`count_hwe_paper`; App. H's semantic variant — :func:`count_hwe_semantic`. Code: a token counts
  when its string is in the trigger-word list **and** the mean entropy of the next 4 tokens is ``>=`` a
  threshold, initialised from validation and tracked by an EMA(0.99) of the batch median of per-sample
  95th percentiles — :func:`count_hwe_code`, :class:`TriggerVocabulary`, :func:`code_window_percentile`,
  :class:`EntropyThresholdEMA`.
* **Difficulty.** Paper: pass@8 ``>= 6`` easy, ``3-5`` medium, ``<= 2`` hard; code: accuracy ``>= 2/3`` easy,
  ``>= 1/3`` medium — :func:`bucket_from_pass_rate`, :func:`difficulty_buckets`.
* **Hierarchical entropy reward.** Code: margins, Huber, sigmoid temperatures and caps with adaptive
  ``α_d`` — :class:`CodeEntropyReward`; paper: ``R = R_acc − 1[acc=0]·λ_d·g_d(Δ)`` with a configurable
  ``λ`` — :func:`paper_entropy_reward` (plus Alg. 1's token-level bonus, :func:`paper_advantage_bonus`).
* **Dynamic KL** (a loss term, not a reward penalty). Code: per-bucket ``β`` with an EMA error controller
  and the "second chance" relaxation — :class:`CodeKLController`; paper: token-level ``β_d·ρ^m`` with the
  ``κ_d`` controller on non-window tokens — :class:`PaperKLController`.
* **Adaptive cold start** (paper §3.1): ``L_target(p) = (1 − p)·L(0) + p·L(1)`` and the length filter —
  :func:`length_target`, :func:`cold_start_filter`.

All entropies come from :func:`tokenreduce.kernels.token_entropy` / ``window_entropy`` (exact full-softmax
entropy; the released code estimates it from vLLM's top-10 logprobs plus a tail bucket).
"""

from __future__ import annotations

import math
import random
import statistics
from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenreduce.kernels import window_entropy

from .config import BUCKETS
from .signals import hwe_mask, row_quantile

# ----------------------------------------------------------------------------------------------------
# Difficulty buckets
# ----------------------------------------------------------------------------------------------------

DIFFICULTY_VARIANTS = ("paper", "code")


def bucket_from_pass_rate(correct: float, total: int, variant: str = "paper") -> str:
    """Difficulty bucket of a prompt with ``correct`` successes out of ``total`` rollouts.

    * ``variant="paper"`` (App. G, for G = 8): easy if ``correct >= 6``, medium if ``3 <= correct <= 5``,
      hard if ``correct <= 2``. For other group sizes the same fractions apply: easy at ``>= 0.75·G``, hard
      at ``<= 0.25·G`` (for G = 8 this is exactly the paper's rule).
    * ``variant="code"`` (``ray_trainer.py``): accuracy ``>= 2/3`` easy, ``>= 1/3`` medium, else hard.
    """
    if variant not in DIFFICULTY_VARIANTS:
        raise ValueError(f"`variant` must be one of {DIFFICULTY_VARIANTS}, got {variant!r}")
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"`total` must be an int >= 1 (rollouts per prompt), got {total!r}")
    if not 0 <= correct <= total:
        raise ValueError(f"`correct` must be in [0, total={total}], got {correct!r}")
    if variant == "paper":
        if correct >= 0.75 * total:
            return "easy"
        if correct <= 0.25 * total:
            return "hard"
        return "medium"
    # Integer comparison where possible, so 2/3 and 1/3 are exact for any group size.
    if 3 * correct >= 2 * total:
        return "easy"
    if 3 * correct >= total:
        return "medium"
    return "hard"


def difficulty_buckets(
    correct: Sequence[float | bool], groups: Sequence[Hashable], variant: str = "paper"
) -> list[str]:
    """Per-sample bucket from the pass rate of its group (the rollouts of one prompt).

    ``correct`` holds each sample's outcome (``> 0.5`` counts as correct); ``groups`` its prompt id.
    """
    if len(correct) != len(groups):
        raise ValueError(f"`correct` has {len(correct)} entries but `groups` has {len(groups)}")
    tally: dict[Hashable, list[int]] = defaultdict(lambda: [0, 0])
    for c, g in zip(correct, groups):
        tally[g][0] += int(float(c) > 0.5)
        tally[g][1] += 1
    bucket = {g: bucket_from_pass_rate(k, n, variant) for g, (k, n) in tally.items()}
    return [bucket[g] for g in groups]


# ----------------------------------------------------------------------------------------------------
# HWE counting: the paper
# ----------------------------------------------------------------------------------------------------


@dataclass
class HWECount:
    """High-window-entropy tokens of a batch.

    Attributes:
        counts: ``[B]`` ``N_HE`` per trajectory.
        mask: ``[B, T]`` HWE positions ``m_{i,t}``.
        threshold: ``[B]`` cutoff each trajectory was compared against (``τ``).
        theta: ``[B]`` per-trajectory quantile ``θ_i``.
        window_entropy: ``[B, T]`` window entropies (NaN where the window is incomplete).
    """

    counts: torch.Tensor
    mask: torch.Tensor
    threshold: torch.Tensor
    theta: torch.Tensor
    window_entropy: torch.Tensor


def count_hwe_paper(
    entropy: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    window: int = 4,
    quantile: float = 0.95,
    mode: str = "forward",
    groups: Sequence[Hashable] | None = None,
) -> HWECount:
    """Paper's HWE count (§3.2.1, Alg. 1): ``m_{i,t} = 1[H̄_{i,t:w} >= τ]``, ``N_HE = Σ_t m_{i,t}``.

    ``θ_i`` is the ``quantile`` of trajectory ``i``'s token entropies and ``τ`` the mean of the ``θ_i``:
    over the whole batch (§3.2.1) or, with ``groups``, over each prompt's rollouts (Alg. 1 line 7).

    Args:
        entropy: ``[B, T]`` token entropies (e.g. from :func:`tokenreduce.kernels.token_entropy`).
        mask: ``[B, T]`` bool, valid (completion, non-padding) positions.
        window: ``w`` (the paper finds 4-8 best).
        quantile: ``0.95`` in the paper.
        mode: ``"forward"`` (the paper's window) or ``"next"``.
        groups: optional prompt id per trajectory.
    """
    if mask is None:
        mask = torch.ones_like(entropy, dtype=torch.bool)
    theta = row_quantile(entropy, mask, quantile)
    tau = _group_mean(theta, groups)
    windows = window_entropy(entropy.float(), window, mask, mode)
    m = hwe_mask(windows, tau) & mask
    return HWECount(m.sum(1), m, tau, theta, windows)


def _group_mean(values: torch.Tensor, groups: Sequence[Hashable] | None) -> torch.Tensor:
    """Mean of the finite ``values`` over the batch, or per group, broadcast back to ``[B]``."""
    if groups is None:
        finite = values[torch.isfinite(values)]
        mean = finite.mean() if finite.numel() else torch.tensor(float("nan"), device=values.device)
        return mean.expand(values.shape[0]).clone()
    if len(groups) != values.shape[0]:
        raise ValueError(f"`groups` has {len(groups)} entries for {values.shape[0]} trajectories")
    out = torch.empty_like(values)
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    for idx in members.values():
        out[idx] = _group_mean(values[idx], None)
    return out


def count_hwe_semantic(
    entropy: torch.Tensor,
    trigger: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    quantile: float = 0.95,
) -> HWECount:
    """Paper App. H: ``N_HE = Σ_t 1[H_t >= θ_0.95 ∧ o_t ∈ V_sem]`` with ``θ_0.95`` the batch quantile of token
    entropies and ``trigger`` (``[B, T]`` bool, e.g. from :class:`TriggerVocabulary`) marking ``o_t ∈ V_sem``."""
    if mask is None:
        mask = torch.ones_like(entropy, dtype=torch.bool)
    valid = mask & torch.isfinite(entropy)
    theta = torch.quantile(entropy[valid].float(), quantile) if valid.any() else torch.tensor(float("nan"))
    m = (entropy.float() >= theta) & trigger & valid
    thr = theta.expand(entropy.shape[0]).clone()
    return HWECount(m.sum(1), m, thr, thr, entropy.float().clone())


# ----------------------------------------------------------------------------------------------------
# HWE counting: the released code
# ----------------------------------------------------------------------------------------------------

# A short list of reasoning-trigger words, every one of them in the official list. The official list
# (data/crucial_token_final_version.json in shawn0728/ARES) has 174 GPT-filtered words; pass it as `words`
# to reproduce the released code exactly.
DEFAULT_TRIGGER_WORDS = (
    "wait", "but", "however", "alternatively", "alternative", "perhaps", "maybe", "instead", "rather",
    "therefore", "thus", "hence", "since", "actually", "hmm", "suppose", "assume", "consider", "if", "let",
    "now", "indeed", "recall", "think", "no",
)


def normalize_token(text: str) -> str:
    """The released code's token normalisation: drop leading ``▁``/``Ġ`` markers, strip, lower-case."""
    while text[:1] in ("▁", "Ġ"):
        text = text[1:]
    return text.strip().lower()


class TriggerVocabulary:
    """Which vocabulary ids decode (alone, normalised) to a trigger word: a ``[V]`` bool table.

    Built once per tokenizer; marking a batch is then one gather (``table[token_ids]``).

    Args:
        tokenizer: a Hugging Face tokenizer (anything with ``batch_decode`` and ``len()``), or ``None``
            with ``table`` given.
        words: the trigger words (default :data:`DEFAULT_TRIGGER_WORDS`; the official list has 174).
        table: a precomputed ``[V]`` bool table.
    """

    def __init__(self, tokenizer: Any = None, words: Sequence[str] = DEFAULT_TRIGGER_WORDS,
                 table: torch.Tensor | None = None):
        self.words = frozenset(normalize_token(w) for w in words)
        if table is not None:
            self.table = table.bool()
            return
        if tokenizer is None:
            raise ValueError("TriggerVocabulary needs a `tokenizer` or a `table`")
        size = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(size)])
        self.table = torch.tensor([normalize_token(t) in self.words for t in texts], dtype=torch.bool)

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``[...]`` bool: the ids that are trigger words (ids outside the table are not)."""
        table = self.table.to(token_ids.device)
        inside = (token_ids >= 0) & (token_ids < table.numel())
        return table[token_ids.clamp(0, table.numel() - 1)] & inside

    def __len__(self) -> int:
        return int(self.table.sum())


@dataclass
class CodeHWECount:
    """The released code's per-trajectory trigger statistics.

    Attributes:
        counts: ``[B]`` valid triggers (next-``w`` mean entropy ``>=`` threshold): the code's ``N_HE``.
        invalid: ``[B]`` triggers below the threshold.
        soft_cost: ``[B]`` ``Σ max(0, next-w mean − threshold)`` over triggers (the code's
            ``reasoning_soft_cost``, which the second-chance KL relaxation reads).
        mask: ``[B, T]`` positions of valid triggers.
        next_entropy: ``[B, T]`` mean entropy of the next ``w`` tokens (NaN without a full window).
    """

    counts: torch.Tensor
    invalid: torch.Tensor
    soft_cost: torch.Tensor
    mask: torch.Tensor
    next_entropy: torch.Tensor


def count_hwe_code(
    entropy: torch.Tensor,
    token_ids: torch.Tensor,
    threshold: float,
    trigger: TriggerVocabulary | torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    window: int = 4,
) -> CodeHWECount:
    """Released code's HWE count (``vllm_rollout_spmd.compute_reasoning_token_window_entropy``).

    A position counts when its token is a trigger word and its next ``window`` tokens exist; it is *valid*
    when their mean entropy is ``>= threshold``. The code matches the top-1 token of each step's
    distribution; pass ``token_ids`` accordingly (``logits.argmax(-1)``) or the sampled ids.

    Args:
        entropy: ``[B, T]`` token entropies.
        token_ids: ``[B, T]`` ids the trigger test reads.
        threshold: the HWE threshold (e.g. :class:`EntropyThresholdEMA` ``.value``).
        trigger: a :class:`TriggerVocabulary` or a ``[B, T]`` bool trigger mask.
        mask: ``[B, T]`` valid positions.
        window: ``w`` (code: ``rollout.window_size = 4``).
    """
    if mask is None:
        mask = torch.ones_like(entropy, dtype=torch.bool)
    is_trigger = trigger(token_ids) if isinstance(trigger, TriggerVocabulary) else trigger.bool()
    following = window_entropy(entropy.float(), window, mask, "next")
    counted = is_trigger & mask & torch.isfinite(following)
    above = following >= threshold
    valid = counted & above
    soft = torch.where(counted, (following - threshold).clamp_min(0.0), torch.zeros_like(following))
    return CodeHWECount(valid.sum(1), (counted & ~above).sum(1), soft.sum(1), valid, following)


def code_window_percentile(
    entropy: torch.Tensor, mask: torch.Tensor | None = None, *, window: int = 4, percentile: float = 95.0
) -> torch.Tensor:
    """``[B]`` per-sample threshold as the released code computes it
    (``get_window_average_entropy_percentile_threshold_list``).

    Every position gets the mean entropy of its next ``window`` tokens; positions without a full next window
    get the mean of the values before them (all equal to the mean of the complete windows), or the first
    token's entropy when no window is complete; the ``percentile`` of those values is the threshold.
    """
    if mask is None:
        mask = torch.ones_like(entropy, dtype=torch.bool)
    following = window_entropy(entropy.float(), window, mask, "next")
    out = torch.full((entropy.shape[0],), float("nan"))
    for i in range(entropy.shape[0]):
        n = int(mask[i].sum())
        if n == 0:
            continue
        complete = max(0, n - window)
        values = following[i, :complete].cpu()
        fill = values.mean() if complete else entropy[i, 0].float().cpu()
        values = torch.cat([values, fill.expand(n - complete)])
        out[i] = torch.quantile(values, percentile / 100.0)
    return out


class EntropyThresholdEMA:
    """The released code's HWE threshold over training.

    Before training it is the mean of the per-sample thresholds of the validation run
    (:meth:`initialise`). From the first training batch on it is an EMA of the batch median of per-sample
    thresholds: the EMA starts at the first batch's median (the validation value is not blended in, as in
    ``ray_trainer.py``) and then follows ``v ← decay·v + (1 − decay)·median``.
    """

    def __init__(self, value: float | None = None, decay: float = 0.99):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"`decay` must be in [0, 1), got {decay!r}")
        self.decay = decay
        self.value = value
        self.ema: float | None = None

    def initialise(self, thresholds: Sequence[float] | torch.Tensor) -> float:
        """Set the value to the mean of validation per-sample thresholds (only if none is set yet)."""
        values = torch.as_tensor(thresholds, dtype=torch.float64).flatten()
        values = values[torch.isfinite(values)]
        if values.numel() == 0:
            raise ValueError("`thresholds` holds no finite value")
        if self.value is None:
            self.value = float(values.mean())
        return self.value

    def update(self, thresholds: Sequence[float] | torch.Tensor) -> float:
        """Fold one training batch's per-sample thresholds in; returns the new value."""
        values = torch.as_tensor(thresholds, dtype=torch.float64).flatten()
        values = values[torch.isfinite(values)]
        if values.numel() == 0:
            raise ValueError("`thresholds` holds no finite value")
        median = float(torch.quantile(values, 0.5))  # numpy-style median
        self.ema = median if self.ema is None else self.decay * self.ema + (1.0 - self.decay) * median
        self.value = self.ema
        return self.value


# ----------------------------------------------------------------------------------------------------
# Hierarchical entropy reward: the released code
# ----------------------------------------------------------------------------------------------------


def huber(x: float, kappa: float) -> float:
    """Huber penalty of ``max(x, 0)``: quadratic ``x²/(2κ)`` up to ``κ``, then linear ``x − κ/2``."""
    x = max(float(x), 0.0)
    return 0.5 * x * x / kappa if x <= kappa else x - 0.5 * kappa


def soft_saturate(x: float, temperature: float) -> float:
    """``σ(x / temperature)``, saturating in [0, 1]."""
    t = max(float(temperature), 1e-6)
    z = float(x) / t
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _per_bucket(name: str, value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping) or set(value) != set(BUCKETS):
        raise ValueError(f"`{name}` must map each of {BUCKETS} to a number, got {value!r}")
    return {b: float(value[b]) for b in BUCKETS}


@dataclass
class CodeRewardParams:
    """Constants of the released code's entropy score (``examples/reward_function/aepo.py``)."""

    margin_frac: dict[str, float] = field(default_factory=lambda: {"easy": 0.15, "medium": 0.25, "hard": 0.35})
    kappa: dict[str, float] = field(default_factory=lambda: {"easy": 2.0, "medium": 3.0, "hard": 4.0})
    temperature: dict[str, float] = field(default_factory=lambda: {"easy": 2.0, "medium": 2.5, "hard": 3.0})
    cap_scale: dict[str, float] = field(default_factory=lambda: {"easy": 1.0, "medium": 1.0, "hard": 1.2})
    incorrect_gain: dict[str, float] = field(default_factory=lambda: {"easy": 0.6, "medium": 0.8, "hard": 1.0})
    min_margin: float = 1.0

    def __post_init__(self) -> None:
        for name in ("margin_frac", "kappa", "temperature", "cap_scale", "incorrect_gain"):
            setattr(self, name, _per_bucket(name, getattr(self, name)))


def code_entropy_score(
    n_hwe: float, target: float, bucket: str, correct: bool, alpha: float, params: CodeRewardParams | None = None
) -> float:
    """The released code's entropy score of one sample (added to its accuracy reward).

    With ``Δ = N_HE − target``, ``m = max(1, frac_d·max(target, 1))``, ``cap = α_d·scale_d``:

    ============  ============================================================  ==========================
    bucket        correct                                                       incorrect
    ============  ============================================================  ==========================
    easy          ``−min(cap, Huber(max(Δ − m, 0))/(m + κ)·cap)``                ``+0.6·cap·σ(max(Δ−m,0)/T)``
    medium        same on ``max(|Δ| − m, 0)``                                    ``+0.8·cap·σ(max(Δ−m,0)/T)``
    hard          ``Δ >= −m``: ``+cap·σ((Δ + m)/T)``; else                        ``+cap·σ(max(Δ−m,0)/T)``
                  ``−min(cap, 0.5·Huber(−Δ − m)/(m + κ)·cap)``
    ============  ============================================================  ==========================
    """
    p = params or CodeRewardParams()
    if bucket not in BUCKETS:
        raise ValueError(f"`bucket` must be one of {BUCKETS}, got {bucket!r}")
    delta = float(n_hwe) - float(target)
    margin = max(p.min_margin, p.margin_frac[bucket] * max(float(target), 1.0))
    kappa, temp = p.kappa[bucket], p.temperature[bucket]
    cap = float(alpha) * p.cap_scale[bucket]
    if not correct:
        return p.incorrect_gain[bucket] * cap * soft_saturate(max(delta - margin, 0.0), temp)
    if bucket == "easy":
        return -min(cap, huber(max(delta - margin, 0.0), kappa) / (margin + kappa) * cap)
    if bucket == "medium":
        return -min(cap, huber(max(abs(delta) - margin, 0.0), kappa) / (margin + kappa) * cap)
    if delta >= -margin:
        return cap * soft_saturate(delta + margin, temp)
    return -min(cap, 0.5 * huber(-delta - margin, kappa) / (margin + kappa) * cap)


@dataclass
class RewardOutput:
    """Rewards of one batch: ``total = accuracy + entropy`` per sample, and the batch state used."""

    total: list[float]
    accuracy: list[float]
    entropy: list[float]
    buckets: list[str]
    targets: dict[str, float]
    weights: dict[str, float]


class CodeEntropyReward:
    """The released code's hierarchical entropy reward with its adaptive per-bucket ``α_d``.

    Each batch, in the code's order (``ray_trainer.update_difficulty_and_skip_gid_set``, then
    ``aepo.compute_score``):

    1. per prompt, the mean ``N_HE`` of its rollouts; per bucket, ``target_d = round(scale_d · mean over the
       bucket's prompts)`` (``scale_d = 1`` in the code);
    2. ``α_d += lr·(mean − target)`` for easy/medium and ``lr·(target − mean)`` for hard, clipped to
       ``[α_min, α_max]``; since the target is the rounded mean itself, this moves ``α_d`` by at most
       ``lr/2`` per step unless ``target_scale`` differs from 1 — a property of the released code;
    3. the reward of each sample is ``accuracy + code_entropy_score(...)`` with the updated ``α_d``.

    Args:
        params: the score's constants.
        alpha: initial ``α_d`` (0.5 each in the code).
        alpha_lr: 0.05; ``alpha_min``/``alpha_max``: 0 and 2.
        target_scale: per-bucket multiplier of the target (the code's ``difficulty_coefficient``, all 1).
    """

    def __init__(
        self,
        params: CodeRewardParams | None = None,
        alpha: Mapping[str, float] | None = None,
        alpha_lr: float = 0.05,
        alpha_min: float = 0.0,
        alpha_max: float = 2.0,
        target_scale: Mapping[str, float] | None = None,
    ):
        self.params = params or CodeRewardParams()
        self.alpha = _per_bucket("alpha", alpha or {b: 0.5 for b in BUCKETS})
        if alpha_min > alpha_max:
            raise ValueError(f"`alpha_min`={alpha_min} must be <= `alpha_max`={alpha_max}")
        self.alpha_lr, self.alpha_min, self.alpha_max = float(alpha_lr), float(alpha_min), float(alpha_max)
        self.target_scale = _per_bucket("target_scale", target_scale or {b: 1.0 for b in BUCKETS})
        self.targets: dict[str, float] = {}

    def bucket_means(
        self, n_hwe: Sequence[float], buckets: Sequence[str], groups: Sequence[Hashable]
    ) -> dict[str, list[float]]:
        """Per bucket, the per-prompt mean ``N_HE`` of the prompts in it."""
        per_prompt: dict[Hashable, list[float]] = defaultdict(list)
        bucket_of: dict[Hashable, str] = {}
        for n, b, g in zip(n_hwe, buckets, groups):
            per_prompt[g].append(float(n))
            bucket_of[g] = b
        out: dict[str, list[float]] = defaultdict(list)
        for g, values in per_prompt.items():
            out[bucket_of[g]].append(sum(values) / len(values))
        return dict(out)

    def update(self, n_hwe: Sequence[float], buckets: Sequence[str], groups: Sequence[Hashable]) -> None:
        """Steps 1-2: per-bucket targets and ``α_d`` from this batch (buckets absent keep their values)."""
        means = self.bucket_means(n_hwe, buckets, groups)
        for b, values in means.items():
            mean = sum(values) / len(values)
            self.targets[b] = float(round(self.target_scale[b] * mean))
            err = mean - self.targets[b] if b in ("easy", "medium") else self.targets[b] - mean
            self.alpha[b] = min(self.alpha_max, max(self.alpha_min, self.alpha[b] + self.alpha_lr * err))

    def __call__(
        self,
        n_hwe: Sequence[float],
        correct: Sequence[float | bool],
        buckets: Sequence[str],
        groups: Sequence[Hashable],
        update: bool = True,
    ) -> RewardOutput:
        """Rewards of one batch (``update=False`` scores with the current targets and ``α_d``)."""
        n = len(n_hwe)
        if not (len(correct) == len(buckets) == len(groups) == n):
            raise ValueError(
                f"`n_hwe`, `correct`, `buckets`, `groups` must have one entry per sample; got {n}, "
                f"{len(correct)}, {len(buckets)}, {len(groups)}"
            )
        for b in buckets:
            if b not in BUCKETS:
                raise ValueError(f"`buckets` entries must be one of {BUCKETS}, got {b!r}")
        if update:
            self.update(n_hwe, buckets, groups)
        acc = [1.0 if float(c) > 0.5 else 0.0 for c in correct]
        scores = []
        for k, c, b in zip(n_hwe, acc, buckets):
            target = self.targets.get(b, float(k))
            scores.append(code_entropy_score(k, target, b, c == 1.0, self.alpha[b], self.params))
        return RewardOutput(
            total=[a + s for a, s in zip(acc, scores)], accuracy=acc, entropy=scores, buckets=list(buckets),
            targets=dict(self.targets), weights=dict(self.alpha),
        )


# ----------------------------------------------------------------------------------------------------
# Hierarchical entropy reward: the paper
# ----------------------------------------------------------------------------------------------------


def shaping(delta: float, bucket: str) -> float:
    """The paper's ``g_d(Δ)``: ``max(0, Δ)`` for easy, ``|Δ|`` for medium, ``max(0, −Δ)`` for hard."""
    if bucket == "easy":
        return max(0.0, delta)
    if bucket == "medium":
        return abs(delta)
    if bucket == "hard":
        return max(0.0, -delta)
    raise ValueError(f"`bucket` must be one of {BUCKETS}, got {bucket!r}")


def paper_entropy_reward(
    n_hwe: Sequence[float],
    correct: Sequence[float | bool],
    buckets: Sequence[str],
    lam: float | Mapping[str, float] = 1.0,
    lambda_rule: str = "fixed",
    eps: float = 1e-6,
) -> RewardOutput:
    """The paper's hierarchical reward (§3.2.2): ``R = R_acc − 1[acc = 0]·λ_d·g_d(Δ)``.

    ``N^target(d) = E_batch[N_HE | d]`` and ``Δ = N_HE − N^target(d)``. The paper's multiplier
    ``λ_d = max(0, (E[N_HE|d] − N^target(d)) / (Var[N_HE|d] + ε))`` is **identically zero as written**
    (the target *is* the batch mean), which would switch the shaping off; it is underspecified. So ``λ`` is
    configurable: ``lambda_rule="fixed"`` (default) uses ``lam`` (one number or one per bucket);
    ``lambda_rule="paper"`` evaluates the formula as written (and therefore returns ``R = R_acc``).
    """
    if lambda_rule not in ("fixed", "paper"):
        raise ValueError(f"`lambda_rule` must be 'fixed' or 'paper', got {lambda_rule!r}")
    if not (len(n_hwe) == len(correct) == len(buckets)):
        raise ValueError("`n_hwe`, `correct` and `buckets` must have one entry per sample")
    values: dict[str, list[float]] = defaultdict(list)
    for k, b in zip(n_hwe, buckets):
        if b not in BUCKETS:
            raise ValueError(f"`buckets` entries must be one of {BUCKETS}, got {b!r}")
        values[b].append(float(k))
    targets = {b: sum(v) / len(v) for b, v in values.items()}
    if lambda_rule == "paper":
        lambdas = {}
        for b, v in values.items():
            mean = targets[b]
            var = sum((x - mean) ** 2 for x in v) / len(v)
            lambdas[b] = max(0.0, (mean - targets[b]) / (var + eps))
    elif isinstance(lam, Mapping):
        lambdas = {b: float(lam[b]) for b in values}
    else:
        lambdas = {b: float(lam) for b in values}
    acc = [1.0 if float(c) > 0.5 else 0.0 for c in correct]
    penalty = [
        -(1.0 - a) * lambdas[b] * shaping(float(k) - targets[b], b) for k, a, b in zip(n_hwe, acc, buckets)
    ]
    return RewardOutput(
        total=[a + p for a, p in zip(acc, penalty)], accuracy=acc, entropy=penalty, buckets=list(buckets),
        targets=targets, weights=lambdas,
    )


def paper_advantage_bonus(
    window_values: torch.Tensor,
    hwe: torch.Tensor,
    threshold: torch.Tensor | float,
    buckets: Sequence[str],
    lam: float | Mapping[str, float] = 1.0,
    phi: Callable[[torch.Tensor], torch.Tensor] | None = None,
    mask: torch.Tensor | None = None,
    baseline: str = "mean",
) -> torch.Tensor:
    """Alg. 1 line 13's token-level bonus ``ψ_{i,t} = λ_d·φ([H̄_{i,t:w} − θ]_+)·m_{i,t} − b_i`` (``[B, T]``).

    Added to the GRPO advantage in the paper's algorithm; **not** in the released code. ``φ`` and ``b_i``
    are unspecified in the paper: ``φ`` defaults to the identity, and ``baseline="mean"`` takes ``b_i`` as
    the mean of the first term over the row's valid positions (so the bonus does not shift the row's mean
    advantage); ``baseline="none"`` uses ``b_i = 0``. Both are design choices.
    """
    if baseline not in ("mean", "none"):
        raise ValueError(f"`baseline` must be 'mean' or 'none', got {baseline!r}")
    if mask is None:
        mask = torch.ones_like(hwe, dtype=torch.bool)
    thr = threshold if torch.is_tensor(threshold) else torch.tensor(float(threshold))
    thr = thr.to(window_values.device, torch.float32)
    if thr.dim() == 1:
        thr = thr[:, None]
    excess = torch.nan_to_num(window_values.float() - thr, nan=0.0).clamp_min(0.0)
    if phi is not None:
        excess = phi(excess)
    lam_row = torch.tensor(
        [float(lam[b]) if isinstance(lam, Mapping) else float(lam) for b in buckets], device=window_values.device
    )
    term = lam_row[:, None] * excess * (hwe & mask).float()
    if baseline == "mean":
        count = mask.sum(1, keepdim=True).clamp_min(1)
        term = term - (term * mask).sum(1, keepdim=True) / count
    return term * mask


# ----------------------------------------------------------------------------------------------------
# KL
# ----------------------------------------------------------------------------------------------------

KL_KINDS = ("low_var_kl", "kl", "abs", "mse")


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "low_var_kl") -> torch.Tensor:
    """Per-token KL estimate between policy and reference from the sampled tokens' log-probs.

    ``low_var_kl`` (the code's ``kl_penalty``, Schulman's k3): ``exp(r − p) − (r − p) − 1`` with ``r − p``
    clamped to ±20 and the result to [−10, 10]; ``kl``: ``p − r``; ``abs``: ``|p − r|``; ``mse``:
    ``(p − r)²/2``.
    """
    logp, ref_logp = logp.float(), ref_logp.float()
    if kind == "kl":
        return logp - ref_logp
    if kind == "abs":
        return (logp - ref_logp).abs()
    if kind == "mse":
        return 0.5 * (logp - ref_logp).square()
    if kind == "low_var_kl":
        d = (ref_logp - logp).clamp(-20.0, 20.0)
        return (d.exp() - d - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"`kind` must be one of {KL_KINDS}, got {kind!r}")


def masked_average(values: torch.Tensor, mask: torch.Tensor, mode: str = "token") -> torch.Tensor:
    """``"token"``: mean over all valid tokens of the batch; ``"seq"``: mean of per-sequence means."""
    m = mask.to(values.dtype)
    if mode == "token":
        return (values * m).sum() / (m.sum() + 1e-8)
    if mode == "seq":
        return ((values * m).sum(-1) / (m.sum(-1) + 1e-8)).mean()
    raise ValueError(f"`mode` must be 'token' or 'seq', got {mode!r}")


class CodeKLController:
    """The released code's per-bucket adaptive KL weight (``dp_actor.py``) and second-chance relaxation.

    Every micro-step (:meth:`observe`), per bucket present in the micro-batch:

    1. ``KL̄_d ← 0.03·KL + 0.97·KL̄_d`` (EMA 0.97; the first observation initialises it), with ``KL`` the
       bucket's mean of per-sequence mean token KL;
    2. ``e = KL̄_d / target − 1``; nothing more happens when ``|e| < deadzone`` (0.02) or when the micro-step
       count is not a multiple of ``interval`` (100);
    3. otherwise ``ē_d ← 0.03·e + 0.97·ē_d`` (the error EMA advances only on update steps) and
       ``log β_d += lr·clip(ē_d, ±clip)`` (lr 0.05, clip 0.2), ``β_d ∈ [1e-4, 100]``.

    The KL loss weights each sequence's token KL by its bucket's ``β`` (unknown buckets use medium's) and by
    0.67 for *easy, incorrect* samples whose soft reasoning cost is ``>= 0.5`` ("second chance"), then averages
    (token mean) and scales by ``kl_coef`` (0.01 with ``low_var_kl`` in the code's config).
    """

    def __init__(
        self,
        target: float | Mapping[str, float] = 0.01,
        beta_init: float = 1.0,
        ema: float = 0.97,
        lr: float = 0.05,
        clip: float = 0.2,
        interval: int = 100,
        deadzone: float = 0.02,
        beta_min: float = 1e-4,
        beta_max: float = 100.0,
        second_chance: float = 0.67,
        second_chance_min_cost: float = 0.5,
    ):
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"`ema` must be in [0, 1), got {ema!r}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"`interval` must be an int >= 1, got {interval!r}")
        if not 0 < beta_min <= beta_init <= beta_max:
            raise ValueError(f"need 0 < `beta_min` <= `beta_init` <= `beta_max`, got {beta_min}, {beta_init}, {beta_max}")
        targets = target if isinstance(target, Mapping) else {b: float(target) for b in BUCKETS}
        self.target = _per_bucket("target", targets)
        self.beta = {b: float(beta_init) for b in BUCKETS}
        self.kl_ema: dict[str, float | None] = {b: None for b in BUCKETS}
        self.error_ema = {b: 0.0 for b in BUCKETS}
        self.ema, self.lr, self.clip, self.interval = float(ema), float(lr), float(clip), interval
        self.deadzone, self.beta_min, self.beta_max = float(deadzone), float(beta_min), float(beta_max)
        self.second_chance, self.second_chance_min_cost = float(second_chance), float(second_chance_min_cost)
        self.steps = 0

    def observe(self, buckets: Sequence[str], seq_kl: torch.Tensor | Sequence[float]) -> None:
        """One micro-step: fold the per-sequence mean KL of this micro-batch into the controller."""
        self.steps += 1
        values = torch.as_tensor(seq_kl, dtype=torch.float64).detach().cpu().tolist()
        per: dict[str, list[float]] = defaultdict(list)
        for b, v in zip(buckets, values):
            if b in BUCKETS:
                per[str(b)].append(float(v))
        for b, vals in per.items():
            current = sum(vals) / len(vals)
            last = self.kl_ema[b] if self.kl_ema[b] is not None else current
            mean = (1.0 - self.ema) * current + self.ema * last
            self.kl_ema[b] = mean
            e = mean / max(1e-8, self.target[b]) - 1.0
            if abs(e) < self.deadzone or self.steps % self.interval != 0:
                continue
            self.error_ema[b] = (1.0 - self.ema) * e + self.ema * self.error_ema[b]
            step = max(-self.clip, min(self.clip, self.error_ema[b]))
            beta = min(self.beta_max, max(self.beta_min, self.beta[b]))
            log_beta = math.log(beta) + self.lr * step
            self.beta[b] = math.exp(min(math.log(self.beta_max), max(math.log(self.beta_min), log_beta)))

    def betas(self, buckets: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
        """``[B, 1]`` current ``β`` of each sample's bucket (medium's for an unknown bucket)."""
        return torch.tensor([self.beta.get(str(b), self.beta["medium"]) for b in buckets],
                            dtype=torch.float32, device=device)[:, None]

    def relaxation(
        self,
        buckets: Sequence[str],
        correct: Sequence[float | bool] | None,
        soft_cost: Sequence[float] | None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """``[B, 1]``: ``second_chance`` (0.67) for easy, incorrect samples with soft cost ``>= 0.5``, else 1.

        As in the code, without soft costs nothing is relaxed, and a missing ``correct`` does not restrict.
        """
        out = torch.ones(len(buckets), 1, dtype=torch.float32, device=device)
        if soft_cost is None:
            return out
        for i, b in enumerate(buckets):
            wrong = correct is None or float(correct[i]) < 0.5
            if str(b) == "easy" and wrong and float(soft_cost[i]) >= self.second_chance_min_cost:
                out[i] = self.second_chance
        return out

    def kl_loss(
        self,
        per_token_kl: torch.Tensor,
        mask: torch.Tensor,
        buckets: Sequence[str],
        correct: Sequence[float | bool] | None = None,
        soft_cost: Sequence[float] | None = None,
        kl_coef: float = 0.01,
        average: str = "token",
        observe: bool = True,
    ) -> torch.Tensor:
        """``kl_coef · average(β_d · relax · kl)``; observes the micro-batch first, as the code does."""
        if observe:
            with torch.no_grad():
                m = mask.to(per_token_kl.dtype)
                self.observe(buckets, (per_token_kl * m).sum(1) / m.sum(1).clamp_min(1.0))
        weight = self.betas(buckets, per_token_kl.device) * self.relaxation(buckets, correct, soft_cost,
                                                                            per_token_kl.device)
        return masked_average(per_token_kl * weight, mask, average) * kl_coef

    def state_dict(self) -> dict[str, Any]:
        """The controller's state (β, EMAs, micro-step count), e.g. for logging or checkpoints."""
        return {"beta": dict(self.beta), "kl_ema": dict(self.kl_ema), "error_ema": dict(self.error_ema),
                "steps": self.steps}


class PaperKLController:
    """The paper's dynamic KL (§3.2.2 Eq. 1, Alg. 1 lines 16-24): token weights and the ``κ_d`` controller.

    ``β_{i,t} = β_d·ρ^{m_{i,t}}`` relaxes the KL inside HWE windows (``ρ < 1``);
    ``L_KL = κ_d · (1/G) Σ_i (1/L_i) Σ_t β_{i,t}·kld_{i,t}``; after each update
    ``κ_d ← clip(κ_d·(1 + α_κ·(KL_ctrl/δ_d − 1)), κ_min, κ_max)`` with
    ``KL_ctrl = (1/G) Σ_i (1/L_i) Σ_t 1[m_{i,t} = 0]·kld_{i,t}`` (non-window tokens only). The paper gives no
    values for ``β_d``, ``ρ``, ``δ_d``, ``α_κ``, ``κ`` bounds: the defaults here are design choices
    (``δ_d`` defaults to the code's KL target 0.01). There is no token-level ``ρ`` in the released code.
    """

    def __init__(
        self,
        beta: float | Mapping[str, float] = 1.0,
        rho: float = 0.5,
        target: float | Mapping[str, float] = 0.01,
        kappa_init: float = 1.0,
        alpha_kappa: float = 0.1,
        kappa_min: float = 1e-3,
        kappa_max: float = 100.0,
    ):
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"`rho` must be in (0, 1], got {rho!r}")
        if not 0 < kappa_min <= kappa_init <= kappa_max:
            raise ValueError(
                f"need 0 < `kappa_min` <= `kappa_init` <= `kappa_max`, got {kappa_min}, {kappa_init}, {kappa_max}"
            )
        self.beta = _per_bucket("beta", beta if isinstance(beta, Mapping) else {b: float(beta) for b in BUCKETS})
        self.target = _per_bucket(
            "target", target if isinstance(target, Mapping) else {b: float(target) for b in BUCKETS}
        )
        self.rho, self.alpha_kappa = float(rho), float(alpha_kappa)
        self.kappa = {b: float(kappa_init) for b in BUCKETS}
        self.kappa_min, self.kappa_max = float(kappa_min), float(kappa_max)

    def token_weights(self, buckets: Sequence[str], hwe: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` ``β_d·ρ^{m_{i,t}}``."""
        beta = torch.tensor([self.beta[b] for b in buckets], device=hwe.device)[:, None]
        return beta * torch.where(hwe, torch.full_like(beta, self.rho), torch.ones_like(beta))

    def kl_loss(
        self, per_token_kl: torch.Tensor, mask: torch.Tensor, buckets: Sequence[str], hwe: torch.Tensor
    ) -> torch.Tensor:
        """``mean_i κ_{d(i)}·(1/L_i)·Σ_t β_{i,t}·kld_{i,t}``."""
        m = mask.to(per_token_kl.dtype)
        per_seq = (self.token_weights(buckets, hwe & mask) * per_token_kl * m).sum(1) / m.sum(1).clamp_min(1.0)
        kappa = torch.tensor([self.kappa[b] for b in buckets], device=per_token_kl.device)
        return (kappa * per_seq).mean()

    def update(
        self, per_token_kl: torch.Tensor, mask: torch.Tensor, buckets: Sequence[str], hwe: torch.Tensor
    ) -> dict[str, float]:
        """Move each present bucket's ``κ_d`` towards its KL target; returns the ``KL_ctrl`` per bucket."""
        with torch.no_grad():
            m = mask.to(per_token_kl.dtype)
            outside = (~hwe & mask).to(per_token_kl.dtype)
            per_seq = ((per_token_kl * outside).sum(1) / m.sum(1).clamp_min(1.0)).cpu().tolist()
        per: dict[str, list[float]] = defaultdict(list)
        for b, v in zip(buckets, per_seq):
            per[b].append(v)
        ctrl = {}
        for b, vals in per.items():
            kl = sum(vals) / len(vals)
            ctrl[b] = kl
            k = self.kappa[b] * (1.0 + self.alpha_kappa * (kl / self.target[b] - 1.0))
            self.kappa[b] = min(self.kappa_max, max(self.kappa_min, k))
        return ctrl


# ----------------------------------------------------------------------------------------------------
# Adaptive cold start
# ----------------------------------------------------------------------------------------------------


def length_target(pass_rate: float, l0: float, l1: float) -> float:
    """Paper §3.1: ``L_target(p) = (1 − p)·L(0) + p·L(1)``, ``L(0)``/``L(1)`` the median response lengths of a
    source's problems with pass rate 0 and 1."""
    if not 0.0 <= pass_rate <= 1.0:
        raise ValueError(f"`pass_rate` must be in [0, 1], got {pass_rate!r}")
    return (1.0 - pass_rate) * float(l0) + pass_rate * float(l1)


def cold_start_filter(
    sources: Sequence[Hashable],
    pass_rates: Sequence[float],
    lengths: Sequence[int],
    *,
    tolerance: float = 0.25,
    per_bracket: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Indices of the cold-start responses to keep (paper §3.1, AdaCS).

    Per data source, ``L(0)`` and ``L(1)`` are the median lengths of the responses whose pass rate is 0 and
    1; a response with pass rate ``p`` is kept when ``|length − L_target(p)| <= tolerance·L_target(p)``.
    Then, within each source, the same number of responses is drawn from every pass-rate bracket
    (``per_bracket``, or the size of the smallest non-empty bracket), uniformly at random with ``seed``.
    The paper gives neither the tolerance nor the bracket sizes: both are choices here.

    Args:
        sources: data source of each response.
        pass_rates: the problem's pass rate (e.g. ``k/8``); equal values form a bracket.
        lengths: response length in tokens.
        tolerance: relative distance to the target that is "near" (0.25 = within 25%).
        per_bracket: responses kept per bracket and source (``None``: balance to the smallest bracket).
        seed: random seed of the draw.
    """
    n = len(sources)
    if not (len(pass_rates) == len(lengths) == n):
        raise ValueError(f"`sources`, `pass_rates`, `lengths` must have equal lengths, got {n}, "
                         f"{len(pass_rates)}, {len(lengths)}")
    if tolerance < 0:
        raise ValueError(f"`tolerance` must be >= 0, got {tolerance!r}")
    if per_bracket is not None and (isinstance(per_bracket, bool) or not isinstance(per_bracket, int)
                                    or per_bracket < 1):
        raise ValueError(f"`per_bracket` must be None or an int >= 1, got {per_bracket!r}")
    by_source: dict[Hashable, list[int]] = defaultdict(list)
    for i, s in enumerate(sources):
        by_source[s].append(i)
    rng = random.Random(seed)
    kept: list[int] = []
    for source, idx in by_source.items():
        zero = [lengths[i] for i in idx if pass_rates[i] == 0]
        one = [lengths[i] for i in idx if pass_rates[i] == 1]
        if not zero or not one:
            raise ValueError(
                f"source {source!r} has no response with pass rate {0 if not zero else 1}; L(0) and L(1) need both"
            )
        l0, l1 = statistics.median(zero), statistics.median(one)
        brackets: dict[float, list[int]] = defaultdict(list)
        for i in idx:
            target = length_target(float(pass_rates[i]), l0, l1)
            if abs(lengths[i] - target) <= tolerance * target:
                brackets[round(float(pass_rates[i]), 9)].append(i)
        if not brackets:
            continue
        size = per_bracket or min(len(v) for v in brackets.values())
        for key in sorted(brackets):
            members = brackets[key]
            kept.extend(members if len(members) <= size else rng.sample(members, size))
    return sorted(kept)
