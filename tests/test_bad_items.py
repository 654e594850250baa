"""A bad item (NaN / inf pixels) never takes down its batch, for every registered method.

Its row reads what the unwrapped model reads (NaN logits), the other rows are exactly what they are when
the bad row holds good pixels. A method that fails on a bad item has it passed through with a warning; a
method failing on a good item names the row and the item.
"""

import dataclasses

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.config import MethodConfig
from tokenreduce.core.reduction import ProjectorMethod, Reduction
from tokenreduce.core.registry import _METHODS, get_method, method_specs, register_method
from tokenreduce.testing.tiny import default_rows, tiny_batch, tiny_model

from .tables import NEEDS_TRAINED_WEIGHTS, runs_on

IMAGE_METHODS = [
    s.name for s in method_specs() if s.name not in NEEDS_TRAINED_WEIGHTS and "image" in s.modalities and runs_on(s, "llava")
]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llava")


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("method", IMAGE_METHODS)
def test_bad_image_leaves_other_rows_exact(model, method, value):
    batch = tiny_batch(model, default_rows("llava", n=3))
    bad = dict(batch, pixel_values=batch["pixel_values"].clone())
    bad["pixel_values"][1] = value
    plain = _logits(model, bad)
    tr.wrap(model, get_method(method).config_cls.at_budget(0.5, num_layers=4))
    try:
        good = _logits(model, batch)
        got = _logits(model, bad)
    finally:
        tr.unwrap(model)
    for r in (0, 2):
        torch.testing.assert_close(got[r], good[r], atol=0, rtol=0, msg=f"{method} row {r}")
    # the bad row is as broken as in the unwrapped model, no more, no less
    assert bool(got[1].isnan().any()) == bool(plain[1].isnan().any())


@dataclasses.dataclass
class _StrictConfig(MethodConfig):
    """Options of a test method that refuses non-finite features and items of one given size."""

    keep: float = 0.5
    refuse_size: int = -1


class _StrictMethod(ProjectorMethod):
    """Keeps the first half of every item; raises on NaN features (as index-returning kernels do)."""

    def reduce(self, features, context):
        if not torch.isfinite(features).all():
            raise ValueError("features hold NaN or inf values")
        if features.shape[0] == self.config.refuse_size:
            raise ValueError(f"cannot reduce {features.shape[0]} tokens")
        return Reduction.keep(torch.arange(max(1, features.shape[0] // 2)))


@pytest.fixture
def strict():
    register_method("test_strict", config_cls=_StrictConfig, stages="projector")(_StrictMethod)
    yield "test_strict"
    _METHODS.pop("test_strict")


def test_failing_method_passes_bad_item_through_with_warning(model, strict):
    batch = tiny_batch(model, default_rows("llava", n=3))
    bad = dict(batch, pixel_values=batch["pixel_values"].clone())
    bad["pixel_values"][1] = float("nan")
    tr.wrap(model, strict)
    try:
        good = _logits(model, batch)
        with pytest.warns(UserWarning, match=r"image item 1 \(row 1\) holds NaN or inf features"):
            got = _logits(model, bad)
        rows = tr.stats(model).last
    finally:
        tr.unwrap(model)
    assert rows[1].items[0].info["skipped"] == "non-finite features"
    assert rows[1].items[0].tokens_out == rows[1].items[0].tokens_in
    assert rows[0].items[0].tokens_out < rows[0].items[0].tokens_in
    assert got[1].isnan().any()
    # the bad row is longer (unreduced): the good rows are compared at their own columns
    for r in (0, 2):
        n = int(batch["attention_mask"][r].sum()) - rows[r].items[0].tokens_in + rows[r].items[0].tokens_out
        torch.testing.assert_close(got[r, -n:], good[r, -n:], atol=1e-5, rtol=1e-5)


def test_method_failing_on_a_good_item_names_row_and_item(model, strict):
    batch = tiny_batch(model, default_rows("llava", n=3))
    tokens = int((batch["input_ids"][0] == model.config.image_token_index).sum())
    tr.wrap(model, strict, refuse_size=tokens)
    try:
        with pytest.raises(RuntimeError, match=r"^method 'test_strict' failed on image item 0 \(row 0\): cannot reduce"):
            _logits(model, batch)
    finally:
        tr.unwrap(model)
