"""ARES with TRL's ``GRPOTrainer``: the entropy-shaped reward as a reward function, the per-bucket KL as a
trainer subclass. Needs the ``train`` extra (``trl``), imported here only.

* :class:`AresRewardFunction` is a plain TRL reward function (``reward_funcs=[AresRewardFunction(...)]``)
  and works with the stock ``GRPOTrainer``: it scores each completion's correctness with a callable you
  give, recomputes the policy's token entropies on prompt + completion (one no-grad forward; the
  trainer's own entropies are only computed after the rewards), counts HWE tokens (released-code or paper
  variant), buckets the prompts by pass rate over their rollouts and returns ``accuracy + entropy score``.
* :class:`AresGRPOTrainer` adds the dynamic KL: the KL term of TRL's loss is replaced by
  :class:`~tokenreduce.plugins.ares.training.CodeKLController`'s per-bucket ``β`` (with the second-chance
  relaxation), fed with the buckets, outcomes and soft costs the reward function computed for the same
  rollouts. ``GRPOConfig.beta`` plays the role of the code's ``kl_coef`` (0.01).

Groups (the rollouts of one prompt) are recognised by equal prompts; with several processes each must
hold whole groups (TRL's ``RepeatSampler`` keeps a prompt's generations together when
``per_device_train_batch_size`` is a multiple of ``num_generations``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from trl import GRPOTrainer

from tokenreduce.kernels import token_entropy

from .config import BUCKETS
from .training import (
    CodeEntropyReward,
    CodeKLController,
    EntropyThresholdEMA,
    TriggerVocabulary,
    code_window_percentile,
    count_hwe_code,
    count_hwe_paper,
    difficulty_buckets,
    kl_per_token,
    paper_entropy_reward,
)

VARIANTS = ("code", "paper")


class AresRewardFunction:
    """TRL reward function ``accuracy + ARES entropy score``.

    Args:
        model: the policy being trained (its entropies define the HWE tokens); the trainer's model.
        tokenizer: its tokenizer (prompts are tokenised as TRL does: plain text through ``tokenizer(text=...)``,
            conversations through ``apply_chat_template(..., add_generation_prompt=True)``).
        correctness: ``correctness(completion=..., prompt=..., **row) -> float | bool`` with ``row`` the
            dataset columns of the sample (e.g. ``answer``); ``> 0.5`` counts as correct.
        variant: ``"code"`` (released code: trigger words, next-4 window, EMA threshold,
            :class:`CodeEntropyReward`) or ``"paper"`` (§3.2: quantile rule, :func:`paper_entropy_reward`).
        difficulty_variant: bucket rule (``"code"`` or ``"paper"``); defaults to ``variant``.
        trigger: trigger vocabulary for the code variant (default: :data:`DEFAULT_TRIGGER_WORDS` over
            ``tokenizer``).
        threshold: the code variant's HWE threshold state; uninitialised, it starts from the first batch.
        reward: the code variant's reward state (``α_d``, targets).
        paper_lambda: ``λ`` of the paper variant (the paper's closed form is identically zero).
        window: ``w`` (4).
        temperature: entropy temperature; :class:`AresGRPOTrainer` sets it to the sampling temperature.
        quantile: the paper variant's per-trajectory quantile (0.95).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        correctness: Callable[..., float | bool],
        *,
        variant: str = "code",
        difficulty_variant: str | None = None,
        trigger: TriggerVocabulary | None = None,
        threshold: EntropyThresholdEMA | None = None,
        reward: CodeEntropyReward | None = None,
        paper_lambda: float = 1.0,
        window: int = 4,
        temperature: float = 1.0,
        quantile: float = 0.95,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}")
        self.__name__ = f"ares_{variant}"
        self.model, self.tokenizer, self.correctness = model, tokenizer, correctness
        self.variant = variant
        self.difficulty_variant = difficulty_variant or variant
        self.trigger = trigger if trigger is not None or variant != "code" else TriggerVocabulary(tokenizer)
        self.threshold = threshold or EntropyThresholdEMA()
        self.reward = reward or CodeEntropyReward()
        self.paper_lambda, self.window, self.temperature, self.quantile = paper_lambda, window, temperature, quantile
        self.last: dict[str, Any] = {}

    # ----- the policy's entropies ---------------------------------------------------------------------
    def _prompt_ids(self, prompts: Sequence[Any]) -> list[list[int]]:
        if isinstance(prompts[0], str):
            return [list(ids) for ids in self.tokenizer(text=list(prompts))["input_ids"]]
        out = self.tokenizer.apply_chat_template(
            conversation=list(prompts), add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return [list(ids) for ids in out["input_ids"]]

    @torch.no_grad()
    def entropies(
        self, prompts: Sequence[Any], completion_ids: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[N, C]`` token entropies and top-1 ids of the completion positions, and the ``[N, C]`` mask."""
        prompt_ids = self._prompt_ids(prompts)
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            attention[i, : len(r)] = 1
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
        finally:
            self.model.train(was_training)
        length = max((len(c) for c in completion_ids), default=0)
        entropy = torch.zeros(len(rows), length)
        top1 = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
            if not len(c):
                continue
            step = logits[i, len(p) - 1 : len(p) - 1 + len(c)]
            entropy[i, : len(c)] = token_entropy(step, self.temperature).float().cpu()
            top1[i, : len(c)] = step.argmax(-1).cpu()
            mask[i, : len(c)] = True
        return entropy, top1, mask

    # ----- the reward ---------------------------------------------------------------------------------
    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]],
        **kwargs: Any,
    ) -> list[float]:
        n = len(prompts)
        columns = {k: v for k, v in kwargs.items() if isinstance(v, (list, tuple)) and len(v) == n}
        correct = [
            float(self.correctness(completion=completions[i], prompt=prompts[i],
                                   **{k: v[i] for k, v in columns.items()}))
            for i in range(n)
        ]
        groups = [p if isinstance(p, str) else repr(p) for p in prompts]
        buckets = difficulty_buckets(correct, groups, self.difficulty_variant)
        entropy, top1, mask = self.entropies(prompts, completion_ids)
        if self.variant == "code":
            per_sample = code_window_percentile(entropy, mask, window=self.window)
            if self.threshold.value is None:
                self.threshold.initialise(per_sample)
            threshold = float(self.threshold.value)
            count = count_hwe_code(entropy, top1, threshold, self.trigger, mask, window=self.window)
            n_hwe = count.counts.tolist()
            soft_cost = count.soft_cost.tolist()
            self.threshold.update(per_sample)
            out = self.reward(n_hwe, correct, buckets, groups)
        else:
            count = count_hwe_paper(entropy, mask, window=self.window, quantile=self.quantile, groups=groups)
            n_hwe = count.counts.tolist()
            soft_cost = None
            threshold = float(count.threshold.nanmean())
            out = paper_entropy_reward(n_hwe, correct, buckets, lam=self.paper_lambda)
        self.last = {"groups": groups, "buckets": buckets, "correct": correct, "n_hwe": n_hwe, "soft_cost": soft_cost,
                     "threshold": threshold, "entropy_score": out.entropy, "targets": out.targets,
                     "weights": out.weights}
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            log_metric("ares/n_hwe", sum(n_hwe) / max(1, n))
            log_metric("ares/hwe_threshold", threshold)
            for b in BUCKETS:
                share = sum(1 for x in buckets if x == b) / max(1, n)
                log_metric(f"ares/share_{b}", share)
        return out.total


class AresGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose KL term uses ARES's per-bucket dynamic ``β`` (released-code controller).

    Args:
        ares_reward: the :class:`AresRewardFunction` among ``reward_funcs`` whose buckets, outcomes and soft
            costs weight the KL of the same rollouts.
        kl_controller: the controller (default :class:`CodeKLController` with the code's settings).
        *args, **kwargs: ``GRPOTrainer``'s. ``args.beta`` must be > 0 (it is the code's ``kl_coef``; TRL loads
            the reference model only then).
    """

    def __init__(self, *args: Any, ares_reward: AresRewardFunction, kl_controller: CodeKLController | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.beta == 0.0:
            raise ValueError("AresGRPOTrainer needs `beta` > 0 in GRPOConfig (the KL coefficient, 0.01 in ARES)")
        self.ares_reward = ares_reward
        self.ares_reward.temperature = float(self.args.temperature)
        self.kl_controller = kl_controller or CodeKLController()
        self._ares_logps: torch.Tensor | None = None

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)
        last = self.ares_reward.last
        n = out["completion_ids"].shape[0]
        if len(last.get("buckets", ())) != n:
            raise RuntimeError(
                f"AresGRPOTrainer: the ARES reward scored {len(last.get('buckets', ()))} completions but the "
                f"batch holds {n}; pass the same AresRewardFunction in `reward_funcs` and as `ares_reward`"
            )
        device = out["completion_ids"].device
        out["ares_bucket"] = torch.tensor([BUCKETS.index(b) for b in last["buckets"]], device=device)
        out["ares_correct"] = torch.tensor(last["correct"], dtype=torch.float32, device=device)
        soft = last["soft_cost"] if last["soft_cost"] is not None else [float("nan")] * n
        out["ares_soft_cost"] = torch.tensor(soft, dtype=torch.float32, device=device)
        return out

    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any):
        result = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        self._ares_logps = result[0]
        return result

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        if "ares_bucket" not in inputs:
            return super()._compute_loss(model, inputs)
        beta, self.beta = self.beta, 0.0  # the policy loss without TRL's scalar-β KL term
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self.beta = beta
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        kl = kl_per_token(self._ares_logps, inputs["ref_per_token_logps"], "low_var_kl")
        buckets = [BUCKETS[int(i)] for i in inputs["ares_bucket"].tolist()]
        soft = inputs["ares_soft_cost"]
        soft_cost = None if torch.isnan(soft).all() else soft.tolist()
        training = self.model.training
        kl_loss = self.kl_controller.kl_loss(
            kl, mask.bool(), buckets, inputs["ares_correct"].tolist(), soft_cost, kl_coef=beta, observe=training
        )
        mode = "train" if training else "eval"
        if training:
            kl_loss = kl_loss / self.current_gradient_accumulation_steps
        with torch.no_grad():
            m = mask.to(kl.dtype)
            self._metrics[mode]["kl"].append(float((kl * m).sum() / m.sum().clamp_min(1.0)))
        for b in BUCKETS:
            self._metrics[mode][f"ares/beta_{b}"].append(self.kl_controller.beta[b])
        return loss + kl_loss
