"""Oracles of count-changing reduction before the LLM, for every family and every projector-stage method."""

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.registry import get_method
from tokenreduce.testing.tiny import FAMILIES, IMAGE_TOKEN, VIDEO_TOKEN, default_rows, tiny_batch, tiny_model

from .reference import reduced_rows, reference_generate, reference_logits
from .tables import cases
from .test_selection import reference_reducer

# Every projector-only method on every family that runs it (vision methods: test_vision_stage.py).
CASES = cases("projector", only=True)


def _config(name, budget=0.25):
    return get_method(name).config_cls.at_budget(budget)


def _reference(name, config):
    """The reduction the oracle compares with: the plain reference of ``test_selection.py`` where one is
    written, else the method's own ``reduce`` (covered there by its own step-by-step references)."""
    return reference_reducer(name, config) or get_method(name).method_cls(config)


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in FAMILIES}


@pytest.mark.parametrize("method, family", CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_forward_equals_reduced_reference_and_rows_alone(models, family, method):
    model = models[family]
    batch = tiny_batch(model, default_rows(family, video=True))
    config = _config(method)
    tr.wrap(model, config)
    try:
        with torch.no_grad():
            out = model(**batch).logits
        stats = tr.stats(model).last
    finally:
        tr.unwrap(model)
    refs = reduced_rows(model, _reference(method, config), batch)
    for r, (emb, pos, _) in enumerate(refs):
        ref = reference_logits(model, emb, pos)
        got = out[r, -ref.shape[0]:]
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4, msg=f"{family}/{method} row {r}")
        # the stats count the reference's visual tokens, out of the row's placeholders
        ids = batch["input_ids"][r]
        placeholders = (ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)
        assert stats[r].visual_tokens_in == int(placeholders.sum())
        assert stats[r].visual_tokens_out == int(placeholders[refs[r][2]].sum())
    # rows of different lengths were left padded to the longest
    assert out.shape[1] == max(ref[0].shape[0] for ref in refs)


@pytest.mark.parametrize("method, family", CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_generate_equals_reduced_reference(models, family, method):
    model = models[family]
    batch = tiny_batch(model, default_rows(family, video=True))
    config = _config(method)
    tr.wrap(model, config)
    try:
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    finally:
        tr.unwrap(model)
    # the returned ids begin with the caller's original prompt
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    refs = reduced_rows(model, _reference(method, config), batch)
    for r, (emb, pos, _) in enumerate(refs):
        expected = reference_generate(model, emb, pos, 8)
        assert out[r, -8:].tolist() == expected.tolist(), f"{family}/{method} row {r}"


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_equals_loss_of_reduced_sequence(models, family):
    model = models[family]
    batch = tiny_batch(model, default_rows(family), labels=True)
    tr.wrap(model, "pool", keep=0.25)
    try:
        with torch.no_grad():
            out = model(**batch)
    finally:
        tr.unwrap(model)
    method = _reference("pool", _config("pool"))
    losses, count = 0.0, 0
    for r, (emb, pos, cols) in enumerate(reduced_rows(model, method, batch)):
        labels = batch["labels"][r, cols]
        logits = reference_logits(model, emb, pos)
        shift = labels[1:]
        valid = shift != -100
        losses += torch.nn.functional.cross_entropy(logits[:-1][valid], shift[valid], reduction="sum")
        count += int(valid.sum())
    torch.testing.assert_close(out.loss, losses / count, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_positions_are_original_rope_index_at_kept_tokens(models, family):
    model = models[family]
    batch = tiny_batch(model, default_rows(family, video=True))
    seen = {}

    def hook(module, args, kwargs):
        seen["position_ids"] = kwargs["position_ids"]

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    tr.wrap(model, "random", keep=0.3, seed=3)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        tr.unwrap(model)
        handle.remove()
    full, _ = model.model.get_rope_index(
        batch["input_ids"], attention_mask=batch["attention_mask"], mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"], video_grid_thw=batch["video_grid_thw"],
    )
    method = _reference("random", get_method("random").config_cls(keep=0.3, seed=3))
    got = seen["position_ids"]
    assert got.shape[0] == 4
    for r, (_, _, cols) in enumerate(reduced_rows(model, method, batch)):
        n = cols.numel()
        assert torch.equal(got[1:, r, -n:], full[:, r, cols])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_renumber_positions_gives_consecutive_positions(models, family):
    model = models[family]
    batch = tiny_batch(model, default_rows(family))
    seen = {}

    def hook(module, args, kwargs):
        seen["position_ids"] = kwargs["position_ids"]

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    config = get_method("pool").config_cls(keep=0.25, renumber_positions=True)
    tr.wrap(model, config)
    try:
        with torch.no_grad():
            out = model(**batch).logits
    finally:
        tr.unwrap(model)
        handle.remove()
    pos = seen["position_ids"]
    rope = pos[1:] if pos.dim() == 3 else pos[None]  # Qwen: [text, t, h, w] axes; the M-RoPE ones
    for r, (emb, ref_pos, _) in enumerate(reduced_rows(model, _reference("pool", config), batch)):
        n = emb.shape[0]
        # every kept token of the row reads its rank: 0 .. n-1 on every axis, and so do the logits
        assert torch.equal(rope[:, r, -n:], torch.arange(n).expand(rope.shape[0], n))
        torch.testing.assert_close(out[r, -n:], reference_logits(model, emb, ref_pos), atol=1e-4, rtol=1e-4)


def test_modalities_option_reduces_only_videos(models):
    model = models["llava_onevision"]
    batch = tiny_batch(model, default_rows("llava_onevision", video=True))
    tr.wrap(model, "pool", keep=0.25, modalities=("video",))
    try:
        with torch.no_grad():
            model(**batch)
        rows = tr.stats(model).last
    finally:
        tr.unwrap(model)
    for row in rows:
        for item in row.items:
            if item.modality == "image":
                assert item.tokens_out == item.tokens_in
            else:
                assert item.tokens_out < item.tokens_in
