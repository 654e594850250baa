"""The ``docowl`` adapter on a tiny mPLUG-DocOwl 1.5 stand-in loaded with ``trust_remote_code``.

References are assembled here, token by token, from the unwrapped model's own ``encode_images`` and its
LLaMA called directly with ``inputs_embeds`` / ``modality_indicators`` / ``position_ids``: nothing goes
through the adapter's input expansion or the core's rebuilding.
"""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import tokenreduce as tr
from tokenreduce.adapters import get_adapter
from tokenreduce.adapters.docowl import DocOwlAdapter, MplugOwlTower
from tokenreduce.core.api import get_handle
from tokenreduce.eval.overlay import layout_from_dict, layout_to_dict, render_item, token_boxes
from tokenreduce.plugins.doc_correlation.method import DocCorrelationConfig

from ..reference import recorded_reductions
from ..tables import methods
from .docowl_tiny import CROP, docowl_batch, page_inputs, prompt_ids, save_remote_code_dir, tiny_docowl
from .mplug_docowl.modeling_mplug_docowl import IMAGE_TOKEN_INDEX

PAGES = [((1, 2), 0), ((2, 2), 1), ((1, 1), 2)]
PER_CROP = 17  # 8 x 2 H-Reducer tokens + vit_eos


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = save_remote_code_dir(tiny_docowl(), tmp_path_factory.mktemp("docowl"))
    loaded = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    loaded.generation_config.pad_token_id = 0
    loaded.generation_config.eos_token_id = None
    assert type(loaded).__name__ == "MPLUGDocOwlLlamaForCausalLM" and "transformers_modules" in type(loaded).__module__
    return loaded


def _reduced_rows(model, batch, recorded):
    """Per row: (embeddings, modality indicators, positions) of the reduced sequence."""
    with torch.no_grad():
        crops = model.encode_images(batch["images"], batch["patch_positions"])  # [C, 17, D]
    embed = model.model.embed_tokens
    rows, crop, item = [], 0, 0
    for r in range(batch["input_ids"].shape[0]):
        ids, mask = batch["input_ids"][r], batch["attention_mask"][r]
        pieces = []  # (embedding, is_visual, position)
        position = 0
        image_tokens, image_positions = [], []
        for t, m in zip(ids.tolist(), mask.tolist()):
            if not m:
                continue
            if t == IMAGE_TOKEN_INDEX:
                image_tokens.append(crops[crop])
                image_positions.extend(range(position, position + PER_CROP))
                position += PER_CROP
                crop += 1
                pieces.append(("image", None))
            else:
                pieces.append(("text", (embed(torch.tensor([t]))[0].detach(), position)))
                position += 1
        red = recorded["image"][item]
        item += 1
        flat = torch.cat(image_tokens)
        out = red.output_features(flat)
        visual = [(out[k], image_positions[int(s)]) for k, s in enumerate(red.sources)]
        emb, mod, pos, placed = [], [], [], False
        for kind, value in pieces:
            if kind == "text":
                emb.append(value[0])
                mod.append(0)
                pos.append(value[1])
                continue
            if placed:
                continue
            placed = True
            # the image's kept tokens sit at their original places: between the texts around its crops
            for e, p in visual:
                emb.append(e)
                mod.append(1)
                pos.append(p)
        order = sorted(range(len(pos)), key=lambda i: (pos[i], i))
        rows.append((torch.stack([emb[i] for i in order]), torch.tensor([mod[i] for i in order]),
                     torch.tensor([pos[i] for i in order])))
    return rows


def _reference_logits(model, emb, mod, pos):
    with torch.no_grad():
        hidden = model.model(inputs_embeds=emb[None], modality_indicators=mod[None], position_ids=pos[None],
                             attention_mask=torch.ones(1, emb.shape[0], dtype=torch.long), use_cache=False)
        return model.lm_head(hidden.last_hidden_state)[0]


def _reference_generate(model, emb, mod, pos, steps):
    from transformers.cache_utils import DynamicCache

    cache, out = DynamicCache(), []
    with torch.no_grad():
        h = model.model(inputs_embeds=emb[None], modality_indicators=mod[None], position_ids=pos[None],
                        attention_mask=torch.ones(1, emb.shape[0], dtype=torch.long), cache=cache, use_cache=True)
        nxt = int(model.lm_head(h.last_hidden_state)[0, -1].argmax())
        last, length = int(pos.max()), emb.shape[0]
        for step in range(steps):
            out.append(nxt)
            if step == steps - 1:
                break
            length += 1
            h = model.model(input_ids=torch.tensor([[nxt]]), modality_indicators=torch.zeros(1, 1, dtype=torch.long),
                            position_ids=torch.tensor([[last + 1 + step]]), cache=cache, use_cache=True,
                            attention_mask=torch.ones(1, length, dtype=torch.long))
            nxt = int(model.lm_head(h.last_hidden_state)[0, -1].argmax())
    return out


@pytest.mark.parametrize("options", [dict(keep=0.35, threshold=0.5),
                                     dict(merge=True, sampling="topk", similarity="hidden", threshold=0.3)],
                         ids=["global-sample", "adaptive-merge"])
def test_oracles_through_remote_code(model, options):
    batch = docowl_batch(PAGES)
    tr.wrap(model, DocCorrelationConfig(shallow_layer=0, deep_layer=-1, **options))
    try:
        assert isinstance(get_adapter(model), DocOwlAdapter)
        with torch.no_grad():
            logits = model(**batch).logits
        recorded = recorded_reductions(model)
        stats = tr.stats(model).last
        with torch.no_grad():
            tokens = model.generate(**batch, max_new_tokens=5, do_sample=False)
            alone = [model(**docowl_batch([p])).logits[0] for p in PAGES]
    finally:
        tr.unwrap(model)
    for s, (grid, _) in zip(stats, PAGES):
        crops = s.items[0].info["crops"]
        assert [c["kind"] for c in crops] == ["base"] + ["crop"] * (grid[0] * grid[1])
        assert s.visual_tokens_in == PER_CROP * len(crops) and s.visual_tokens_out < s.visual_tokens_in
    for r, (emb, mod, pos) in enumerate(_reduced_rows(model, batch, recorded)):
        ref = _reference_logits(model, emb, mod, pos)
        torch.testing.assert_close(logits[r, -ref.shape[0]:], ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(alone[r], ref, atol=1e-4, rtol=1e-4)
        assert tokens[r, -5:].tolist() == _reference_generate(model, emb, mod, pos, 5)
    assert torch.equal(tokens[:, : batch["input_ids"].shape[1]], batch["input_ids"])


def test_keep_all_equals_unwrapped_and_unwrap_restores(model):
    batch = docowl_batch(PAGES)
    one = docowl_batch(PAGES[1:2])
    with torch.no_grad():
        expected = model(**batch).logits
        expected_tokens = model.generate(**one, max_new_tokens=4, do_sample=False)
    tr.wrap(model, DocCorrelationConfig.at_budget(1.0))
    try:
        with torch.no_grad():
            got = model(**batch).logits
            tokens = model.generate(**one, max_new_tokens=4, do_sample=False)
    finally:
        tr.unwrap(model)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, expected_tokens)
    assert "prepare_inputs_labels_for_multimodal" not in model.__dict__ and "forward" not in model.__dict__
    assert not model.model._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected)


def test_in_llm_methods_are_refused(model):
    with pytest.raises(TypeError, match="method 'fastv' acts in the llm stage, which model family 'docowl' does not "
                                        "support; it supports: vision, projector, decode"):
        tr.wrap(model, "fastv", keep=0.5)
    assert get_handle(model) is None and "forward" not in model.__dict__


def test_projector_baselines_run_on_docowl(model):
    batch = docowl_batch(PAGES[:2])
    for method in ("pool", "random"):
        tr.wrap(model, method, keep=0.3)
        try:
            with torch.no_grad():
                model.generate(**batch, max_new_tokens=2, do_sample=False)
            stats = tr.stats(model).last
        finally:
            tr.unwrap(model)
        assert all(s.visual_tokens_out < s.visual_tokens_in for s in stats)


@pytest.mark.parametrize("method", methods("decode"))
def test_decode_methods_run_on_docowl(model, method):
    """The adapter declares the decode stage: a decode method's generate (greedy) equals the plain model's
    generate given the method's own hooks, its prompt unchanged."""
    batch = docowl_batch(PAGES[:2])
    kwargs = dict(max_new_tokens=4, do_sample=False)
    tr.wrap(model, method)
    try:
        with torch.no_grad():
            wrapped = model.generate(**batch, **kwargs)
        handle = get_handle(model)
        with tr.disabled(model), torch.no_grad():
            hooks = handle.method.generation_hooks(handle, dict(batch, **kwargs))
            reference = model.generate(**batch, **kwargs, logits_processor=hooks.get("logits_processor", []))
    finally:
        tr.unwrap(model)
    assert wrapped.tolist() == reference.tolist()
    assert torch.equal(wrapped[:, : batch["input_ids"].shape[1]], batch["input_ids"])


def test_crop_table_tells_images_apart():
    adapter = DocOwlAdapter.__new__(DocOwlAdapter)
    pos = torch.tensor([[9, 9], [0, 0], [0, 1], [9, 9], [0, 0], [9, 9], [0, 0], [1, 0]])
    groups, is_global = adapter.crop_table({"patch_positions": pos}, 8)
    assert groups == [[0, 1, 2], [3, 4], [5, 6, 7]] and is_global == [True, False, False, True, False, True, False, False]
    no_global = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1], [0, 0], [0, 0], [0, 1]])
    groups, is_global = adapter.crop_table({"patch_positions": no_global}, 7)
    assert groups == [[0, 1, 2, 3], [4], [5, 6]] and not any(is_global)
    assert adapter.crop_table({}, 3) == ([[0], [1], [2]], [False] * 3)


def test_layout_segments_and_overlay_boxes(model):
    batch = docowl_batch([((2, 2), 0)])
    layout = get_adapter(model).layouts("image", batch)[0]
    kinds = [(s.kind, s.rows, s.cols, s.crop_index) for s in layout.segments if s.cols]
    assert kinds == [("base", 8, 2, None), *[("crop", 8, 2, (r, c)) for r in range(2) for c in range(2)]]
    assert layout.num_tokens == 5 * PER_CROP and int(layout.is_newline.sum()) == 5
    assert layout_from_dict(layout_to_dict(layout)) == layout
    boxes = token_boxes(layout, (200, 100), "stretch")
    crop_11 = layout.segment_slices()[8]  # the fifth grid segment: cell (1, 1)
    b = boxes[crop_11]
    assert np.nanmin(b[:, 1]) == 50 and np.nanmax(b[:, 3]) == 100 and np.nanmin(b[:, 2]) == 100
    assert np.nanmax(b[:, 4]) == 200 and b[:2, 1:].tolist() == [[50, 100, 75, 112.5], [75, 100, 100, 112.5]]


def test_tower_signals_are_the_eager_attention_pooled_over_each_reducer_window(model):
    images, positions = page_inputs((1, 2), seed=0)
    tr.wrap(model, DocCorrelationConfig(shallow_layer=0, deep_layer=-1))
    try:
        handle = get_handle(model)
        stage = handle.vision_stage
        stage.set_enabled(True)
        with torch.no_grad():
            model.encode_images(images, positions)
        stage.set_enabled(False)
        popped = {layer: c.pop() for layer, c in stage.captures.items()}
        q = {layer: v[0] for layer, v in popped.items()}
        k = {layer: v[1] for layer, v in popped.items()}
        signals = handle.method.tower_signals(q, k, stage.capture.parts.scale, 1)
        adapter = handle.adapter
        layout = adapter.layouts("image", {"images": images, "patch_positions": positions})[0]
        mapped = adapter.token_signals("image", [layout], signals["deep_attention"])[0]
    finally:
        tr.unwrap(model)
    assert isinstance(adapter.tower, MplugOwlTower)
    with torch.no_grad():
        eager = model.model.vision_model(images, output_attentions=True).attentions[-1][:, :, 0, 1:].mean(1)
    torch.testing.assert_close(signals["deep_attention"], eager, atol=1e-5, rtol=1e-4)
    side = CROP // 7
    pooled = eager.reshape(3, side, side // 4, 4).mean(-1).reshape(3, -1)  # 1x4 windows along the width
    expected = torch.cat([torch.cat([pooled[c], torch.tensor([float("nan")])]) for c in range(3)])
    torch.testing.assert_close(mapped, expected, equal_nan=True)


def _glyph_page(seed):
    """A 1x2 page: left crop flat, right crop glyphs; global view of the whole page first."""
    rng = np.random.default_rng(seed)
    flat = np.full((CROP, CROP), 0.9)
    text = np.full((CROP, CROP), 1.0)
    for y in range(0, CROP, 7):
        for x in range(0, CROP, 7):
            if rng.random() < 0.8:
                text[y : y + 7, x : x + 7][rng.random((7, 7)) < 0.35] = 0.0
    page = torch.tensor(np.concatenate([flat, text], axis=1), dtype=torch.float32)[None].repeat(3, 1, 1) * 2 - 1
    whole = torch.nn.functional.interpolate(page[None], size=(CROP, CROP), mode="bicubic")[0]
    images = torch.stack([whole, page[:, :, :CROP], page[:, :, CROP:]])
    ids = torch.tensor([prompt_ids(3, seed=seed)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "images": images,
            "patch_positions": torch.tensor([[9, 9], [0, 0], [0, 1]])}


def test_budgets_follow_density_and_overlay_shows_them(model):
    inputs = _glyph_page(3)
    tr.wrap(model, DocCorrelationConfig(keep=0.4, shallow_layer=0, deep_layer=-1))
    try:
        with torch.no_grad():
            model(**inputs)
        handle = get_handle(model)
        item = handle.last_batch.items[0]
    finally:
        tr.unwrap(model)
    crops = {c["crop"]: c for c in item.reduction.info["crops"]}
    assert crops[1]["density"] == 0.0 and crops[1]["budget"] == 1
    assert crops[2]["budget"] == max(c["budget"] for c in crops.values()) > crops[0]["budget"]
    record = {"layout": layout_to_dict(item.layout), "sources": item.sources.tolist(),
              "assignment": None, "info": item.reduction.info}
    page = ((inputs["images"][1:].permute(0, 2, 3, 1) + 1) * 127.5).clamp(0, 255).byte()
    sheet = render_item(record, image=torch.cat(list(page), dim=1).numpy(), side=112)
    assert sheet.width >= 2 * 112  # the global view and one panel holding both crops


def test_docowl_sub_module_is_refused_naming_the_model_to_wrap():
    """DocOwl's model type (`mplug_docowl`) is found as the VLM around its own language model."""
    model = tiny_docowl()
    sub = model.model
    with pytest.raises(TypeError, match=rf"^cannot wrap {type(sub).__name__}: it is `model` inside {type(model).__name__}"):
        tr.wrap(sub, "pool")
