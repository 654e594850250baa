"""``copy.deepcopy`` and ``torch.save`` / pickle of a wrapped model give an independent wrapped model.

The copy has its own handle, stats and parameters, runs its own weights, and unwrapping either model
restores that one only; a saved wrapped model loads wrapped with the same method and gives the same outputs.
"""

import copy
import io
import pickle

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.api import get_handle
from tokenreduce.core.registry import get_method, method_specs
from tokenreduce.testing.tiny import FAMILIES, default_rows, tiny_batch, tiny_model

from .tables import NEEDS_TRAINED_WEIGHTS, runs_on

# Every registered method on LLaVA (the family every method supports), two stages on every family.
CASES = [(s.name, "llava") for s in method_specs() if s.name not in NEEDS_TRAINED_WEIGHTS and runs_on(s, "llava")]
CASES += [(m, f) for f in FAMILIES if f != "llava" for m in ("pool", "fastv")]


def _config(name):
    spec = get_method(name)
    return spec.config_cls.at_budget(1.0 if spec.stages == ("decode",) else 0.5, num_layers=4)


def _fresh(family):
    """A wrapped-to-be model that has never run (transformers installs unpicklable output-capturing hooks
    on a model's first forward, wrapped or not) and a batch built with a twin of it."""
    return tiny_model(family), tiny_batch(tiny_model(family), default_rows(family, n=2, video=True))


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("method,family", CASES)
def test_deepcopy_is_an_independent_wrapped_model(method, family):
    model, batch = _fresh(family)
    tr.wrap(model, _config(method))
    clone = copy.deepcopy(model)
    handle, clone_handle = get_handle(model), get_handle(clone)
    assert clone_handle is not handle and clone_handle.model is clone
    assert clone_handle.config == handle.config and clone_handle.config is not handle.config
    assert all(a is not b for a, b in zip(model.parameters(), clone.parameters()))
    reference = _logits(model, batch)
    torch.testing.assert_close(_logits(clone, batch), reference, atol=0, rtol=0)
    # the copy's stats are its own
    calls, clone_calls = tr.stats(model).calls, tr.stats(clone).calls
    _logits(clone, batch)
    assert tr.stats(model).calls == calls and tr.stats(clone).calls == clone_calls + 1
    # the copy runs its own weights
    with torch.no_grad():
        clone.lm_head.weight.mul_(2)
    torch.testing.assert_close(_logits(model, batch), reference, atol=0, rtol=0)
    assert not torch.allclose(_logits(clone, batch), reference)
    # unwrapping the copy restores the copy only
    tr.unwrap(clone)
    assert get_handle(clone) is None and "forward" not in clone.__dict__ and get_handle(model) is handle
    torch.testing.assert_close(_logits(model, batch), reference, atol=0, rtol=0)
    tr.unwrap(model)
    assert "forward" not in model.__dict__ and "__getstate__" not in model.__dict__


@pytest.mark.parametrize("method,family", CASES)
def test_saved_wrapped_model_loads_wrapped(method, family):
    model, batch = _fresh(family)
    tr.wrap(model, _config(method))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert get_handle(loaded) is not None and get_handle(loaded).config == get_handle(model).config
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), atol=0, rtol=0)
    assert tr.stats(loaded).calls == 1
    # the unwrapped model holds nothing of tokenreduce once the loaded one is unwrapped
    tr.unwrap(loaded)
    bare, _ = _fresh(family)
    bare.load_state_dict(model.state_dict())
    torch.testing.assert_close(_logits(loaded, batch), _logits(bare, batch), atol=0, rtol=0)
    tr.unwrap(model)


def test_pickle_keeps_the_wrapping_switch_and_original_stays_wrapped():
    model, batch = _fresh("qwen2_5_vl")
    tr.wrap(model, "pool", keep=0.25)
    get_handle(model).enabled = False
    loaded = pickle.loads(pickle.dumps(model))
    assert get_handle(loaded).enabled is False
    assert get_handle(model) is not None and model.__dict__["forward"] is not None
    get_handle(model).enabled = True
    with tr.disabled(model):
        torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), atol=0, rtol=0)
