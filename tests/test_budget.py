"""One budget knob: ``tr.wrap(model, method, budget=)`` for every registered method, with one meaning (the share
of the full visual-token x layer work, in-LLM methods averaged over the decoder layers), reported by
``tr.stats`` beside the achieved layer-mean share and the FLOPs ratio, and flagged when missed by > 10 %."""

from __future__ import annotations

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.api import get_handle
from tokenreduce.core.registry import get_method, method_specs
from tokenreduce.eval.demo import benchmark_checks
from tokenreduce.eval.report import markdown_table
from tokenreduce.testing.tiny import default_rows, tiny_batch, tiny_model

from .tables import NEEDS_TRAINED_WEIGHTS, runs_on

FAMILY_ORDER = ("llava", "llava_onevision", "qwen2_vl", "llava_next", "llava_next_video", "qwen2_5_vl")
LAYERS = 4  # the tiny models' decoder depth


def _first_family(spec) -> str | None:
    return next((f for f in FAMILY_ORDER if runs_on(spec, f)), None)


REGISTRY = [s.name for s in method_specs() if s.name not in NEEDS_TRAINED_WEIGHTS and _first_family(s)]


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tiny_model(family)
        return cache[family]

    return get


@pytest.mark.parametrize("method", REGISTRY)
def test_every_method_takes_budget_as_its_at_budget_at_the_models_depth(method, models):
    """``budget=`` builds exactly ``at_budget(budget, num_layers=<LLM depth>)``, or refuses as it does."""
    spec = get_method(method)
    model = models(_first_family(spec))
    try:
        expected = spec.config_cls.at_budget(0.4, num_layers=LAYERS)
    except Exception as err:  # a method that cannot take this budget (ares keeps every visual token)
        with pytest.raises(type(err), match="budget"):
            tr.wrap(model, method, budget=0.4)
        assert get_handle(model) is None
        return
    tr.wrap(model, method, budget=0.4)
    try:
        assert get_handle(model).config == expected
        assert tr.stats(model).budget == 0.4
    finally:
        tr.unwrap(model)


def test_budget_and_native_options_together(models):
    model = models("llava")
    tr.wrap(model, "pdrop", budget=0.3, query="text")
    try:
        assert get_handle(model).config == get_method("pdrop").config_cls.at_budget(0.3, num_layers=LAYERS, query="text")
    finally:
        tr.unwrap(model)
    with pytest.raises(TypeError, match="`budget` sets `keep` of method 'pool'; give `budget` or `keep`, not both"):
        tr.wrap(model, "pool", budget=0.3, keep=0.5)
    with pytest.raises(TypeError, match=r"got unexpected option\(s\) 'colour'; accepted options: .*, or `budget` \("):
        tr.wrap(model, "visionzip", colour="red")
    tr.wrap(model, "visionzip", budget=0.25)  # the TypeError: visionzip has no `keep`
    try:
        config = get_handle(model).config
        assert config.dominant + config.contextual == pytest.approx(0.25)
    finally:
        tr.unwrap(model)


def _run(model, method, budget):
    batch = tiny_batch(model, default_rows("llava"))
    tr.wrap(model, method, budget=budget)
    try:
        with torch.no_grad():
            model(**batch)
        return tr.stats(model), batch
    finally:
        tr.unwrap(model)


def test_stats_report_the_budget_the_layer_mean_and_the_flops_ratio(models):
    """random at 40 % of LLaVA's 16 patches keeps ceil(6.4) = 7 on every image: 43.75 %, within 10 % of 40 %."""
    stats, _ = _run(models("llava"), "random", 0.4)
    summary = stats.summary()
    assert summary["budget"] == 0.4 and summary["layer_mean_keep_ratio"] == pytest.approx(7 / 16)
    assert summary["budget_missed"] is False
    text = repr(stats)
    assert "budget                40.0% asked, 43.8% achieved (layer mean): within 10%" in text
    assert "layer mean            7.0 (43.8%)" in text and "MISSED" not in text
    assert f"prefill FLOPs ratio   {summary['prefill_flops_ratio']:.3f}" in text


def test_a_missed_budget_is_flagged(models):
    """ToMe merges at most half of the tokens per block; LLaVA's tiny tower merges in one block (up to its
    feature layer), so 10 % of 16 patches lands on 8 tokens: 50 %."""
    stats, _ = _run(models("llava"), "tome", 0.1)
    summary = stats.summary()
    assert summary["layer_mean_keep_ratio"] == pytest.approx(0.5)
    assert summary["budget_missed"] is True
    assert "10.0% asked, 50.0% achieved (layer mean): MISSED by more than 10%" in repr(stats)


def test_in_llm_budgets_are_layer_means(models):
    """fastv at 40 %: at_budget places layer K and the kept share so that the mean over the 4 decoder layers
    is 40 % (the issue's FLOPs-ratio confusion: a 25 % keep after K is not a 25 % budget)."""
    model = models("llava")
    stats, _ = _run(model, "fastv", 0.4)
    config = get_method("fastv").config_cls.at_budget(0.4, num_layers=LAYERS)
    kept = stats.samples[0].layers[config.layer] / stats.samples[0].visual_tokens_in
    mean = (config.layer * 1.0 + (LAYERS - config.layer) * kept) / LAYERS
    assert stats.summary()["layer_mean_keep_ratio"] == pytest.approx(mean, abs=1e-6)
    # The printed summary names the layers before and after K with their token counts, and each sample its items.
    first = stats.samples[0]
    n_in, n_kept = first.visual_tokens_in, first.layers[config.layer]
    assert all(s.visual_tokens_in == n_in and s.layers[config.layer] == n_kept for s in stats.samples)
    before = f"0-{config.layer - 1}" if config.layer > 1 else "0"
    assert f"per LLM layer         layers {before}: {n_in}, {config.layer}-{LAYERS - 1}: {n_kept}" in repr(stats)
    assert repr(first).startswith(f"SampleStats(call 1 row 0: image {n_in} -> {n_in}; in the LLM from layer "
                                  f"{config.layer}: {n_kept}; layer mean ")


def test_tables_and_demo_flag_missed_budgets():
    cells = [
        {"model": "m", "method": "tome", "budget": 0.1, "budget_missed": True, "layer_mean_share": 0.5},
        {"model": "m", "method": "pool", "budget": 0.4, "budget_missed": False, "layer_mean_share": 0.4375},
    ]
    for c in cells:
        c.update({k: None for k in ("primary", "agreement_with_none", "visual_tokens_in", "visual_tokens_out",
                                    "visual_tokens_layer_mean", "prefill_flops_ratio", "ttft_ms_median",
                                    "decode_ms_per_token_median", "reducer_ms_median", "peak_memory_bytes_max",
                                    "kv_cache_bytes_mean")}, samples=1, errors=0)
    table = markdown_table({"primary_metric": "accuracy", "cells": cells})
    assert "| m | tome | 0.1 MISSED (50.0% over layers) |" in table
    assert "| m | pool | 0.4 |" in table
    lines = benchmark_checks({"cells": cells})
    assert [line for line in lines if line.startswith("MISS")] == [
        "MISS  m: tome@0.1 averages 50.0% of the visual tokens over the layers (budget 10%, off by more than 10%)"
    ]


def test_langdc_budget_is_its_at_budget():
    """langdc needs a trained captioner to wrap a model; its config takes the budget the same way."""
    from tokenreduce.core.config import config_at_budget

    spec = get_method("langdc")
    assert config_at_budget("langdc", 0.4, LAYERS) == spec.config_cls.at_budget(0.4, num_layers=LAYERS)
