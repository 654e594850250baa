"""Stacks: several methods in one wrap (API, errors, budgets, stats, round trips)."""

import copy
import pickle

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.api import get_handle
from tokenreduce.core.stack import StackConfig
from tokenreduce.testing.tiny import default_rows, tiny_batch, tiny_model, tiny_processor


@pytest.fixture(scope="module")
def llava():
    model = tiny_model("llava")
    return model, tiny_batch(model, default_rows("llava"))


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("spelling", [
    [tr.DivPruneConfig(keep=0.5), tr.FastVConfig(layer=2, keep=0.5)],
    [tr.FastVConfig(layer=2, keep=0.5), tr.DivPruneConfig(keep=0.5)],
    "divprune+fastv",
    ["fastv", "divprune"],
], ids=["configs", "configs-out-of-order", "joined", "names"])
def test_spellings_give_one_stack_in_stage_order(llava, spelling):
    model, _ = llava
    options = {} if not isinstance(spelling[0], str) else {"divprune.keep": 0.5, "fastv": {"layer": 2, "keep": 0.5}}
    tr.wrap(model, spelling, **options)
    try:
        handle = get_handle(model)
        assert handle.spec.name == "divprune+fastv"
        assert handle.spec.stages == ("projector", "llm")
        assert handle.config == StackConfig(configs=(tr.DivPruneConfig(keep=0.5), tr.FastVConfig(layer=2, keep=0.5)))
    finally:
        tr.unwrap(model)


def test_unwrap_disabled_and_stats_per_stage(llava):
    model, batch = llava
    original = _logits(model, batch)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    tr.wrap(model, "divprune+fastv", **{"divprune.keep": 0.5, "fastv.keep": 0.5, "fastv.layer": 2})
    try:
        with tr.disabled(model):
            assert torch.equal(_logits(model, batch), original)
        _logits(model, batch)
        stats = tr.stats(model)
        stages = stats.stage_summary()
    finally:
        tr.unwrap(model)
    # 16 visual tokens per row: divprune keeps 8, fastv half of those from layer 2 on
    assert stages["projector"]["tokens_in"] == 16 and stages["projector"]["tokens_out"] == 8
    assert stages["llm"]["tokens_in"] == 8 and stages["llm"]["layers"] == {2: 4.0}
    assert stages["projector"]["reducer_ms"] > 0 and stages["llm"]["reducer_ms"] > 0
    assert stages["prefill_flops_ratio"] == pytest.approx(stats.summary()["prefill_flops_ratio"])
    # four layers: 2 read the 8 kept by divprune, 2 read 4 (the text is left out of the layer-mean share)
    assert stats.summary()["layer_mean_keep_ratio"] == pytest.approx((2 * 8 + 2 * 4) / 4 / 16)
    assert stats.to_dict()["stages"] == stages
    assert "_tokenreduce_handle" not in model.__dict__ and "forward" not in model.__dict__
    assert torch.equal(_logits(model, batch), original)
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())


def test_a_second_wrap_is_still_refused(llava):
    model, _ = llava
    tr.wrap(model, "divprune+fastv")
    try:
        with pytest.raises(ValueError, match="already wrapped with method 'divprune\\+fastv'"):
            tr.wrap(model, "pool")
    finally:
        tr.unwrap(model)


@pytest.mark.parametrize("method, options, error, message", [
    (["divprune", "pool"], {}, ValueError,
     "a stack takes at most one method per stage; methods 'divprune' and 'pool' act in the projector stage"),
    ("visionzip+divprune", {}, ValueError, "methods 'visionzip' and 'divprune' act in the projector stage"),
    ("fastv+fastv", {}, ValueError, "method 'fastv' twice act in the llm stage"),
    ("divprune++fastv", {}, ValueError, "stack 'divprune++fastv' has an empty method name"),
    ("divprune+fastvv", {}, ValueError, "unknown method 'fastvv'"),
    ("divprune+fastv", {"keep": 0.5}, TypeError, "option 'keep' of stack 'divprune+fastv' must name its method"),
    ("divprune+fastv", {"fastvv.keep": 0.5}, TypeError,
     "option 'fastvv.keep' names method 'fastvv', which is not in stack 'divprune+fastv'; did you mean 'fastv'?"),
    ("divprune+fastv", {"fastv.kep": 0.5}, TypeError, "method 'fastv' got unexpected option(s) 'kep'"),
    ([tr.DivPruneConfig(), "fastv"], {"divprune.keep": 0.5}, TypeError,
     "options were given for method 'divprune', whose config object was given"),
    ([tr.DivPruneConfig(), "fastv"], {"budget": 0.5}, TypeError, "`budget` was given with the config object"),
    ("divprune+fastv", {"budget": 1.5}, ValueError, "`budget` must be in (0.0, 1.0], got 1.5"),
    ([], {}, ValueError, "a stack needs at least one method"),
    ([3], {}, TypeError, "a stack's entries must be method names or method configs, got int"),
])
def test_stack_errors_are_one_line(llava, method, options, error, message):
    model, _ = llava
    with pytest.raises(error) as info:
        tr.wrap(model, method, **options)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert get_handle(model) is None


def test_a_member_the_family_does_not_run_is_named_with_the_family():
    model = tiny_model("qwen2_vl")
    with pytest.raises(TypeError, match=r"^method 'visionzip' \(in stack 'visionzip\+fastv'\) does not support model "
                                        r"family 'qwen2_vl'"):
        tr.wrap(model, "visionzip+fastv")
    assert get_handle(model) is None


def test_a_list_of_one_is_that_method(llava):
    model, _ = llava
    tr.wrap(model, ["pool"], **{"pool.keep": 0.25})
    try:
        assert get_handle(model).config == tr.PoolConfig(keep=0.25)
    finally:
        tr.unwrap(model)


def test_stack_config_validates():
    with pytest.raises(ValueError, match="at least 2 method configs, got 1"):
        StackConfig(configs=(tr.PoolConfig(),))
    with pytest.raises(ValueError, match="set on its methods' configs"):
        StackConfig(configs=(tr.PoolConfig(), tr.FastVConfig()), renumber_positions=True)
    with pytest.raises(TypeError, match="needs its methods"):
        StackConfig.at_budget(0.25)


@pytest.mark.parametrize("budget", [0.25, 0.5, 0.7])
def test_budget_splits_in_equal_factors(budget):
    """Each token-reducing member runs at budget ** (1/n) through its own at_budget; the decode member
    takes none. The layer-mean shares multiply back to the budget."""
    model = tiny_model("llava")
    layers = model.config.text_config.num_hidden_layers
    tr.wrap(model, "divprune+fastv+ares", budget=budget)
    try:
        config = get_handle(model).config
    finally:
        tr.unwrap(model)
    share = budget ** 0.5
    assert config.configs[0] == tr.DivPruneConfig.at_budget(share)
    assert config.configs[1] == tr.FastVConfig.at_budget(share, num_layers=layers)
    assert config.configs[2] == tr.AresConfig()
    fastv = config.configs[1]
    fastv_share = (fastv.layer + (layers - fastv.layer) * fastv.keep) / layers
    assert config.configs[0].keep * fastv_share == pytest.approx(budget)


def test_budget_achieved_by_the_stack(llava):
    model, batch = llava
    tr.wrap(model, "divprune+fastv", budget=0.25)
    try:
        _logits(model, batch)
        summary = tr.stats(model).summary()
    finally:
        tr.unwrap(model)
    assert summary["budget"] == 0.25 and not summary["budget_missed"]
    # 16 tokens: divprune keeps 8; fastv from layer 1 keeps ceil(8 / 3) = 3 in 3 of the 4 layers
    assert summary["layer_mean_keep_ratio"] == pytest.approx((8 + 3 * 3) / 4 / 16)


def test_config_round_trips_through_json_and_from_pretrained(tmp_path):
    stack = StackConfig(configs=(tr.RandomConfig(keep=0.5, seed=3), tr.FastVConfig(layer=1, keep=3), tr.AresConfig()))
    assert tr.MethodConfig.from_dict(stack.to_dict()) == stack
    tiny_model("llava").save_pretrained(tmp_path)
    tiny_processor("llava").save_pretrained(tmp_path)
    stack.save_pretrained(tmp_path)
    assert '"stack"' in (tmp_path / "tokenreduce_config.json").read_text()
    model, _ = tr.from_pretrained(tmp_path)
    assert get_handle(model).config == stack
    assert get_handle(model).spec.stages == ("projector", "llm", "decode")


def test_copies_and_pickles_keep_the_stack(llava):
    _, batch = llava
    model = tiny_model("llava")  # never run: a run leaves transformers' output-capturing hooks, which do not pickle
    tr.wrap(model, "random+fastv", **{"random.seed": 1, "random.keep": 0.5})
    clones = (copy.deepcopy(model), pickle.loads(pickle.dumps(model)))
    expected = _logits(model, batch)
    for clone in clones:
        assert get_handle(clone).config == get_handle(model).config
        torch.testing.assert_close(_logits(clone, batch), expected)


def test_vision_only_then_projector_composes_sources(llava):
    """ToMe merges inside the tower, DivPrune then reduces its output: the item's sources are ToMe's sources
    at DivPrune's choice, and the stats split the two stages."""
    model, batch = llava
    tr.wrap(model, "tome+divprune", **{"divprune.keep": 0.5})
    try:
        _logits(model, batch)
        items = get_handle(model).last_batch.items
        stages = tr.stats(model).stage_summary()
    finally:
        tr.unwrap(model)
    for item in items:
        info = item.reduction.info["projector_stage"]
        assert info["method"] == "divprune"
        assert item.reduction.num_tokens == -(-info["tokens_in"] // 2)
        assert item.reduction.sources.unique().numel() == item.reduction.num_tokens
    assert stages["vision"]["tokens_out"] == stages["projector"]["tokens_in"] < stages["vision"]["tokens_in"]


def test_decode_member_helpers_find_it_in_a_stack(llava):
    from tokenreduce.core.stack import method_in
    from tokenreduce.plugins.ares.generation import difficulty_labels

    model, _ = llava
    tr.wrap(model, "divprune+ares")
    try:
        ares = method_in(get_handle(model), "decode")
        with difficulty_labels(model, ["easy", None, "hard"]):
            assert ares.labels == ["easy", None, "hard"]
        assert ares.labels is None
        assert method_in(get_handle(model), "llm") is None
    finally:
        tr.unwrap(model)
