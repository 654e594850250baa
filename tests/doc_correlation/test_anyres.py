"""``doc_correlation`` on the anyres families: the foundation's oracles, keep-all, and budgets that follow
the density of real pixel crops through a tiny model's tower."""

import numpy as np
import pytest
import torch

import tokenreduce as tr
from tokenreduce.plugins.doc_correlation.method import DocCorrelationConfig
from tokenreduce.testing.tiny import IMAGE_TOKEN, default_rows, tiny_batch, tiny_model

from ..reference import recorded_reductions, reduced_rows, reference_generate, reference_logits

FAMILIES = ("llava_next", "llava_onevision")
CONFIGS = {
    "sample": dict(keep=0.4, sampling="sample"),
    "adaptive-merge-hidden-topk": dict(merge=True, similarity="hidden", sampling="topk", threshold=0.5),
}


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in FAMILIES}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_oracles(models, family, name):
    """Forward equals the unwrapped model on the reduced sequence; a batch equals its rows alone; generate
    equals greedy decoding of the reduced sequence."""
    model = models[family]
    rows = default_rows(family)
    batch = tiny_batch(model, rows)
    tr.wrap(model, DocCorrelationConfig(shallow_layer=0, deep_layer=-1, **CONFIGS[name]))
    try:
        with torch.no_grad():
            logits = model(**batch).logits
        recorded = recorded_reductions(model)
        stats = tr.stats(model).last
        with torch.no_grad():
            tokens = model.generate(**batch, max_new_tokens=5, do_sample=False)
            alone = [model(**tiny_batch(model, rows[r : r + 1])).logits[0] for r in range(len(rows))]
    finally:
        tr.unwrap(model)
    assert sum(s.visual_tokens_out for s in stats) < sum(s.visual_tokens_in for s in stats)
    for s in stats:
        crops = s.items[0].info["crops"]
        assert crops[0]["kind"] == "base" and sum(c["kept"] for c in crops) <= s.visual_tokens_out
    for r, (emb, pos, _) in enumerate(reduced_rows(model, None, batch, recorded=recorded)):
        ref = reference_logits(model, emb, pos)
        torch.testing.assert_close(logits[r, -ref.shape[0]:], ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(alone[r], ref, atol=1e-4, rtol=1e-4)
        assert tokens[r, -5:].tolist() == reference_generate(model, emb, pos, 5).tolist()
    assert torch.equal(tokens[:, : batch["input_ids"].shape[1]], batch["input_ids"])


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_equals_unwrapped(models, family):
    model = models[family]
    batch = tiny_batch(model, default_rows(family))
    with torch.no_grad():
        expected = model(**batch).logits
    tr.wrap(model, DocCorrelationConfig.at_budget(1.0, shallow_layer=0, merge=True))
    try:
        with torch.no_grad():
            got = model(**batch).logits
        stats = tr.stats(model).last
    finally:
        tr.unwrap(model)
    assert all(s.visual_tokens_out == s.visual_tokens_in for s in stats)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _glyphs(height, width, rng, cell=7):
    page = np.full((height, width), 1.0)
    for y in range(0, height, cell):
        for x in range(0, width, cell):
            if rng.random() < 0.8:
                page[y : y + cell, x : x + cell][rng.random((cell, cell)) < 0.35] = 0.0
    return page


def _page_inputs(model, layout: str, seed: int):
    """A 1x2 page (base + two crops) whose left crop is one flat colour and right crop is glyphs, as
    anyres pixel values (``flat|text``) or mirrored (``text|flat``)."""
    side = model.config.vision_config.image_size
    rng = np.random.default_rng(seed)
    flat, text = np.full((side, side), 0.9), _glyphs(side, side, rng)
    page = np.concatenate([flat, text] if layout == "flat|text" else [text, flat], axis=1)
    t = torch.tensor(page, dtype=torch.float32)[None].repeat(3, 1, 1) * 2 - 1
    base = torch.nn.functional.interpolate(t[None], size=(side, side), mode="bilinear")[0]
    pixels = torch.stack([base, t[:, :, :side], t[:, :, side:]])[None]
    inputs = {"pixel_values": pixels, "image_sizes": torch.tensor([[side, 2 * side]])}
    feats = model.model.get_image_features(**inputs, return_dict=True).pooler_output
    n = sum(f.reshape(-1, f.shape[-1]).shape[0] for f in feats)
    ids = torch.tensor([[1, 5, *([IMAGE_TOKEN] * n), 6, 7]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **inputs}


@pytest.mark.parametrize("keep", [None, 0.5])
@pytest.mark.parametrize("family", FAMILIES)
def test_budgets_follow_density_of_real_crops(models, family, keep):
    """Through the tower: the flat crop gets the minimum, the glyph crop the most, whichever side it is on.

    The random-weight towers already tell them apart at layer 0 (identical patches give identical keys up
    to the small position embeddings); the trained document model is checked in the benchmark."""
    model = models[family]
    for seed, layout in enumerate(("flat|text", "text|flat")):
        inputs = _page_inputs(model, layout, seed)
        tr.wrap(model, DocCorrelationConfig(keep=keep, shallow_layer=0, deep_layer=-1, min_tokens=1))
        try:
            with torch.no_grad():
                model(**inputs)
            crops = {c["crop"]: c for c in tr.stats(model).last[0].items[0].info["crops"]}
        finally:
            tr.unwrap(model)
        flat, text = (1, 2) if layout == "flat|text" else (2, 1)
        assert crops[flat]["density"] == 0.0 and crops[flat]["budget"] == 1
        assert crops[text]["density"] > 0.5
        # the most tokens among the sub-images, the largest share of all (the thumbnail, half flat, may be
        # larger than a downsampled OneVision crop)
        assert crops[text]["budget"] == max(c["budget"] for c in crops.values() if c["kind"] == "crop") > 1
        assert crops[text]["budget"] / crops[text]["tokens"] == max(c["budget"] / c["tokens"] for c in crops.values())
