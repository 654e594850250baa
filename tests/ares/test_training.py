"""ARES training pieces against hand-computed values (paper and released-code variants where they differ)."""

import math

import numpy as np
import pytest
import torch

from tokenreduce.plugins.ares.training import (
    DEFAULT_TRIGGER_WORDS,
    CodeEntropyReward,
    CodeKLController,
    EntropyThresholdEMA,
    PaperKLController,
    TriggerVocabulary,
    bucket_from_pass_rate,
    code_entropy_score,
    code_window_percentile,
    cold_start_filter,
    count_hwe_code,
    count_hwe_paper,
    count_hwe_semantic,
    difficulty_buckets,
    huber,
    kl_per_token,
    length_target,
    normalize_token,
    paper_advantage_bonus,
    paper_entropy_reward,
)
from tokenreduce.testing.tiny import tiny_tokenizer


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------------------------------
# Difficulty
# ----------------------------------------------------------------------------------------------------


def test_paper_buckets_for_eight_rollouts():
    got = [bucket_from_pass_rate(k, 8, "paper") for k in range(9)]
    assert got == ["hard"] * 3 + ["medium"] * 3 + ["easy"] * 3


def test_code_buckets_use_thirds():
    assert [bucket_from_pass_rate(k, 3, "code") for k in range(4)] == ["hard", "medium", "easy", "easy"]
    # For 8 rollouts the two rules disagree at 3/8 (code: medium since 3/8 >= 1/3) and 2/8 (hard in both),
    # 5/8 (code: medium, 5/8 < 2/3) and 6/8 (easy in both).
    assert [bucket_from_pass_rate(k, 8, "code") for k in range(9)] == (
        ["hard"] * 3 + ["medium"] * 3 + ["easy"] * 3)
    assert bucket_from_pass_rate(2, 6, "code") == "medium" and bucket_from_pass_rate(2, 6, "paper") == "medium"
    assert bucket_from_pass_rate(1, 6, "code") == "hard" and bucket_from_pass_rate(4, 6, "code") == "easy"
    assert bucket_from_pass_rate(4, 6, "paper") == "medium"  # 4/6 < 0.75


def test_difficulty_buckets_group_by_prompt():
    correct = [1, 1, 1, 0, 0, 0, 0, 1, True, 0.0]
    groups = ["a"] * 4 + ["b"] * 4 + ["c"] * 2
    assert difficulty_buckets(correct, groups, "paper") == ["easy"] * 4 + ["hard"] * 4 + ["medium"] * 2
    assert difficulty_buckets(correct, groups, "code") == ["easy"] * 4 + ["hard"] * 4 + ["medium"] * 2
    with pytest.raises(ValueError, match="`variant` must be one of"):
        bucket_from_pass_rate(1, 2, "median")
    with pytest.raises(ValueError, match=r"`correct` must be in \[0, total=2\], got 3"):
        bucket_from_pass_rate(3, 2)


# ----------------------------------------------------------------------------------------------------
# HWE counting
# ----------------------------------------------------------------------------------------------------


def test_paper_hwe_count_by_hand():
    e0 = [0.1, 0.2, 3.0, 2.8, 0.1, 0.1]
    e1 = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    entropy = torch.tensor([e0, e1])
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    out = count_hwe_paper(entropy, mask, window=2, quantile=0.5)
    theta0 = float(np.percentile(e0, 50))  # 0.15
    theta1 = float(np.percentile(e1[:4], 50))  # 1.0
    tau = (theta0 + theta1) / 2  # 0.575
    np.testing.assert_allclose(out.theta.tolist(), [theta0, theta1], atol=1e-6)
    np.testing.assert_allclose(out.threshold.tolist(), [tau, tau], atol=1e-6)
    w0 = [0.15, 1.6, 2.9, 1.45, 0.1]  # forward windows of 2 of row 0
    w1 = [1.0, 1.0, 1.0]  # row 1: windows inside its 4 valid steps
    assert out.mask[0].tolist() == [w >= tau for w in w0] + [False]
    assert out.mask[1].tolist() == [w >= tau for w in w1] + [False] * 3
    assert out.counts.tolist() == [3, 3]
    grouped = count_hwe_paper(entropy, mask, window=2, quantile=0.5, groups=["x", "y"])
    np.testing.assert_allclose(grouped.threshold.tolist(), [theta0, theta1], atol=1e-6)
    assert grouped.counts.tolist() == [4, 3]  # each row against its own θ_i (Alg. 1 with one rollout/group)


def test_semantic_hwe_count_by_hand():
    entropy = torch.tensor([[0.1, 5.0, 0.2], [4.0, 0.3, 6.0]])
    trigger = torch.tensor([[False, True, True], [True, True, False]])
    out = count_hwe_semantic(entropy, trigger, quantile=0.5)
    assert float(out.threshold[0]) == pytest.approx(2.15)  # batch median of the six entropies
    assert out.counts.tolist() == [1, 1]


def test_trigger_vocabulary_and_normalisation():
    assert normalize_token("ĠWait ") == "wait" and normalize_token("▁However") == "however"
    vocab = TriggerVocabulary(tiny_tokenizer(), words=("w5", "W7"))
    assert len(vocab) == 2 and vocab.table[5] and vocab.table[7] and not vocab.table[6]
    ids = torch.tensor([[5, 6, 7, 5000, -1]])
    assert vocab(ids).tolist() == [[True, False, True, False, False]]
    assert len(DEFAULT_TRIGGER_WORDS) == 25


def test_code_hwe_count_by_hand():
    entropy = torch.tensor([[0.5, 1.0, 2.0, 3.0, 0.2, 0.4, 1.0, 0.1]])
    ids = torch.tensor([[5, 9, 7, 5, 5, 9, 5, 7]])
    vocab = TriggerVocabulary(table=torch.isin(torch.arange(20), torch.tensor([5, 7])))
    out = count_hwe_code(entropy, ids, 1.0, vocab, window=2)
    # next-2 means: t0 1.5, t2 1.6 (valid); t3 0.3, t4 0.7 (invalid); t6, t7 have no full window.
    assert out.counts.tolist() == [2] and out.invalid.tolist() == [2]
    assert float(out.soft_cost[0]) == pytest.approx(0.5 + 0.6)
    assert out.mask[0].nonzero().flatten().tolist() == [0, 2]
    short = count_hwe_code(entropy, ids, 1.0, vocab, torch.tensor([[True] * 4 + [False] * 4]), window=2)
    # Only 4 valid steps: t2 and t3 have no full next window any more; t0 stays valid.
    assert short.counts.tolist() == [1] and short.invalid.tolist() == [0]


def _code_percentile_loop(entropies, window, percentile):
    """The released code's per-sample threshold, written as its loop."""
    values = []
    for i in range(len(entropies)):
        if len(entropies) - i - 1 >= window:
            values.append(float(np.mean(entropies[i + 1 : i + 1 + window])))
        elif values:
            values.append(float(np.mean(values)))
        else:
            values.append(entropies[i])
    return float(np.percentile(values, percentile))


def test_code_window_percentile_matches_the_code_loop():
    rows = [[0.5, 1.0, 2.0, 3.0, 0.2, 0.4, 1.0, 0.1], [2.0, 1.0, 3.0, 0, 0, 0, 0, 0]]
    mask = torch.tensor([[True] * 8, [True] * 3 + [False] * 5])
    got = code_window_percentile(torch.tensor(rows), mask, window=2, percentile=95.0)
    assert got[0].item() == pytest.approx(_code_percentile_loop(rows[0], 2, 95.0), abs=1e-5)
    assert got[1].item() == pytest.approx(_code_percentile_loop(rows[1][:3], 2, 95.0), abs=1e-5)
    assert got[1].item() == pytest.approx(2.0)  # t0 = mean(1, 3), then fills of 2.0


def test_threshold_ema_follows_the_code():
    ema = EntropyThresholdEMA()
    assert ema.initialise([1.0, 2.0, 3.0]) == pytest.approx(2.0)
    assert ema.update([1.0, 5.0, 3.0, 10.0]) == pytest.approx(4.0)  # the EMA starts at the first median
    assert ema.update([2.0, 2.0]) == pytest.approx(0.99 * 4.0 + 0.01 * 2.0)
    assert ema.initialise([100.0]) == pytest.approx(3.98)  # already set: validation does not overwrite


# ----------------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------------


def test_huber():
    assert huber(1.5, 2.0) == pytest.approx(0.5 * 2.25 / 2.0)
    assert huber(8.5, 2.0) == pytest.approx(7.5)
    assert huber(-3.0, 2.0) == 0.0


@pytest.mark.parametrize("n_hwe, bucket, correct, expected", [
    # target 10, alpha 0.5. easy: margin max(1, 1.5) = 1.5, kappa 2, temperature 2, cap 0.5.
    (13, "easy", True, -(0.5 * 1.5**2 / 2.0) / (1.5 + 2.0) * 0.5),
    (20, "easy", True, -0.5),  # Huber 7.5 / 3.5 * 0.5 > cap
    (9, "easy", True, 0.0),
    (13, "easy", False, 0.6 * 0.5 * sigmoid(1.5 / 2.0)),
    (5, "easy", False, 0.6 * 0.5 * 0.5),
    # medium: margin 2.5, kappa 3, temperature 2.5, cap 0.5; correct is symmetric in |Δ|.
    (5, "medium", True, -(0.5 * 2.5**2 / 3.0) / (2.5 + 3.0) * 0.5),
    (15, "medium", True, -(0.5 * 2.5**2 / 3.0) / (2.5 + 3.0) * 0.5),
    (15, "medium", False, 0.8 * 0.5 * sigmoid(2.5 / 2.5)),
    (5, "medium", False, 0.8 * 0.5 * 0.5),
    # hard: margin 3.5, kappa 4, temperature 3, cap 0.5 * 1.2 = 0.6.
    (8, "hard", True, 0.6 * sigmoid((-2 + 3.5) / 3.0)),
    (2, "hard", True, -0.5 * (4.5 - 2.0) / (3.5 + 4.0) * 0.6),
    (15, "hard", False, 0.6 * sigmoid(1.5 / 3.0)),
    (2, "hard", False, 0.6 * 0.5),
])
def test_code_entropy_score_by_hand(n_hwe, bucket, correct, expected):
    assert code_entropy_score(n_hwe, 10, bucket, correct, 0.5) == pytest.approx(expected, abs=1e-12)


def test_code_reward_targets_alpha_and_totals():
    reward = CodeEntropyReward()
    n_hwe = [3, 3, 4, 4, 2, 3, 2, 2]
    groups = ["p1", "p1", "p2", "p2", "p3", "p3", "p4", "p4"]
    buckets = ["easy"] * 4 + ["hard"] * 4
    correct = [1, 1, 0, 1, 0, 1, 0, 0]
    out = reward(n_hwe, correct, buckets, groups)
    # easy: prompt means 3 and 4 -> 3.5 -> target round(3.5) = 4; alpha 0.5 + 0.05 * (3.5 - 4).
    # hard: prompt means 2.5 and 2 -> 2.25 -> target 2; alpha 0.5 + 0.05 * (2 - 2.25).
    assert out.targets == {"easy": 4.0, "hard": 2.0}
    assert out.weights["easy"] == pytest.approx(0.475) and out.weights["hard"] == pytest.approx(0.4875)
    assert out.weights["medium"] == 0.5
    assert out.total[0] == pytest.approx(1.0)  # easy, correct, Δ = -1 within the margin
    assert out.total[2] == pytest.approx(0.6 * 0.475 * 0.5)  # easy, incorrect, Δ = 0
    assert out.total[5] == pytest.approx(1.0 + 0.4875 * 1.2 * sigmoid(2.0 / 3.0))  # hard, correct, Δ = 1
    assert out.total[6] == pytest.approx(0.4875 * 1.2 * 0.5)  # hard, incorrect, Δ = 0
    assert out.total == pytest.approx([a + e for a, e in zip(out.accuracy, out.entropy)])
    with pytest.raises(ValueError, match="`buckets` entries must be one of"):
        reward([1], [1], ["trivial"], ["p"])


def test_code_reward_alpha_is_clipped():
    reward = CodeEntropyReward(target_scale={"easy": 0.0, "medium": 1.0, "hard": 1.0}, alpha_lr=1.0)
    reward([50, 50], [1, 1], ["easy", "easy"], ["p", "p"])
    assert reward.targets["easy"] == 0.0 and reward.alpha["easy"] == 2.0  # 0.5 + 50 clipped to 2


def test_paper_reward_by_hand():
    n_hwe = [2, 6, 1, 5, 0, 4, 2]
    correct = [1, 0, 0, 0, 0, 0, 1]
    buckets = ["easy", "easy", "medium", "medium", "hard", "hard", "hard"]
    out = paper_entropy_reward(n_hwe, correct, buckets, lam=0.1)
    assert out.targets == {"easy": 4.0, "medium": 3.0, "hard": 2.0}
    assert out.total == pytest.approx([1.0, -0.2, -0.2, -0.2, -0.2, 0.0, 1.0])
    per = paper_entropy_reward(n_hwe, correct, buckets, lam={"easy": 0.1, "medium": 0.5, "hard": 1.0})
    assert per.total == pytest.approx([1.0, -0.2, -1.0, -1.0, -2.0, 0.0, 1.0])
    # The paper's closed-form λ_d is identically zero: the reward is the accuracy alone.
    as_written = paper_entropy_reward(n_hwe, correct, buckets, lambda_rule="paper")
    assert as_written.weights == {"easy": 0.0, "medium": 0.0, "hard": 0.0}
    assert as_written.total == [float(c) for c in correct]


def test_paper_advantage_bonus_by_hand():
    windows = torch.tensor([[1.0, 2.0, 3.0, float("nan")]])
    hwe = torch.tensor([[False, True, True, False]])
    mask = torch.tensor([[True, True, True, False]])
    plain = paper_advantage_bonus(windows, hwe, 1.5, ["easy"], lam=0.5, mask=mask, baseline="none")
    assert plain[0].tolist() == pytest.approx([0.0, 0.25, 0.75, 0.0])
    centred = paper_advantage_bonus(windows, hwe, 1.5, ["easy"], lam=0.5, mask=mask)
    assert centred[0].tolist() == pytest.approx([-1 / 3, 0.25 - 1 / 3, 0.75 - 1 / 3, 0.0])


# ----------------------------------------------------------------------------------------------------
# KL
# ----------------------------------------------------------------------------------------------------


def test_kl_estimates():
    logp, ref = torch.tensor([0.0]), torch.tensor([0.5])
    assert kl_per_token(logp, ref).item() == pytest.approx(math.exp(0.5) - 1.5)
    assert kl_per_token(logp, ref, "kl").item() == pytest.approx(-0.5)
    assert kl_per_token(logp, ref, "abs").item() == pytest.approx(0.5)
    assert kl_per_token(logp, ref, "mse").item() == pytest.approx(0.125)
    assert kl_per_token(torch.tensor([0.0]), torch.tensor([30.0])).item() == 10.0  # clamped as in the code
    with pytest.raises(ValueError, match="`kind` must be one of"):
        kl_per_token(logp, ref, "k9")


def test_code_kl_controller_updates_by_hand():
    c = CodeKLController(interval=1)
    c.observe(["easy"], [0.02])  # EMA KL 0.02, e = 1, error EMA 0.03
    assert c.beta["easy"] == pytest.approx(math.exp(0.05 * 0.03))
    c.observe(["easy", "easy", "hard"], [0.01, 0.03, 0.0101])
    # easy: bucket mean 0.02, EMA 0.02, e = 1, error EMA 0.03 + 0.97 * 0.03; hard: e = 0.01 < deadzone.
    assert c.error_ema["easy"] == pytest.approx(0.0591)
    assert c.beta["easy"] == pytest.approx(math.exp(0.05 * 0.03 + 0.05 * 0.0591))
    assert c.beta["hard"] == 1.0 and c.error_ema["hard"] == 0.0
    assert c.kl_ema["hard"] == pytest.approx(0.0101) and c.beta["medium"] == 1.0
    c.observe(["hard"], [0.0])  # EMA 0.97 * 0.0101 = 0.009797, e = -0.0203: outside the deadzone
    assert c.kl_ema["hard"] == pytest.approx(0.97 * 0.0101)
    assert c.error_ema["hard"] == pytest.approx(0.03 * (0.97 * 0.0101 / 0.01 - 1))
    assert c.beta["hard"] < 1.0


def test_code_kl_controller_clip_interval_and_bounds():
    c = CodeKLController(interval=1)
    c.observe(["medium"], [1.0])  # e = 99, error EMA 2.97 -> clipped to 0.2
    assert c.beta["medium"] == pytest.approx(math.exp(0.05 * 0.2))
    slow = CodeKLController()  # updates every 100 micro-steps
    for _ in range(99):
        slow.observe(["easy"], [0.02])
    assert slow.beta["easy"] == 1.0 and slow.kl_ema["easy"] == pytest.approx(0.02)
    slow.observe(["easy"], [0.02])
    assert slow.beta["easy"] == pytest.approx(math.exp(0.05 * 0.03))
    capped = CodeKLController(interval=1, beta_max=1.001)
    for _ in range(3):
        capped.observe(["hard"], [1.0])
    assert capped.beta["hard"] == pytest.approx(1.001)
    with pytest.raises(ValueError, match="`interval` must be an int >= 1"):
        CodeKLController(interval=0)


def test_code_kl_second_chance_and_loss_by_hand():
    c = CodeKLController()
    relax = c.relaxation(["easy", "easy", "easy", "hard"], [0, 1, 0, 0], [0.6, 0.9, 0.4, 0.9])
    assert relax.flatten().tolist() == pytest.approx([0.67, 1.0, 1.0, 1.0])
    assert c.relaxation(["easy"], [0], None).item() == 1.0
    c.beta.update(easy=2.0, hard=0.5)
    kl = torch.tensor([[0.1, 0.3, 9.0], [0.2, 0.2, 0.2]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss = c.kl_loss(kl, mask, ["easy", "hard"], [0, 0], [1.0, 0.0], kl_coef=0.01, observe=False)
    # weights: easy 2.0 * 0.67 = 1.34, hard 0.5; token mean over 5 valid tokens.
    assert loss.item() == pytest.approx((0.1 * 1.34 + 0.3 * 1.34 + 3 * 0.2 * 0.5) / 5 * 0.01)
    assert c.steps == 0
    c.kl_loss(kl, mask, ["easy", "hard"], kl_coef=0.01)
    assert c.steps == 1 and c.kl_ema["easy"] == pytest.approx(0.2) and c.kl_ema["hard"] == pytest.approx(0.2)
    seq = c.kl_loss(kl, mask, ["easy", "hard"], kl_coef=1.0, average="seq", observe=False)
    assert seq.item() == pytest.approx((0.2 * 2.0 + 0.2 * 0.5) / 2)


def test_paper_kl_controller_by_hand():
    c = PaperKLController(beta={"easy": 1.0, "medium": 2.0, "hard": 0.5}, rho=0.5, target=0.01, alpha_kappa=0.1)
    kl = torch.tensor([[0.02, 0.04, 0.06, 0.0], [0.01, 0.01, 0.01, 0.01]])
    mask = torch.tensor([[True, True, True, False], [True] * 4])
    hwe = torch.tensor([[False, True, False, False], [True, True, False, False]])
    weights = c.token_weights(["easy", "hard"], hwe)
    assert weights.flatten().tolist() == pytest.approx([1, 0.5, 1, 1, 0.25, 0.25, 0.5, 0.5])
    loss = c.kl_loss(kl, mask, ["easy", "hard"], hwe)
    assert loss.item() == pytest.approx(((0.02 + 0.02 + 0.06) / 3 + (0.005 + 0.01) / 4) / 2)
    ctrl = c.update(kl, mask, ["easy", "hard"], hwe)
    assert ctrl["easy"] == pytest.approx(0.08 / 3) and ctrl["hard"] == pytest.approx(0.005)
    assert c.kappa["easy"] == pytest.approx(1 + 0.1 * (0.08 / 3 / 0.01 - 1))
    assert c.kappa["hard"] == pytest.approx(0.95) and c.kappa["medium"] == 1.0


# ----------------------------------------------------------------------------------------------------
# Adaptive cold start
# ----------------------------------------------------------------------------------------------------


def test_length_target():
    assert length_target(0.25, 1000, 200) == pytest.approx(800)
    assert length_target(0.0, 1000, 200) == 1000 and length_target(1.0, 1000, 200) == 200
    with pytest.raises(ValueError, match=r"`pass_rate` must be in \[0, 1\], got 1.5"):
        length_target(1.5, 1, 2)


def test_cold_start_filter_by_hand():
    lengths = [1000, 900, 1100, 2000, 200, 220, 180, 600, 640, 560, 900]
    rates = [0.0] * 4 + [1.0] * 3 + [0.5] * 4
    sources = ["A"] * 11
    # L(0) = median(1000, 900, 1100, 2000) = 1050, L(1) = 200, L_target(0.5) = 625; within 25% of the
    # target: 900-1100 (not 2000), all three at pass rate 1, 560-640 (not 900).
    kept = cold_start_filter(sources, rates, lengths, tolerance=0.25)
    assert kept == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    two = cold_start_filter(sources, rates, lengths, tolerance=0.25, per_bracket=2, seed=1)
    assert len(two) == 6 and set(two) <= set(kept)
    assert sum(i in (0, 1, 2) for i in two) == sum(i in (4, 5, 6) for i in two) == 2
    with pytest.raises(ValueError, match="source 'B' has no response with pass rate 1"):
        cold_start_filter(["B", "B"], [0.0, 0.5], [10, 5])
