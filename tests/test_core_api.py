"""The public entry points (``core/api.py``): each refusal in one exact line, what ``budget=`` sets, the
stats snapshot of ``reset=True``, ``disabled`` and ``from_pretrained``'s options (issue #36: mutation testing
of the core). References are written from the documented behaviour; models are tiny and built once.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core import registry
from tokenreduce.core.api import get_handle
from tokenreduce.core.config import MethodConfig
from tokenreduce.core.registry import method_specs
from tokenreduce.plugins.baselines.fastv import FastVConfig
from tokenreduce.testing.tiny import default_rows, tiny_batch, tiny_model, tiny_processor


@pytest.fixture(scope="module")
def llava():
    return tiny_model("llava").eval()


def test_wrap_refusals_are_exact(llava):
    tr.wrap(llava, "random", keep=0.5)
    try:
        with pytest.raises(ValueError) as err:
            tr.wrap(llava, "pool")
        assert str(err.value) == "model is already wrapped with method 'random'; call tokenreduce.unwrap(model) first"
    finally:
        tr.unwrap(llava)
    with pytest.raises(TypeError) as err:
        tr.wrap(llava, tr.PoolConfig(keep=0.5), keep=0.2, seed=1)
    assert str(err.value) == (
        "options ['keep', 'seed'] were given together with a config object; set them on the config instead")
    for bad, name in ((42, "int"), (None, "NoneType"), (tr.PoolConfig, "type")):
        with pytest.raises(TypeError) as err:
            tr.wrap(llava, bad)
        assert str(err.value) == f"`method` must be a method name or a MethodConfig, or a list of them (a stack), got {name}"
    assert get_handle(llava) is None


@pytest.mark.parametrize("entry", ["unwrap", "disabled", "stats"])
def test_entry_points_on_a_model_not_wrapped(llava, entry):
    with pytest.raises(ValueError) as err:
        if entry == "disabled":
            with tr.disabled(llava):
                pass
        else:
            getattr(tr, entry)(llava)
    assert str(err.value) == f"`{entry}` needs a model wrapped by tokenreduce.wrap; LlavaForConditionalGeneration is not wrapped"


def test_wrap_with_a_config_object_and_with_a_name(llava):
    config = tr.RandomConfig(keep=3, seed=0)
    assert tr.wrap(llava, config) is llava
    try:
        handle = get_handle(llava)
        assert handle.config is config and handle.spec.name == "random" and handle.stats.budget is None
    finally:
        assert tr.unwrap(llava) is llava
    assert get_handle(llava) is None
    tr.wrap(llava, "random", keep=3, seed=0, budget=None)  # budget=None: no budget, the options as given
    try:
        assert get_handle(llava).config == tr.RandomConfig(keep=3, seed=0)
        assert get_handle(llava).stats.budget is None
    finally:
        tr.unwrap(llava)


@pytest.mark.parametrize("layers", [2, 6])
def test_budget_is_stated_over_the_model_depth(layers):
    """``budget=`` goes through the method's ``at_budget`` with the LLM's depth: FastV's K and keep at a
    budget averaged over 2 and over 6 layers differ)."""
    model = tiny_model("llava", num_layers=layers)
    tr.wrap(model, "fastv", budget=0.75, query="text")
    try:
        config = get_handle(model).config
        assert config == FastVConfig.at_budget(0.75, num_layers=layers, query="text")
        # the budget as a layer mean: the first K layers see every token, the rest keep `keep` of them
        assert (config.layer, config.keep) == {2: (1, 0.5), 6: (2, 0.625)}[layers]
        assert (config.layer + (layers - config.layer) * config.keep) / layers == 0.75
        budget = get_handle(model).stats.budget
        assert budget == 0.75 and type(budget) is float
    finally:
        tr.unwrap(model)


def test_budget_given_as_an_int_is_a_float_share(llava):
    tr.wrap(llava, "pool", budget=1)
    try:
        assert get_handle(llava).config.keep == 1.0 and type(get_handle(llava).config.keep) is float
        assert get_handle(llava).stats.budget == 1.0 and type(get_handle(llava).stats.budget) is float
        assert tr.stats(llava).summary() == {"samples": 0}
    finally:
        tr.unwrap(llava)


def test_methods_a_model_does_not_support():
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel(tiny_model("llava").config.vision_config)
    usable = sorted(s.name for s in method_specs() if s.families and "hf_vision_tower" in s.families)
    assert "tome" in usable
    with pytest.raises(TypeError) as err:
        tr.wrap(tower, "pool")
    assert str(err.value) == (
        f"method 'pool' needs a vision-language model; on a bare vision tower ({tr.core.api.get_adapter(tower).describe()}) "
        f"use one of: {', '.join(usable)}")
    tr.wrap(tower, "tome", budget=0.5)  # a tower has no LLM depth to state the budget over
    try:
        assert get_handle(tower).stats.budget == 0.5
    finally:
        tr.unwrap(tower)
    qwen = tiny_model("qwen2_vl")
    with pytest.raises(TypeError) as err:
        tr.wrap(qwen, "prumerge")
    assert str(err.value) == (
        "method 'prumerge' does not support model family 'qwen2_vl'; supported: llava, llava_next, "
        "llava_next_video, llava_onevision")
    assert get_handle(qwen) is None


def test_a_stage_the_family_lacks_is_refused(monkeypatch):
    """Qwen2-VL has no vision stage (its tower merges patches itself): a vision method of every family is
    refused there, naming the stage and the ones the family has."""

    @dataclasses.dataclass
    class TowerConfig(MethodConfig):
        pass

    class TowerProbe:
        """A vision-stage method of every family."""

        stages = ("vision",)

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(TowerConfig, "method", "")
    registry.register_method("tower_probe", config_cls=TowerConfig)(TowerProbe)
    qwen = tiny_model("qwen2_vl")
    with pytest.raises(TypeError) as err:
        tr.wrap(qwen, "tower_probe")
    assert str(err.value) == (
        "method 'tower_probe' acts in the vision stage, which model family 'qwen2_vl' does not support; "
        "it supports: projector, llm, decode")
    assert get_handle(qwen) is None


def _run(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_stats_reset_returns_a_snapshot(llava):
    batch = tiny_batch(llava, default_rows("llava", n=2))
    tr.wrap(llava, "pool", budget=0.5)
    try:
        _run(llava, batch)
        _run(llava, batch)
        record = tr.stats(llava)
        assert tr.stats(llava) is record and record.calls == 2 and len(record.samples) == 4
        rows = list(record.samples)
        snapshot = tr.stats(llava, reset=True)
        assert snapshot is not record and type(snapshot) is type(record)
        assert snapshot.samples == rows and snapshot.calls == 2 and snapshot.budget == 0.5
        assert [(s.call, s.row) for s in snapshot.last] == [(2, 0), (2, 1)]
        assert record.samples == [] and record.calls == 0 and record.budget == 0.5  # the budget stays
        assert snapshot.summary()["samples"] == 4
        _run(llava, batch)
        assert [(s.call, s.row) for s in tr.stats(llava).samples] == [(1, 0), (1, 1)]
        assert len(snapshot.samples) == 4  # the snapshot is not the record
    finally:
        tr.unwrap(llava)


def test_disabled_runs_the_original_and_records_nothing(llava):
    batch = tiny_batch(llava, default_rows("llava", n=2))
    plain = _run(llava, batch)
    tr.wrap(llava, "pool", keep=0.25)
    try:
        reduced = _run(llava, batch)
        with tr.disabled(llava) as inside:
            assert inside is llava
            original = _run(llava, batch)
        assert tr.stats(llava).calls == 1
        again = _run(llava, batch)  # enabled again after the block
    finally:
        tr.unwrap(llava)
    torch.testing.assert_close(original, plain, atol=0, rtol=0)
    assert reduced.shape[1] < plain.shape[1] and torch.equal(again, reduced)


def test_from_pretrained_options_and_refusals(tmp_path):
    tiny_model("llava").save_pretrained(tmp_path)
    tiny_processor("llava").save_pretrained(tmp_path)
    with pytest.raises(ValueError) as err:
        tr.from_pretrained(str(tmp_path))
    assert str(err.value) == (
        f"`method` is required: {str(tmp_path)!r} holds no tokenreduce_config.json; pass a method name such as 'pool'")
    model, processor = tr.from_pretrained(
        tmp_path, "random", keep=2, seed=5, model_kwargs={"torch_dtype": torch.float64},
        processor_kwargs={"num_additional_image_tokens": 0})
    assert get_handle(model).config == tr.RandomConfig(keep=2, seed=5)
    assert next(model.parameters()).dtype == torch.float64 and processor.num_additional_image_tokens == 0
    tr.PoolConfig(keep=3).save_pretrained(tmp_path)
    model, _ = tr.from_pretrained(tmp_path)
    assert get_handle(model).config == tr.PoolConfig(keep=3)
    model, _ = tr.from_pretrained(tmp_path, "pool", budget=0.5)  # a method given wins over the file
    assert get_handle(model).config == tr.PoolConfig(keep=0.5) and get_handle(model).stats.budget == 0.5
    with pytest.raises(FileNotFoundError, match=r"^model_id_or_dir '': neither a local path that exists nor a hub id"):
        tr.from_pretrained("", "pool")
