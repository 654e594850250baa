"""What a langdc reduction holds: pooled base tokens, soft caption tokens at each segment's end, info; options
and error messages."""

import pytest
import torch

import tokenreduce as tr
from tokenreduce.adapters import get_adapter
from tokenreduce.core.api import get_handle
from tokenreduce.core.reduction import ReduceContext
from tokenreduce.plugins.baselines.pool import PoolConfig, PoolMethod
from tokenreduce.plugins.langdc import Captioner, CaptionerConfig, LangDCConfig, LangDCMethod
from tokenreduce.plugins.langdc.method import segment_groups
from tokenreduce.plugins.langdc.training import add_vlm_adapters
from tokenreduce.testing.tiny import default_rows, tiny_batch, tiny_model

from .helpers import target_caption


def _video(model, family="llava_onevision"):
    batch = tiny_batch(model, default_rows(family, video=True))
    adapter = get_adapter(model)
    with torch.no_grad():
        feats = adapter.encode("video", batch)
    layouts = adapter.layouts("video", batch, [f.shape[0] for f in feats])
    return feats, layouts


def test_reduction_holds_base_tokens_then_captions_at_segment_ends(tiny_setup):
    model, path, captioner = tiny_setup("llava_onevision")
    feats, layouts = _video(model)
    method = LangDCMethod(LangDCConfig(captioner=path, base_keep=0.25, segment_frames=2))
    row = 2
    f, layout = feats[row], layouts[row]
    red = method.reduce(f, ReduceContext(layout=layout, modality="video", row=row, item=row))
    info = red.info
    assert info["caption_tokens"] == [2, 3] == [len(target_caption(row, s)) for s in range(2)]
    assert info["captions"] == [" ".join(map(str, target_caption(row, s))) for s in range(2)]  # no tokenizer: ids
    assert info["segments"] == [[0, 1], [2, 3]]
    # base branch: exactly pool's tokens (newline slot included) at the same budget
    base = PoolMethod(PoolConfig(keep=0.25)).reduce(f, ReduceContext(layout=layout, modality="video", row=0, item=0))
    nb = info["base_tokens"]
    assert nb == base.num_tokens == 5
    assert torch.equal(red.sources[:nb], base.sources)
    torch.testing.assert_close(red.features[:nb], base.features)
    # soft caption tokens: each segment's last content tokens in caption order, post_proj(hidden states)
    slices = layout.segment_slices()
    seg_end = [slices[1].stop, slices[3].stop]
    assert red.sources[nb:].tolist() == [seg_end[0] - 2, seg_end[0] - 1, seg_end[1] - 3, seg_end[1] - 2, seg_end[1] - 1]
    groups = method.groups(f, layout)
    _, _, hidden = captioner.teacher_force(torch.stack([g.visual for g in groups]), [target_caption(row, s) for s in range(2)])
    expected = captioner.soft_tokens(torch.cat(hidden))
    torch.testing.assert_close(red.features[nb:], expected, atol=1e-5, rtol=1e-4)
    flops = sum(captioner.flops(g.visual.shape[0], n) for g, n in zip(groups, info["caption_tokens"]))
    assert info["captioner_flops"] == pytest.approx(flops) and flops > 0
    assert info["captioner_ms"] > 0


def test_options_caption_only_truncation_and_teacher_forcing(tiny_setup):
    model, path, _ = tiny_setup("llava_onevision")
    feats, layouts = _video(model)
    f, layout = feats[2], layouts[2]

    def run(**options):
        method = LangDCMethod(LangDCConfig(captioner=path, segment_frames=2, **options))
        return method, method.reduce(f, ReduceContext(layout=layout, modality="video", row=0, item=0))

    _, full = run()
    _, only = run(base=False)
    assert only.info["base_tokens"] == 1 and only.num_tokens == 1 + 5  # the newline slot and the captions
    _, bare = run(base=False, keep_newline=False)
    assert bare.num_tokens == 5 and int(bare.sources.min()) < layout.num_tokens - 1
    _, short = run(max_caption_tokens=2)
    assert short.info["caption_tokens"] == [2, 2]
    method, _ = run()
    with method.forced_captions([[[6, 7, 3], []]]):
        forced = method.reduce(f, ReduceContext(layout=layout, modality="video", row=0, item=0))
    assert forced.info["caption_tokens"] == [3, 0]
    with method.forced_captions([[target_caption(2, 0), target_caption(2, 1)]]):
        same = method.reduce(f, ReduceContext(layout=layout, modality="video", row=0, item=0))
    torch.testing.assert_close(same.features, full.features, atol=1e-5, rtol=1e-4)
    assert torch.equal(same.sources, full.sources)
    # images are left alone unless asked for
    image = method.reduce(f[:5], ReduceContext(layout=layout, modality="image", row=0, item=0))
    assert image.num_tokens == 5 and image.features is None


def test_images_as_one_segment_and_renumbered_positions(tiny_setup):
    model, path, _ = tiny_setup("llava_onevision")
    batch = tiny_batch(model, default_rows("llava_onevision", video=True))
    tr.wrap(model, "langdc", captioner=path, modalities=("image", "video"), segment_frames=2, renumber_positions=True)
    try:
        with torch.no_grad():
            model(**batch)
        rows = tr.stats(model).last
    finally:
        tr.unwrap(model)
    images = [it for r in rows for it in r.items if it.modality == "image"]
    assert images and all(len(it.info["caption_tokens"]) == 1 for it in images)
    assert all(it.tokens_out < it.tokens_in for r in rows for it in r.items)


def test_captioner_round_trip_and_errors(tmp_path, tiny_setup):
    _model, path, captioner = tiny_setup("llava_onevision")
    loaded = Captioner.from_pretrained(path)
    visual = torch.randn(3, 8, 64, generator=torch.Generator().manual_seed(1))
    a, b = captioner.generate(visual), loaded.generate(visual)
    assert a.ids == b.ids
    for x, y in zip(a.hidden, b.hidden):
        torch.testing.assert_close(loaded.soft_tokens(y), captioner.soft_tokens(x))
    assert loaded.config == captioner.config
    with pytest.raises(ValueError, match=r"`captioner`='/nonexistent/x': no such directory"):
        Captioner.from_pretrained("/nonexistent/x")
    with pytest.raises(ValueError, match="neither a local directory nor a reachable hub repo"):
        Captioner.from_pretrained("not a//valid repo id")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no langdc_captioner\.json"):
        Captioner.from_pretrained(tmp_path / "empty")


def test_config_and_wrap_errors(tmp_path, tiny_setup):
    with pytest.raises(ValueError, match=r"`base_keep` as a token count must be >= 1, got 0"):
        LangDCConfig(base_keep=0)
    with pytest.raises(ValueError, match=r"`segment_frames` must be in \[1, inf\], got 0"):
        LangDCConfig(segment_frames=0)
    with pytest.raises(ValueError, match="`captioner` must be a local directory or hub repo id"):
        LangDCConfig(captioner="")
    with pytest.raises(ValueError, match="`base` must be a bool"):
        LangDCConfig(base="yes")
    assert LangDCConfig.at_budget(0.3, captioner="x").base_keep == 0.3
    with pytest.raises(ValueError, match=r"`frame_tokens` must be an int >= 1 or None"):
        CaptionerConfig(vlm_hidden=8, eos_token_id=2, frame_tokens=0)
    with pytest.raises(ValueError, match=r"`post_projector` must be one of \('linear', 'mlp2x_gelu'\), got 'mlp'"):
        CaptionerConfig(vlm_hidden=8, eos_token_id=2, post_projector="mlp")
    with pytest.raises(ValueError, match=r"`hidden_layer` must be in \[0, 2\]"):
        Captioner.build(CaptionerConfig(vlm_hidden=8, eos_token_id=2, hidden_layer=3),
                        dict(vocab_size=8, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1))
    model, path, _ = tiny_setup("llava_onevision")
    with pytest.raises(ValueError, match="`captioner` is required for langdc"):
        tr.wrap(model, "langdc")
    with pytest.raises(TypeError, match="method 'langdc' does not support model family 'llava'"):
        tr.wrap(tiny_model("llava"), "langdc", captioner=path)
    narrow = Captioner.build(CaptionerConfig(vlm_hidden=32, eos_token_id=2, hidden_layer=1),
                             dict(vocab_size=8, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1))
    narrow.save_pretrained(tmp_path / "narrow")
    with pytest.raises(ValueError, match=r"was trained for visual tokens of width 32; llava_onevision .* width 64"):
        tr.wrap(model, "langdc", captioner=str(tmp_path / "narrow"))
    assert tr.core.api.get_handle(model) is None


def test_differences_follow_the_frame_before_across_segments(tiny_setup):
    model, _, _ = tiny_setup("llava_onevision")
    feats, layouts = _video(model)
    f, layout = feats[2], layouts[2]
    plain = segment_groups(f, layout, 2, 4)
    both = segment_groups(f, layout, 2, 4, differences="cell")
    frames = torch.cat([g.visual for g in plain]).view(-1, 4, f.shape[-1])  # [frames, 4 pooled cells, D]
    got = torch.cat([g.visual for g in both]).view(-1, 4, 2 * f.shape[-1])
    torch.testing.assert_close(got[..., : f.shape[-1]], frames)
    expected = torch.cat([torch.zeros_like(frames[:1]), frames[1:] - frames[:-1]])  # segment 2 starts from frame 1
    torch.testing.assert_close(got[..., f.shape[-1] :], expected)
    assert [g.content.tolist() for g in both] == [g.content.tolist() for g in plain]
    wide = torch.cat([g.visual for g in segment_groups(f, layout, 2, 4, differences="neighbourhood")])
    d = f.shape[-1]
    delta = expected.view(-1, 2, 2, d)  # the 2 x 2 pooled grid of every frame
    around = wide.view(-1, 2, 2, 6 * d)[..., 2 * d :].view(-1, 2, 2, 4, d)  # above, below, left, right
    torch.testing.assert_close(around[:, 1, 0, 0], delta[:, 0, 0])  # above (1, 0) is (0, 0)
    torch.testing.assert_close(around[:, 0, 1, 1], delta[:, 1, 1])  # below (0, 1) is (1, 1)
    torch.testing.assert_close(around[:, 0, 1, 2], delta[:, 0, 0])  # left of (0, 1) is (0, 0)
    torch.testing.assert_close(around[:, 1, 0, 3], delta[:, 1, 1])  # right of (1, 0) is (1, 1)
    assert not around[:, 0, :, 0].any() and not around[:, :, 1, 3].any()  # off the grid: zero
    with pytest.raises(ValueError, match=r"`differences` must be one of \('none', 'cell', 'neighbourhood'\)"):
        segment_groups(f, layout, 2, 4, differences="yes")


def test_vlm_adapters_act_only_while_wrapped_and_round_trip(tmp_path, tiny_setup):
    model, path, _ = tiny_setup("llava_onevision")
    batch = tiny_batch(model, default_rows("llava_onevision", video=True))
    captioner = Captioner.from_pretrained(path)
    add_vlm_adapters(captioner, get_adapter(model).language_model, rank=2, targets=("q_proj", "down_proj"))
    assert {n.rsplit(".", 1)[-1] for n, _, _ in captioner.config.vlm_modules} == {"q_proj", "down_proj"}
    with torch.no_grad():
        for delta in captioner.vlm_adapters.values():
            delta.b.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    captioner.save_pretrained(tmp_path / "adapted")

    def logits(captioner_path):
        tr.wrap(model, "langdc", captioner=str(captioner_path), segment_frames=2)
        try:
            with torch.no_grad():
                return model(**batch).logits
        finally:
            tr.unwrap(model)

    with torch.no_grad():
        before = model(**batch).logits
    plain, adapted = logits(path), logits(tmp_path / "adapted")
    assert not torch.allclose(plain, adapted, atol=1e-3)  # the adapters change what the LLM computes
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)  # and unwrap leaves none behind
    loaded = Captioner.from_pretrained(tmp_path / "adapted")
    assert loaded.config == captioner.config
    for name, delta in captioner.vlm_adapters.items():
        torch.testing.assert_close(loaded.vlm_adapters[name].b, delta.b)
    bad = Captioner.from_pretrained(tmp_path / "adapted")
    bad.vlm_adapters.layers = (("layers.0.nowhere", 64, 64),)
    tr.wrap(model, "langdc", captioner=str(tmp_path / "adapted"), segment_frames=2)
    try:
        with pytest.raises(ValueError, match=r"the LangDC captioner adapts LLM layer 'layers\.0\.nowhere'"):
            get_handle(model).method.set_captioner(bad)
    finally:
        tr.unwrap(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
    with pytest.raises(ValueError, match=r"`vlm_rank` \(2\) > 0 needs `vlm_modules`"):
        CaptionerConfig(vlm_hidden=8, eos_token_id=2, vlm_rank=2)


def test_base_branch_defaults_to_how_the_captioner_was_aligned(tiny_setup):
    model, path, _ = tiny_setup("llava_onevision")
    feats, layouts = _video(model)
    context = ReduceContext(layout=layouts[2], modality="video", row=0, item=0)
    captioner = Captioner.from_pretrained(path)
    assert LangDCMethod(LangDCConfig(captioner=path), captioner=captioner).base  # nothing recorded: with base
    captioner.config.training["base"] = False
    method = LangDCMethod(LangDCConfig(captioner=path, segment_frames=2), captioner=captioner)
    assert method.reduce(feats[2], context).info["base_tokens"] == 1  # the newline slot only
    forced = LangDCMethod(LangDCConfig(captioner=path, segment_frames=2, base=True), captioner=captioner)
    assert forced.reduce(feats[2], context).info["base_tokens"] > 1
