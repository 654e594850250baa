"""The training script's invariants: it trains on exactly what inference feeds the model."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from research.synthetic.train import (
    IGNORE,
    PLANS,
    TASKS,
    Phase,
    Question,
    curriculum_keeps,
    document_patch_labels,
    dropped_distractors,
    language_pools,
    lm_forward,
    make_batch,
    object_patch_labels,
    tower_features,
    train_language,
    train_phases,
)
from tokenreduce.eval.synthetic import build_processor, build_tokenizer, encode, load_synthetic
from tokenreduce.eval.synthetic.benchmark import generate
from tokenreduce.eval.synthetic.models import build_model
from tokenreduce.eval.synthetic.vocab import COLOUR_NAMES, SHAPES


@pytest.mark.parametrize("kind", list(TASKS))
def test_cached_feature_path_equals_the_model_encoder(kind):
    model = build_model(kind).eval()
    task = TASKS[kind](build_tokenizer())
    sample = load_synthetic(kind, "validation", 1)[0]
    inputs = encode(sample, build_processor(kind))
    with torch.no_grad():
        if kind == "video":
            ref = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output[0]
            units = inputs["pixel_values_videos"][0]
        elif kind == "document":
            ref = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
            units = inputs["pixel_values"][0]
        else:
            ref = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0]
            units = inputs["pixel_values"]
        mine = task.pack(model, tower_features(model, units)[None] if kind != "image" else tower_features(model, units))
    torch.testing.assert_close(mine[0], ref.reshape(mine[0].shape), atol=1e-5, rtol=1e-5)
    # The training pool's pixels are the processor's.
    media, questions = task.media_and_questions(0, "validation", np.random.default_rng(0), extra=False)
    torch.testing.assert_close(task.tower_pixels(media), units, atol=1e-2, rtol=0)
    _ids, _answer, aux, category, focus = questions[0]
    assert focus is None or (focus.shape == aux.shape and focus[aux > 0].all())
    assert category == sample.meta["category"] and aux.shape == (ref.reshape(-1, ref.shape[-1]).shape[0],)
    assert aux.max() >= 1  # the referent covers some visual tokens


@pytest.mark.parametrize("kind", list(TASKS))
def test_training_sequences_are_the_inference_prompt_plus_answer(kind):
    tokenizer = build_tokenizer()
    task = TASKS[kind](tokenizer)
    processor = build_processor(kind)
    sample = load_synthetic(kind, "validation", 1)[0]
    inputs = encode(sample, processor)
    placeholder = processor.tokenizer.convert_tokens_to_ids("<video>" if kind == "video" else "<image>")
    n_visual = int((inputs["input_ids"] == placeholder).sum())
    q = Question(0, task.ids(sample.question), task.word(sample.answer), np.zeros(n_visual, np.int8), "x")
    prefix = tokenizer(" answer :", add_special_tokens=False)["input_ids"]
    ids, mask, target, aux, positions = make_batch([q, q], placeholder, n_visual, prefix, tokenizer.eos_token_id,
                                                   tokenizer.pad_token_id)
    assert torch.equal(ids[0, : inputs["input_ids"].shape[1]], inputs["input_ids"][0])
    assert ids.shape[1] == inputs["input_ids"].shape[1] + 1  # the prompt, then the answer token
    assert target[0, -2].item() == q.answer and target[0, -1].item() == tokenizer.eos_token_id
    assert (target[0, :-2] == IGNORE).all()
    assert ((aux[0] != IGNORE) == (ids[0] == placeholder)).all()
    assert mask.all()
    assert torch.equal(positions[0], torch.arange(ids.shape[1]))


def test_curriculum_keeps_every_referent_at_its_original_position():
    tokenizer = build_tokenizer()
    aux = np.zeros(256, np.int8)
    aux[[5, 6, 21, 22]] = 1
    aux[[100, 101]] = 2
    q = Question(0, [1, 7, 8], 9, aux, "colour")
    keeps = curriculum_keeps([q, q], 256, 10, torch.Generator().manual_seed(0))
    for keep in keeps:
        assert set(np.nonzero(aux)[0]) <= set(keep.tolist()) and len(keep) == 16
        assert (np.diff(keep) > 0).all()
    prefix = tokenizer(" answer :", add_special_tokens=False)["input_ids"]
    ids, _mask, _target, sub_aux, positions = make_batch([q, q], 99, 256, prefix, 2, 0, keeps)
    slots = ids[0] == 99
    assert int(slots.sum()) == 16
    assert torch.equal(positions[0, slots], torch.from_numpy(3 + keeps[0]))  # after the 3 question tokens
    assert torch.equal(sub_aux[0, slots], torch.from_numpy(aux[keeps[0]]).long())
    assert positions[0, -1].item() == 3 + 256 + len(prefix)  # text after the image continues the full count
    assert keeps[0].tolist() != keeps[1].tolist()  # each question draws its own distractors


def test_token_drop_shows_a_share_of_the_background_and_draws_nothing_when_off():
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert dropped_distractors(6, 744, 744, 0.0, gen) == [744] * 6
    assert torch.equal(gen.get_state(), state)  # runs without token drop keep their random stream
    counts = dropped_distractors(400, 744, 744, 0.5, gen)
    dropped = [c for c in counts if c < 744]
    assert 150 < len(dropped) < 250 and min(dropped) >= int(0.05 * 744)
    assert max(dropped_distractors(50, 10, 744, 1.0, gen)) <= 10  # never more than the curriculum shows
    aux = np.zeros(744, np.int8)
    aux[[5, 6]] = 1
    q = Question(0, [1, 7], 9, aux, "count")
    keeps = curriculum_keeps([q, q], 744, [0, 744], gen)
    assert keeps[0].tolist() == [5, 6] and len(keeps[1]) == 744


def test_patch_labels_follow_the_pixels():
    _, object_map, objects, _ = generate("image", "validation", 3)
    labels = object_patch_labels(object_map, [o.colour for o in objects], [o.shape for o in objects],
                                 [o.centre for o in objects])
    grid = 224 // 14
    for o in objects:
        cx, cy = o.centre
        patch = int(cy // 14) * grid + int(cx // 14)
        assert labels["centre"][patch] == 1
        assert labels["colour"][patch] == COLOUR_NAMES.index(o.colour) + 1
        assert labels["shape"][patch] in (SHAPES.index(o.shape) + 1, IGNORE)
    assert labels["centre"].sum() == len(objects)
    assert (labels["shape"][labels["colour"] == 0] == IGNORE).all()
    assert labels["row"].reshape(grid, grid)[5, 0] == 5 and labels["col"].reshape(grid, grid)[0, 7] == 7

    _sample, block_map, glyph_map, blocks = generate("document", "validation", 2)
    doc = document_patch_labels(block_map, glyph_map, blocks, 14)
    for block in blocks:
        for g in block.glyphs:
            r, c = g.y0 // 14, g.x0 // 14
            assert doc["glyph"][r, c] == 1 and doc["shape"][r, c] == SHAPES.index(g.shape) + 1
        x0, y0, x1, y1 = block.box
        assert doc["colour"][y0 // 14 : y1 // 14, x0 // 14 : x1 // 14].tolist() == [
            [COLOUR_NAMES.index(block.colour) + 1] * ((x1 - x0) // 14)] * ((y1 - y0) // 14)
    assert (doc["shape"][doc["glyph"] == 0] == IGNORE).all()


def test_video_roles_and_a_focus_that_does_not_tell_the_answer():
    """Roles: initial state 2, final state 1 (order: the first object alone 1, the other 2). The curriculum's
    focus (row + column of each referent, every frame) is the same whatever happens to the object."""
    task = TASKS["video"](build_tokenizer())
    seen = set()
    for index in range(12):
        _media, asked = task.media_and_questions(index, "train", np.random.default_rng(index), extra=True)
        for _ids, _answer, aux, category, focus in asked:
            frames = aux[:-1].reshape(16, 36)
            shown = focus[:-1].reshape(16, 36)
            assert (shown == shown[0]).all() and not focus[-1]  # the same cells in every frame, no newline
            assert shown[frames > 0].all()
            per_frame_1 = (frames == 1).sum(1)
            per_frame_2 = (frames == 2).sum(1)
            if category != "order":
                assert int(shown[0].sum()) == 11  # one row + one column of the 6x6 grid
                # the final state ends the clip, the initial one starts it (when the object is visible then)
                assert not per_frame_1.any() or per_frame_1[-1] > 0
                assert not per_frame_2.any() or per_frame_2[0] > 0
            else:
                first_alone = np.nonzero(per_frame_1)[0]
                assert first_alone.size and per_frame_2[: first_alone.max() + 1].sum() == 0
            seen.add(category)
    assert seen == {"motion", "change", "order", "event"}


def test_readout_attention_equals_eager_attention():
    model = build_model("document").eval()
    placeholder = model.config.image_token_index
    ids = torch.randint(10, 40, (3, 60))
    ids[:, 8:48] = placeholder
    mask = torch.ones_like(ids)
    mask[0, :4], ids[0, :4] = 0, 0  # left padding
    visual = torch.randn(3, 40, model.config.text_config.hidden_size)
    with torch.no_grad():
        hidden, _, attention = lm_forward(model, ids, mask, visual, placeholder, attentions=True)
        language_model = model.model.language_model
        language_model.set_attn_implementation("eager")
        embeds = model.model.get_input_embeddings()(ids).masked_scatter((ids == placeholder)[..., None], visual)
        ref = language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                             output_attentions=True)
    torch.testing.assert_close(attention, ref.attentions[-1][:, :, -2], atol=1e-6, rtol=1e-5)
    valid = mask.bool()
    torch.testing.assert_close(hidden[valid], ref.last_hidden_state[valid], atol=1e-5, rtol=1e-4)


def test_document_focus_is_every_box_whatever_the_question():
    task = TASKS["document"](build_tokenizer())
    _media, asked = task.media_and_questions(0, "train", np.random.default_rng(0), extra=True)
    focuses = [focus for *_rest, focus in asked]
    assert len(focuses) > 1 and all(np.array_equal(f, focuses[0]) for f in focuses)
    assert all(focus[aux > 0].all() for _ids, _answer, aux, _category, focus in asked)


def test_language_model_is_taken_from_a_model_with_the_same_text_sizes(tmp_path):
    from research.synthetic.train import take_language_model
    from tokenreduce.testing.tiny import tiny_model

    donor = build_model("video", seed=1)
    donor.save_pretrained(tmp_path / "video")
    model = build_model("document", seed=2)
    tower = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    take_language_model(model, tmp_path / "video")
    for (name, mine), theirs in zip(model.model.language_model.state_dict().items(),
                                    donor.model.language_model.state_dict().values()):
        assert torch.equal(mine, theirs), name
    assert torch.equal(model.lm_head.weight, donor.lm_head.weight)
    assert all(torch.equal(v, model.model.vision_tower.state_dict()[k]) for k, v in tower.items())

    # the image model's Llama into the video model's Qwen2: the same function (zero q/k/v biases)
    llama = build_model("image", seed=3)
    llama.save_pretrained(tmp_path / "image")
    take_language_model(model, tmp_path / "image")
    embeds = torch.randn(2, 7, model.config.text_config.hidden_size)
    with torch.no_grad():
        ours = model.model.language_model(inputs_embeds=embeds).last_hidden_state
        theirs = llama.model.language_model(inputs_embeds=embeds).last_hidden_state
    torch.testing.assert_close(ours, theirs)
    assert float(model.model.language_model.layers[0].self_attn.q_proj.bias.abs().sum()) == 0
    tiny_model("llava_onevision").save_pretrained(tmp_path / "tiny")
    with pytest.raises(ValueError, match=r"--language-from.*text config differs in \['hidden_size'"):
        take_language_model(model, tmp_path / "tiny")


def test_recipe_phases_continue_on_the_same_pools_and_count_from_the_first():
    plan = replace(PLANS["image"], tower_pool=0, lm_pool=3, questions_per_media=2, val_size=4, lm_steps=2,
                   lm_batch=2, eval_every=1, warmup=1,
                   then=(Phase(2, 1e-3, warmup=1, token_drop=0.5, category_weights={"count": 2.0}),))
    first, second = plan.phases()
    assert (first.lm_steps, first.curriculum, first.then) == (2, plan.curriculum, ())
    assert (second.lm_lr, second.curriculum, second.token_drop, second.category_weights) == (1e-3, 0.0, 0.5,
                                                                                                {"count": 2.0})
    torch.manual_seed(0)
    model = build_model("image")
    model.model.vision_tower.requires_grad_(False)
    task = TASKS["image"](build_tokenizer())
    checkpoints, logged = [], []
    before = model.lm_head.weight.detach().clone()
    summary = train_phases(model, task, [first, second], logged.append, checkpoint=checkpoints.append)
    assert sum("pool:" in line for line in logged) == 2  # train and validation pools built once for both phases
    assert [h["step"] for h in summary["history"]] == [1, 2, 3, 4]
    assert [h["phase"] for h in summary["history"]] == [1, 1, 2, 2]
    assert summary["steps"] == 4 and [p["steps"] for p in summary["phases"]] == [2, 2]
    assert [c["steps"] for c in checkpoints] == [1, 3]  # after every validation but a phase's last
    assert not torch.equal(model.lm_head.weight, before)


def test_grid_loss_reads_each_shown_tokens_place_and_trains_the_projector():
    task = TASKS["image"](build_tokenizer())
    grid = task.visual_grid(256)
    assert grid.shape == (256, 2) and grid[0].tolist() == [-1.0, -1.0]
    torch.testing.assert_close(grid[17], torch.full((2,), -1 + 2 / 15))  # row 1, column 1
    assert task.visual_grid(255) is None and TASKS["video"](build_tokenizer()).visual_grid(576) is None
    plan = replace(PLANS["image"], tower_pool=0, lm_pool=2, questions_per_media=2, val_size=2, lm_steps=2,
                   lm_batch=2, eval_every=2, warmup=1, then=())
    torch.manual_seed(0)
    start = build_model("image")
    start.model.vision_tower.requires_grad_(False)
    pools = language_pools(start, task, plan, lambda _: None)
    projected = []
    for weight in (0.0, 0.0, 5.0):
        model = build_model("image")
        model.load_state_dict(start.state_dict())
        torch.manual_seed(1)
        train_language(model, task, replace(plan, grid_weight=weight), lambda _: None, pools=pools)
        projected.append(model.model.multi_modal_projector.linear_1.weight.detach())
    assert torch.equal(projected[0], projected[1])  # same seeds and batches: only the grid loss differs
    assert not torch.equal(projected[0], projected[2])


def test_video_recipe_says_to_train_the_image_model_first(tmp_path, monkeypatch):
    from research.synthetic.train import main

    monkeypatch.setenv("TOKENREDUCE_SYNTHETIC_MODELS", str(tmp_path))
    with pytest.raises(SystemExit, match=r"from the image model.*train it first.*train image\)"):
        main(["video", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_projector_only_phase_leaves_the_language_model_as_it_was():
    plan = replace(PLANS["image"], tower_pool=0, lm_pool=2, questions_per_media=2, val_size=2, lm_steps=2,
                   lm_batch=2, eval_every=2, warmup=1, train_language=False,
                   then=(Phase(1, 1e-3, warmup=1),))
    first, second = plan.phases()
    assert not first.train_language and second.train_language
    torch.manual_seed(0)
    model = build_model("image")
    model.model.vision_tower.requires_grad_(False)
    task = TASKS["image"](build_tokenizer())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pools = language_pools(model, task, first, lambda _: None)
    train_language(model, task, first, lambda _: None, pools=pools)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith("model.multi_modal_projector") for n in moved)
    train_language(model, task, second, lambda _: None, pools=pools, phase=1)
    assert not torch.equal(model.lm_head.weight, before["lm_head.weight"])
