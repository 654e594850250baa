"""``vqtoken`` on the four video families: the foundation oracles, the index map, positions, options."""

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.api import get_handle
from tokenreduce.plugins.vqtoken import VQAttention, VQAttentionConfig, VQTokenConfig, VQTokenMethod
from tokenreduce.plugins.vqtoken.clustering import normalize
from tokenreduce.testing.tiny import VIDEO_FAMILIES, default_rows, tiny_batch, tiny_model

from ..reference import encoder_features, reduced_rows, reference_generate, reference_logits


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in VIDEO_FAMILIES}


@pytest.fixture(scope="module")
def attention_dir(tmp_path_factory):
    """A VQ-attention module with random (non-identity) weights, saved to disk."""
    torch.manual_seed(7)
    module = VQAttention(VQAttentionConfig(dim=64, heads=4, bins=(4, 2, 2), hidden=32))
    with torch.no_grad():
        for p in (module.out.weight, module.ffn[-1].weight):
            p.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("vqattn")
    module.save_pretrained(path)
    return str(path)


CONFIGS = {
    # the paper's defaults: sequential positions, code tokens in order of first occurrence
    "sequential": dict(keep=3),
    # representative tokens' own positions (M-RoPE ids on Qwen2-VL)
    "representative": dict(keep=0.4, anchor="representative", renumber_positions=False),
    # Lloyd's iterations in torch (the default for CUDA features without faiss-gpu)
    "torch_kmeans": dict(keep=3, kmeans="torch"),
}


def _run(model, config, batch, generate=False):
    tr.wrap(model, config)
    try:
        with torch.no_grad():
            if generate:
                return model.generate(**batch, max_new_tokens=6, do_sample=False), tr.stats(model).last
            return model(**batch).logits, tr.stats(model).last
    finally:
        tr.unwrap(model)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("mode", list(CONFIGS))
def test_forward_equals_reduced_reference_and_batch_equals_rows_alone(models, attention_dir, family, mode):
    model = models[family]
    rows = default_rows(family, video=True)
    batch = tiny_batch(model, rows)
    config = VQTokenConfig(attention=attention_dir, **CONFIGS[mode])
    out, stats = _run(model, config, batch)
    refs = reduced_rows(model, VQTokenMethod(config), batch)
    for r, (emb, pos, _) in enumerate(refs):
        ref = reference_logits(model, emb, pos)
        torch.testing.assert_close(
            out[r, -ref.shape[0] :], ref, atol=1e-4, rtol=1e-4, msg=f"{family} row {r}"
        )
        videos = [it for it in stats[r].items if it.modality == "video"]
        assert videos and all(it.tokens_out < it.tokens_in for it in videos)
        assert all(it.tokens_out == it.tokens_in for it in stats[r].items if it.modality == "image")
    for r, spec in enumerate(rows):
        alone, _ = _run(model, config, tiny_batch(model, [spec]))
        torch.testing.assert_close(
            out[r, -alone.shape[1] :], alone[0], atol=1e-4, rtol=1e-4, msg=f"{family} row {r} alone"
        )


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_generate_equals_reduced_reference(models, attention_dir, family):
    model = models[family]
    batch = tiny_batch(model, default_rows(family, video=True))
    config = VQTokenConfig(
        attention=attention_dir, **CONFIGS["representative" if "qwen" in family else "sequential"]
    )
    out, _ = _run(model, config, batch, generate=True)
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    for r, (emb, pos, _) in enumerate(reduced_rows(model, VQTokenMethod(config), batch)):
        assert out[r, -6:].tolist() == reference_generate(model, emb, pos, 6).tolist(), f"{family} row {r}"


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_index_map_round_trips_and_code_tokens_are_the_paper_codebook(models, family):
    model = models[family]
    batch = tiny_batch(model, default_rows(family, video=True))
    tr.wrap(model, "vqtoken", keep=3, keep_codebook=True)
    try:
        with torch.no_grad():
            model(**batch)
        items = [it for it in get_handle(model).last_batch.items if it.modality == "video"]
    finally:
        tr.unwrap(model)
    feats = encoder_features(model, "video", batch)
    for item, f in zip(items, feats):
        red, layout = item.reduction, item.layout
        frames = [s for s in layout.segments if s.kind == "frame"]
        index = red.info["index_map"]
        assert tuple(index.shape) == (len(frames), frames[0].rows, frames[0].cols)
        content = layout.content_mask.nonzero().flatten()
        x = f[content]
        codes = index.flatten().long()
        # every grid cell's code is its nearest codeword (brute-force cosine, not the assignment kernel)
        assert torch.equal((normalize(x) @ red.info["codebook"].T).argmax(1), codes)
        assert torch.equal(red.assignment[content], codes)
        # code token k = the mean of its cells' tokens (the paper's b_k), placed at its first cell
        for k in range(red.num_tokens):
            torch.testing.assert_close(red.features[k], x[codes == k].mean(0))
            assert int(red.sources[k]) == int(content[(codes == k).nonzero()[0, 0]])
        assert red.num_tokens == red.info["num_codes"] <= 3


def _positions_seen(model, config, batch):
    seen = {}

    def grab(module, args, kwargs):
        seen["pos"] = kwargs["position_ids"]

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _run(model, config, batch)
    finally:
        hook.remove()
    return seen["pos"]


def test_qwen_code_tokens_take_representative_mrope_ids_or_sequential_ids(models):
    model = models["qwen2_vl"]
    batch = tiny_batch(model, default_rows("qwen2_vl", video=True))
    full, _ = model.model.get_rope_index(
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        video_grid_thw=batch["video_grid_thw"],
    )
    config = VQTokenConfig(keep=2, anchor="representative", renumber_positions=False)
    got = _positions_seen(model, config, batch)
    for r, (_, _, cols) in enumerate(reduced_rows(model, VQTokenMethod(config), batch)):
        assert torch.equal(got[1:, r, -cols.numel() :], full[:, r, cols])
    got = _positions_seen(model, VQTokenConfig(keep=2), batch)  # default: sequential, as in the paper
    for r, (_, _, cols) in enumerate(reduced_rows(model, VQTokenMethod(VQTokenConfig(keep=2)), batch)):
        n = cols.numel()
        for axis in range(1, 4):
            assert torch.equal(got[axis, r, -n:], torch.arange(n))


def test_images_pass_through_unless_asked(models):
    model = models["llava_onevision"]
    batch = tiny_batch(model, default_rows("llava_onevision", video=True))
    _, stats = _run(model, VQTokenConfig(keep=3), batch)
    images = [it for s in stats for it in s.items if it.modality == "image"]
    # the rule for inputs a method cannot act on: passed through, with a note in the stats
    assert images and all(it.tokens_out == it.tokens_in for it in images)
    assert all(list(it.info) == ["notes"] and "does not reduce images" in it.info["notes"][0] for it in images)
    _, stats = _run(model, VQTokenConfig(keep=3, modalities=("image", "video")), batch)
    images = [it for s in stats for it in s.items if it.modality == "image"]
    assert all(it.tokens_out <= 3 and it.info["index_map"].numel() > 0 for it in images)


def test_keep_newline_keeps_onevision_trailing_newline(models):
    model = models["llava_onevision"]
    batch = tiny_batch(model, default_rows("llava_onevision", video=True))
    tr.wrap(model, "vqtoken", keep=2, keep_newline=True)
    try:
        with torch.no_grad():
            model(**batch)
        items = [it for it in get_handle(model).last_batch.items if it.modality == "video"]
    finally:
        tr.unwrap(model)
    for it in items:
        last = it.layout.num_tokens - 1
        assert it.layout.is_newline[last] and int(it.reduction.sources[-1]) == last
        assert it.reduction.num_tokens == it.reduction.info["num_codes"] + 1
        assert "codebook" not in it.reduction.info  # only with keep_codebook=True


def test_adaptive_mode_reports_scores_and_respects_bounds(models):
    model = models["llava_next_video"]
    batch = tiny_batch(model, default_rows("llava_next_video", video=True))
    _, stats = _run(model, VQTokenConfig(k_min=2, k_max=5, adaptive="silhouette"), batch)
    for it in (it for s in stats for it in s.items if it.modality == "video"):
        assert 2 <= it.info["k"] <= 5 and set(it.info["k_scores"]) == set(range(2, 6))
        assert it.tokens_out == it.info["num_codes"] <= it.info["k"]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"keep": 0}, "`keep`"),
        ({"adaptive": "gap"}, "`adaptive`"),
        ({"k_min": 9, "k_max": 4}, "`k_min`"),
        ({"anchor": "middle"}, "`anchor`"),
        ({"codeword": "median"}, "`codeword`"),
        ({"threads": -1}, "`threads`"),
        ({"use_gpu": "yes"}, "`use_gpu`"),
        ({"kmeans": "sklearn"}, "`kmeans`"),
    ],
)
def test_bad_options_name_parameter_and_accepted_values(options, match):
    with pytest.raises(ValueError, match=match):
        VQTokenConfig(**options)


def test_attention_errors(models, tmp_path):
    with pytest.raises(ValueError, match="vqtoken_codebook"):
        tr.wrap(models["qwen2_vl"], "vqtoken_codebook", attention="someone/repo")
    with pytest.raises(ValueError, match="`attention`"):
        tr.wrap(models["qwen2_vl"], "vqtoken", attention=str(tmp_path / "missing" / "dir"))
    VQAttention(VQAttentionConfig(dim=32)).save_pretrained(tmp_path / "narrow")
    with pytest.raises(ValueError, match="width 32"):
        tr.wrap(models["qwen2_vl"], "vqtoken", attention=str(tmp_path / "narrow"))
    assert get_handle(models["qwen2_vl"]) is None  # a failed wrap leaves the model unwrapped


def test_at_budget_is_fixed_length():
    config = VQTokenConfig.at_budget(0.01)
    assert config.keep == 0.01 and config.renumber_positions
    assert VQTokenConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_one_code_per_token_at_original_positions_is_the_identity(models, family):
    model = models[family]
    batch = tiny_batch(model, default_rows(family, video=True))
    with torch.no_grad():
        reference = model(**batch).logits
    config = VQTokenConfig(keep=1.0, renumber_positions=False, keep_newline=True)
    out, stats = _run(model, config, batch)
    assert all(it.tokens_out == it.tokens_in for s in stats for it in s.items)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out[valid], reference[valid], atol=1e-5, rtol=0)
