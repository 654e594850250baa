"""The handle's checks of what a method returns, and the caller's prompt in ``generate``'s output (issue #36:
mutation testing of the core). Behaviour only, through ``tr.wrap`` and the model's own entry points."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core import registry
from tokenreduce.core.config import MethodConfig
from tokenreduce.core.reduction import ProjectorMethod, Reduction
from tokenreduce.testing.tiny import default_rows, tiny_batch, tiny_model


@pytest.fixture(scope="module")
def llava():
    return tiny_model("llava").eval()


@dataclasses.dataclass
class BadConfig(MethodConfig):
    mistake: str = "outside"


class BadMethod(ProjectorMethod):
    """Returns the reduction its config names (each one wrong)."""

    def reduce(self, features, context):
        n = features.shape[0]
        return {
            "outside": Reduction(sources=torch.tensor([0, n])),
            "negative": Reduction(sources=torch.tensor([-1, 2])),
            "two_dims": Reduction(sources=torch.tensor([[0, 1], [2, 3]])),
            "features": Reduction(sources=torch.tensor([1]), features=features[:2]),
            "empty": Reduction(sources=torch.zeros(0, dtype=torch.long)),
            "last": Reduction(sources=torch.tensor([0, n - 1])),
        }[self.config.mistake]


@pytest.fixture
def bad_method(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(BadConfig, "method", "")
    registry.register_method("bad_probe", config_cls=BadConfig)(BadMethod)


@pytest.mark.parametrize("mistake,message", [
    ("outside", "method 'bad_probe' returned source indices outside [0, {n})"),
    ("negative", "method 'bad_probe' returned source indices outside [0, {n})"),
    ("two_dims", "method 'bad_probe' returned source indices outside [0, {n})"),
    ("features", "method 'bad_probe' returned 2 features for 1 sources"),
])
def test_a_reduction_out_of_bounds_is_refused(llava, bad_method, mistake, message):
    batch = tiny_batch(llava, default_rows("llava", n=1))
    n = int((batch["input_ids"] == llava.config.image_token_id).sum())
    tr.wrap(llava, "bad_probe", mistake=mistake)
    try:
        with pytest.raises(RuntimeError) as err, torch.no_grad():
            llava(**batch)
    finally:
        tr.unwrap(llava)
    assert str(err.value) == message.format(n=n)


@pytest.mark.parametrize("mistake,kept", [("empty", 0), ("last", 2)])
def test_reductions_at_the_bounds_are_accepted(llava, bad_method, mistake, kept):
    batch = tiny_batch(llava, default_rows("llava", n=1))
    tr.wrap(llava, "bad_probe", mistake=mistake)
    try:
        with torch.no_grad():
            llava(**batch)
        (sample,) = tr.stats(llava).last
    finally:
        tr.unwrap(llava)
    assert sample.visual_tokens_out == kept


@pytest.mark.parametrize("dict_output", [False, True])
def test_generate_returns_the_callers_prompt_for_every_returned_sequence(llava, dict_output):
    batch = tiny_batch(llava, default_rows("llava", n=2))
    ids = batch["input_ids"]
    tr.wrap(llava, "pool", keep=0.25)
    try:
        with torch.no_grad():
            out = llava.generate(**batch, max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2,
                                 return_dict_in_generate=dict_output)
    finally:
        tr.unwrap(llava)
    sequences = out.sequences if dict_output else out
    assert sequences.shape == (4, ids.shape[1] + 3)
    expected = [ids[0].tolist(), ids[0].tolist(), ids[1].tolist(), ids[1].tolist()]  # each row's copies together
    assert sequences[:, : ids.shape[1]].tolist() == expected
