"""A short GRPO run with TRL on a tiny local causal LM, with the ARES reward and per-bucket KL wired in."""

import pytest

from tokenreduce.plugins.ares import BUCKETS
from tokenreduce.plugins.ares.training import code_entropy_score, difficulty_buckets


def test_grpo_run_with_ares_reward_and_dynamic_kl(tmp_path):
    pytest.importorskip("trl")
    from research.ares.toy import run_grpo

    result = run_grpo(tmp_path, steps=3, variant="code")
    assert result["steps"] == 3
    logs = [h for h in result["log_history"] if "loss" in h]
    assert len(logs) == 3
    assert all("ares/n_hwe" in h and "kl" in h and "ares/beta_easy" in h for h in logs)
    assert logs[0]["kl"] == 0.0  # the policy starts as the reference
    assert any(h["kl"] > 0 for h in logs[1:])
    assert result["parameter_change"] > 0

    # The controller saw one micro-batch per step; buckets it saw moved their β (updates every step in this
    # run), the others kept the initial 1.0.
    kl = result["kl"]
    assert kl["steps"] == 3
    seen = {b for b, v in kl["kl_ema"].items() if v is not None}
    assert seen
    for b in BUCKETS:
        assert (kl["beta"][b] != 1.0) == (b in seen)

    # The last batch's rewards follow the released code's formula with its buckets, targets and α_d.
    last = result["last_batch"]
    assert last["buckets"] == difficulty_buckets(last["correct"], last["groups"], "code")
    for n, c, b, score in zip(last["n_hwe"], last["correct"], last["buckets"], last["entropy_score"]):
        assert score == pytest.approx(code_entropy_score(n, last["targets"][b], b, c > 0.5, last["weights"][b]))


def test_grpo_run_with_the_paper_reward(tmp_path):
    pytest.importorskip("trl")
    from research.ares.toy import run_grpo
    from tokenreduce.plugins.ares.training import shaping

    result = run_grpo(tmp_path, steps=2, variant="paper")
    assert result["steps"] == 2 and result["kl"]["steps"] == 2
    last = result["last_batch"]
    assert last["buckets"] == difficulty_buckets(last["correct"], last["groups"], "paper")
    for n, c, b, score in zip(last["n_hwe"], last["correct"], last["buckets"], last["entropy_score"]):
        expected = -(1.0 - (c > 0.5)) * last["weights"][b] * shaping(n - last["targets"][b], b)
        assert score == pytest.approx(expected)
