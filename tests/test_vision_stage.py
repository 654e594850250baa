"""Vision-tower stage: towers of every kind, tower signals, and the VisionZip / PruMerge / DivPrune / ToMe
baselines against plain step-by-step references; every vision-stage method through the foundation's oracles."""

import copy

import pytest
import torch

import tokenreduce as tr
from tokenreduce.adapters import get_adapter
from tokenreduce.adapters.towers import find_tower
from tokenreduce.core.api import get_handle
from tokenreduce.core.reduction import Reduction
from tokenreduce.core.registry import get_method
from tokenreduce.ops.selection import iqr_outliers
from tokenreduce.plugins.baselines.divprune import max_min_diversity
from tokenreduce.plugins.baselines.prumerge import PruMergeConfig, prumerge_group
from tokenreduce.plugins.baselines.tome import merge_schedule, merge_step, merge_tokens
from tokenreduce.plugins.baselines.visionzip import visionzip_select
from tokenreduce.testing.tiny import default_rows, tiny_batch, tiny_model

from .reference import (
    encoder_features,
    recorded_reductions,
    reduced_rows,
    reference_generate,
    reference_logits,
    wrapped_call,
)
from .tables import cases


# ----- towers --------------------------------------------------------------------------------------------
def _towers():
    import open_clip
    import timm
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipVisionConfig,
        SiglipVisionModel,
        TimmWrapperConfig,
        TimmWrapperModel,
    )

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=56, patch_size=14)
    torch.manual_seed(0)
    towers = {
        "hf_clip": lambda: CLIPVisionModel(CLIPVisionConfig(**small)),
        "hf_siglip": lambda: SiglipVisionModel(SiglipVisionConfig(**small)),
        "timm": lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, depth=3),
        "timm_wrapper": lambda: TimmWrapperModel(TimmWrapperConfig(architecture="vit_tiny_patch16_224", num_classes=0,
                                                                     model_args={"img_size": 64, "depth": 3})),
        "open_clip": lambda: open_clip.create_model("ViT-B-32", pretrained=None).visual,
    }
    return towers


def _run(tower, x):
    with torch.no_grad():
        out = tower(pixel_values=x) if hasattr(tower, "config") else tower(x)
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state if not hasattr(out, "pooler_output") or out.pooler_output is None else out.pooler_output
    return out


@pytest.mark.parametrize("kind", list(_towers()))
def test_tower_keep_all_unwrap_and_isolation(kind):
    build = _towers()[kind]
    torch.manual_seed(0)
    a = build().eval()
    b = copy.deepcopy(a)
    size = 56 if kind.startswith("hf") else (224 if kind == "open_clip" else 64)
    x = torch.randn(2, 3, size, size)
    reference = _run(a, x)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    tr.wrap(a, "tome", r=0)
    torch.testing.assert_close(_run(a, x), reference, atol=1e-5, rtol=1e-5)
    tr.unwrap(a)
    tr.wrap(a, "tome", r=2)
    merged = _run(a, x)
    assert torch.equal(_run(b, x), reference)  # the other instance is untouched
    assert tr.stats(a).samples[0].visual_tokens_out < tr.stats(a).samples[0].visual_tokens_in
    tr.unwrap(a)
    assert all("forward" not in blk.__dict__ for blk in find_tower(a).blocks)
    assert all(torch.equal(v, state[k]) for k, v in a.state_dict().items())
    assert torch.equal(_run(a, x), reference)
    assert merged.shape[0] == 2


def test_bare_tower_refuses_llm_methods():
    tower = _towers()["hf_clip"]()
    with pytest.raises(TypeError, match=r"needs a vision-language model; on a bare vision tower .* use one of: tome"):
        tr.wrap(tower, "pool")


# ----- plain references for each algorithm ----------------------------------------------------------------
def test_tome_merge_step_equals_loop_reference():
    torch.manual_seed(1)
    b, n, d = 2, 9, 5
    x, metric = torch.randn(b, n, d), torch.randn(b, n, 3)
    size = torch.rand(b, n) + 0.5
    slot = torch.arange(n).expand(b, -1).contiguous()
    merged, new_size, new_slot = merge_step(x, size, metric, slot, r=3, prefix=1)
    for row in range(b):
        m = torch.nn.functional.normalize(metric[row], dim=-1)
        a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
        scores = []
        for a in a_idx:
            if a == 0:
                scores.append((float("-inf"), a, None))
                continue
            sims = [float(m[a] @ m[bb]) for bb in b_idx]
            best = max(range(len(b_idx)), key=lambda j: (sims[j], -j))
            scores.append((sims[best], a, b_idx[best]))
        chosen = sorted(scores, key=lambda t: (-t[0], t[1]))[:3]
        groups = {t: [t] for t in range(n)}
        for _, a, dst in chosen:
            groups[dst].append(a)
            del groups[a]
        expected_x = [sum(x[row, i] * size[row, i] for i in g) / sum(size[row, i] for i in g) for _, g in sorted(groups.items())]
        torch.testing.assert_close(merged[row], torch.stack(expected_x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(new_size[row], torch.stack([sum(size[row, i] for i in g) for _, g in sorted(groups.items())]))
        for k, (_, g) in enumerate(sorted(groups.items())):
            assert all(int(new_slot[row, i]) == k for i in g)


def test_tome_schedule():
    assert merge_schedule(576, 23, r=16, keep=None) == [16] * 23
    sched = merge_schedule(576, 23, r=None, keep=0.25)
    assert 576 - sum(sched) == 144 and max(sched) - min(sched) <= 1
    assert merge_schedule(4, 3, r=16, keep=None) == [2, 1, 0]


def test_tome_projector_merges_by_similarity_into_member_means():
    """Every merged token is the mean of the tokens in its slot; the closest pair merges first."""
    torch.manual_seed(0)
    x = torch.randn(9, 16)
    x[4] = x[1] + 0.01  # A token 4 and B token 1 are near duplicates
    merged, slot = merge_tokens(x, 8)
    assert slot[4] == slot[1] and slot.unique().numel() == 8
    for k in (1, 3, 5):
        merged, slot = merge_tokens(x, k)
        assert merged.shape == (k, 16) and torch.equal(slot.unique(), torch.arange(k))
        for j in range(k):
            torch.testing.assert_close(merged[j], x[slot == j].mean(0))
    merged, slot = merge_tokens(x, 9)
    assert torch.equal(merged, x) and torch.equal(slot, torch.arange(9))


def test_visionzip_select_equals_reference():
    torch.manual_seed(2)
    n, d = 12, 4
    feats, keys, attn = torch.randn(n, d), torch.randn(n, 3), torch.rand(n)
    group = torch.arange(n)
    sources, outputs, slot = visionzip_select(feats, attn, keys, group, dominant=4, contextual=2)
    dom = sorted(sorted(range(n), key=lambda i: (-float(attn[i]), i))[:4])
    rest = [i for i in range(n) if i not in dom]
    targets = rest[:: len(rest) // 2][:2]
    others = [i for i in rest if i not in targets]
    kn = torch.nn.functional.normalize(keys, dim=-1)
    members = {t: [] for t in targets}
    for o in others:
        members[max(targets, key=lambda t: (float(kn[o] @ kn[t]), -targets.index(t)))].append(o)
    expected = [feats[i] for i in dom] + [feats[t] + (torch.stack([feats[o] for o in members[t]]).mean(0) if members[t] else 0) for t in targets]
    assert sources.tolist() == dom + targets
    torch.testing.assert_close(outputs, torch.stack(expected))
    for t_slot, t in enumerate(targets):
        assert all(int(slot[o]) == 4 + t_slot for o in members[t] + [t])


def test_prumerge_group_equals_reference():
    torch.manual_seed(3)
    n, d = 20, 4
    feats, keys = torch.randn(n, d), torch.randn(n, 3)
    attn = torch.softmax(torch.randn(n) * 3, 0)
    cfg = PruMergeConfig(neighbors=3)
    sources, outputs, slot = prumerge_group(feats, attn, keys, torch.arange(n), cfg, plus=False)
    q1, q3 = torch.quantile(attn, 0.25), torch.quantile(attn, 0.75)
    kept = sorted(i for i in range(n) if attn[i] > q3 + 1.5 * (q3 - q1))
    assert iqr_outliers(attn, 1.5).nonzero().flatten().tolist() == kept
    kn = torch.nn.functional.normalize(keys, dim=-1)
    expected = []
    for i in kept:
        others = sorted((j for j in range(n) if j != i), key=lambda j: -float(kn[i] @ kn[j]))[:3]
        expected.append(feats[i] + sum(attn[j] * feats[j] for j in others))
    pruned = [j for j in range(n) if j not in kept]
    expected.append(sum(attn[j] * feats[j] for j in pruned))
    torch.testing.assert_close(outputs, torch.stack(expected), atol=1e-5, rtol=1e-5)
    assert sources.tolist() == [*kept, max(pruned, key=lambda j: float(attn[j]))]
    assert all(int(slot[j]) == len(kept) for j in pruned)


def test_divprune_equals_reference():
    torch.manual_seed(4)
    x = torch.randn(15, 6)
    got = max_min_diversity(x, 5).tolist()
    xn = torch.nn.functional.normalize(x, dim=-1)
    dist = 1 - xn @ xn.T
    first = max(range(15), key=lambda j: (sorted(dist[:, j].tolist())[1], -j))
    chosen = [first]
    while len(chosen) < 5:
        chosen.append(max((j for j in range(15) if j not in chosen), key=lambda j: (min(float(dist[s, j]) for s in chosen), -j)))
    assert got == chosen


# ----- tower signals --------------------------------------------------------------------------------------
def test_cls_attention_signal_equals_eager_tower_attention():
    model = tiny_model("llava")
    batch = tiny_batch(model, default_rows("llava"))
    tr.wrap(model, "visionzip", dominant=0.5, contextual=0.0)
    try:
        stage = get_handle(model).vision_stage
        stage.capture.enabled = True
        with torch.no_grad():
            model.model.vision_tower(batch["pixel_values"])
        stage.capture.enabled = False
        q, k = stage.capture.pop()
        signals = get_handle(model).method.tower_signals(q, k, stage.capture.parts.scale, 1)
    finally:
        tr.unwrap(model)
    with torch.no_grad():
        out = model.model.vision_tower(batch["pixel_values"], output_attentions=True)
    layer = len(out.attentions) - 2
    expected = out.attentions[layer][:, :, 0, 1:].mean(1)
    torch.testing.assert_close(signals["attention"], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_patch_source_points_at_the_crop_patch_of_each_token(family):
    """Mapping per-crop projected patches through ``token_signals`` gives back the packed tokens.

    LLaVA-OneVision downsamples large canvases bilinearly (anyres_max): there a canvas token blends
    patches, so only its base image is compared exactly and the canvas sources are checked for range.
    """
    model = tiny_model(family)
    batch = tiny_batch(model, default_rows(family))
    adapter = get_adapter(model)
    features = encoder_features(model, "image", batch)
    layouts = adapter.layouts("image", batch, [f.shape[0] for f in features])
    with torch.no_grad():
        pixels = batch["pixel_values"]
        crops = torch.cat([pixels[i, : lay.extra["tower_rows"]] for i, lay in enumerate(layouts)])
        hidden = model.model.vision_tower(crops, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
        if model.config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        per_patch = model.model.multi_modal_projector(hidden)
    mapped = adapter.token_signals("image", layouts, per_patch)
    for f, lay, m in zip(features, layouts, mapped):
        compare = lay.content_mask.clone()
        if family == "llava_onevision":
            compare[lay.segment_slices()[0].stop :] = False
            source = lay.extra["patch_source"][lay.content_mask]
            assert bool((source[:, 0] < lay.extra["tower_rows"]).all()) and bool((source >= 0).all())
        assert bool(m[lay.is_newline].isnan().all())
        torch.testing.assert_close(m[compare], f[compare], atol=1e-5, rtol=1e-5)


# ----- every vision-stage method through forward and generate on every family that runs it ---------------
CASES = cases("vision")


@pytest.mark.parametrize("method, family", CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_baseline_oracles(method, family):
    model = tiny_model(family)
    batch = tiny_batch(model, default_rows(family, video=True))
    config = get_method(method).config_cls.at_budget(0.4)
    tr.wrap(model, config)
    try:
        with torch.no_grad():
            logits = model(**batch).logits
        recorded = recorded_reductions(model)
        with torch.no_grad():
            tokens = model.generate(**batch, max_new_tokens=6, do_sample=False)
        rows_alone = []
        for r in range(3):
            one = tiny_batch(model, default_rows(family, video=True)[r : r + 1])
            with torch.no_grad():
                rows_alone.append(model(**one).logits[0])
        stats = tr.stats(model).samples[0]
    finally:
        tr.unwrap(model)
    refs = reduced_rows(model, None, batch, recorded=recorded)
    for r, (emb, pos, _) in enumerate(refs):
        ref = reference_logits(model, emb, pos)
        torch.testing.assert_close(logits[r, -ref.shape[0]:], ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(rows_alone[r], ref, atol=1e-4, rtol=1e-4)
        assert tokens[r, -6:].tolist() == reference_generate(model, emb, pos, 6).tolist()
    assert stats.visual_tokens_out < stats.visual_tokens_in
    assert torch.equal(tokens[:, : batch["input_ids"].shape[1]], batch["input_ids"])


def test_unsupported_family_is_explained():
    with pytest.raises(TypeError, match="method 'visionzip' does not support model family 'qwen2_vl'; supported: llava"):
        tr.wrap(tiny_model("qwen2_vl"), "visionzip")
    with pytest.raises(TypeError, match="does not support model family 'llava_next'"):
        tr.wrap(tiny_model("llava_next"), "tome", r=2)


class _TopAttention:
    """Reference reducer for :func:`reduced_rows`: per image, the ``k`` patches the tower's [CLS] token
    attends to most at the feature layer (eager attention of the unwrapped tower), ties to the lower index."""

    def __init__(self, attention, k, config):
        self.attention, self.k, self.config = attention, k, config

    def reduce(self, features, context):
        scores = self.attention[context.item].tolist()
        top = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[: self.k]
        return Reduction(sources=torch.tensor(sorted(top)))


@pytest.mark.parametrize("dominant, k", [(0.4, 6), (5, 5), (0.3, 5)])  # of 16 patches: round(6.4), 5, round(4.8)
def test_visionzip_dominant_tokens_are_the_towers_cls_top_k(dominant, k):
    """VisionZip with no contextual tokens (``contextual=0.0``, a falsy value that must not fall back to the
    family default) keeps the top-k [CLS]-attended patches: kept set and logits from the unwrapped tower."""
    model = tiny_model("llava")
    batch = tiny_batch(model, default_rows("llava"))
    config = get_method("visionzip").config_cls(dominant=dominant, contextual=0.0)
    logits, recorded = wrapped_call(model, batch, config)
    with torch.no_grad():
        out = model.model.vision_tower(batch["pixel_values"], output_attentions=True)
    attention = out.attentions[len(out.attentions) - 2][:, :, 0, 1:].mean(1)  # the feature layer's input
    reference = _TopAttention(attention, k, config)
    for i, red in enumerate(recorded):
        assert sorted(red.sources.tolist()) == reference.reduce(None, type("C", (), {"item": i})).sources.tolist()
    for r, (emb, pos, _) in enumerate(reduced_rows(model, reference, batch)):
        ref = reference_logits(model, emb, pos)
        torch.testing.assert_close(logits[r, -ref.shape[0]:], ref, atol=1e-4, rtol=1e-4)


# ----- vispruner ----------------------------------------------------------------------------------------------
def reference_vispruner(features, attention, keep, important):
    """VisPruner as the official ``encode_images`` on one crop: ``int(keep * important)`` tokens by [CLS]
    attention (descending, ties to the lower index), then rounds removing ``min(8, R - diverse)`` of the
    first alternate half most similar to the second half, until ``diverse`` remain."""
    n_important = int(keep * important)
    diverse = keep - n_important
    scores = attention.tolist()
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    residual = order[n_important:] if diverse else []
    unit = [features[i].double() / features[i].double().norm() for i in range(features.shape[0])]
    while len(residual) > diverse:
        r = min(8, len(residual) - diverse)
        a, b = residual[::2], residual[1::2]
        best = [max(float(unit[i] @ unit[j]) for j in b) for i in a]
        ranked = sorted(range(len(a)), key=lambda i: (-best[i], i))
        residual = [a[i] for i in ranked[r:]] + b
    return sorted(order[:n_important] + residual)


@pytest.mark.parametrize("n, keep, important", [(40, 12, 0.5), (40, 5, 0.5), (37, 30, 0.25), (16, 16, 0.5),
                                                (25, 7, 1.0), (25, 7, 0.0), (9, 1, 0.5)])
def test_vispruner_select_equals_reference(n, keep, important):
    from tokenreduce.plugins.baselines.vispruner.select import vispruner_select

    gen = torch.Generator().manual_seed(n + keep)
    feats, attn = torch.randn(n, 6, generator=gen), torch.rand(n, generator=gen)
    got = vispruner_select(feats, attn, keep, important).tolist()
    assert got == reference_vispruner(feats, attn, keep, important)
    assert len(got) == keep


class _VisPrunerReference:
    """Reference reducer for :func:`reduced_rows`: VisPruner per image on the unwrapped tower's [CLS] attention
    at the feature layer and the projected features."""

    def __init__(self, attention, keep, config):
        self.attention, self.keep, self.config = attention, keep, config

    def reduce(self, features, context):
        kept = reference_vispruner(features, self.attention[context.item], self.keep, self.config.important)
        return Reduction(sources=torch.tensor(kept))


@pytest.mark.parametrize("keep, important, k", [(0.4, 0.5, 7), (5, 0.25, 5), (0.3, 1.0, 5)])  # of 16: ceil
def test_vispruner_keeps_the_towers_important_and_diverse_tokens(keep, important, k):
    model = tiny_model("llava")
    batch = tiny_batch(model, default_rows("llava"))
    config = get_method("vispruner").config_cls(keep=keep, important=important)
    logits, recorded = wrapped_call(model, batch, config)
    with torch.no_grad():
        out = model.model.vision_tower(batch["pixel_values"], output_attentions=True)
    attention = out.attentions[len(out.attentions) - 2][:, :, 0, 1:].mean(1)
    reference = _VisPrunerReference(attention, k, config)
    features = encoder_features(model, "image", batch)
    for i, red in enumerate(recorded):
        context = type("C", (), {"item": i})
        assert sorted(red.sources.tolist()) == reference.reduce(features[i], context).sources.tolist()
    for r, (emb, pos, _) in enumerate(reduced_rows(model, reference, batch)):
        ref = reference_logits(model, emb, pos)
        torch.testing.assert_close(logits[r, -ref.shape[0]:], ref, atol=1e-4, rtol=1e-4)
