"""``variant="reference"`` of every baseline against its official implementation's semantics.

Each reference here is re-derived step by step from the paper and the official code's semantics (read, not
copied; repositories and commits in docs/departures.md), with plain loops and torch on the UNWRAPPED tiny
models: PruMerge / PruMerge+ (42Shawn/LLaVA-PruMerge), VisionZip (dvlab-research/VisionZip), PyramidDrop
(Cooperx521/PyramidDrop), ToMe's merge (facebookresearch/ToMe), DivPrune (vbdi/divprune) and DART
(ZichenWen1/DART). The wrapped
model must keep the same tokens, emit the same (merged) values within 1e-5 in the official order, and, where
the whole LLaVA-1.5 pipeline is re-derived, give the same logits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.api import get_handle
from tokenreduce.core.layout import TokenLayout
from tokenreduce.core.reduction import ReduceContext
from tokenreduce.core.registry import get_method
from tokenreduce.plugins.baselines.prumerge import PruMergeConfig, prumerge_group, prumerge_reference
from tokenreduce.plugins.baselines.tome import merge_step
from tokenreduce.testing.tiny import IMAGE_TOKEN, RowSpec, model_class, tiny_batch, tiny_config

from .reference import encoder_features, reference_logits, wrapped_call

SIDE = 112  # 8 x 8 = 64 patches per image


def _llava(seed: int = 0, tower_layers: int = 3):
    """A tiny LLaVA-1.5 (CLIP tower of ``tower_layers`` blocks, feature layer -2) with 64 patches per image."""
    config = tiny_config("llava")
    config.vision_config.image_size = SIDE
    config.vision_config.num_hidden_layers = tower_layers
    torch.manual_seed(seed)
    model = model_class("llava")(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.abs().max() == 0 and p.numel() > 1:
                p.normal_(0, 0.5)
    return model.eval()


def _batch(model, images: int = 2, seed: int = 0):
    return tiny_batch(model, [RowSpec(images=[(SIDE, SIDE)] * images, seed=seed)])


def _tower_pass(model, batch, layer: int):
    """The unwrapped tower on the batch's images: hidden states, and the raw q_proj / k_proj outputs of
    block ``layer`` (forward hooks, as the official code reads them)."""
    tower = model.model.vision_tower
    block = getattr(tower, "vision_model", tower).encoder.layers[layer]
    got = {}
    hooks = [block.self_attn.q_proj.register_forward_hook(lambda m, a, o: got.__setitem__("q", o)),
             block.self_attn.k_proj.register_forward_hook(lambda m, a, o: got.__setitem__("k", o))]
    try:
        with torch.no_grad():
            out = tower(batch["pixel_values"], output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return out.hidden_states, got["q"], got["k"]


def _official_sequence(model, batch, outputs_per_image):
    """The row LLaVA-1.5's own code builds: every image's placeholder span replaced by its outputs, in the
    order given, and consecutive positions."""
    ids = batch["input_ids"][0]
    embeds = model.model.get_input_embeddings()(ids).detach()
    rows, image, c = [], 0, 0
    while c < ids.numel():
        if int(ids[c]) == IMAGE_TOKEN:
            rows.extend(outputs_per_image[image])
            image += 1
            while c < ids.numel() and int(ids[c]) == IMAGE_TOKEN:
                c += 1
        else:
            rows.append(embeds[c])
            c += 1
    emb = torch.stack(list(rows))
    return emb, torch.arange(emb.shape[0])


def _kept_in_order(assignment: torch.Tensor, count: int) -> list[int]:
    """The patch standing for each of the first ``count`` outputs (the kept, unmerged tokens)."""
    return [int((assignment == j).nonzero()[0]) for j in range(count)]


# ----- PruMerge / PruMerge+ --------------------------------------------------------------------------------
def official_prumerge(model, batch, plus: bool):
    """PruMerge(+) step by step as the official LLaVA-1.5 code does it: [CLS] attention from the LAST tower
    block's q_proj / k_proj outputs (full width, scaled by C^-1/2), the IQR outlier ratio (numpy
    percentiles), ``topk(int(N * ratio))``, PruMerge+'s ``arange(0, N - 1, int(int(1 / ratio) / 3))``, then
    for every kept token (in topk order) the 32 most key-similar of all other tokens, merged with their
    attention as weights into the feature layer's hidden states, one extra token for the pruned ones, and
    the projector. Returns per image (kept patches in order, projected outputs)."""
    hidden_states, q, k = _tower_pass(model, batch, -1)
    features = hidden_states[-2][:, 1:]
    out = []
    for b in range(q.shape[0]):
        n, c = features.shape[1], features.shape[2]
        attn = torch.softmax(q[b] @ k[b].T * c**-0.5, dim=-1)[0, 1:]
        a = attn.float().numpy()
        q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
        ratio = len(np.where(a > q3 + 1.5 * (q3 - q1))[0]) / n
        kept = torch.topk(attn, int(n * ratio)).indices.tolist()
        if plus:
            step = int(int(1 / ratio) / 3)
            kept += [x for x in range(0, n - 1, step) if x not in kept]
        pruned = [j for j in range(n) if j not in kept]
        keys = k[b, 1:]
        merged = []
        for i in kept:
            others = [j for j in kept if j != i] + pruned
            sims = [float(torch.dot(keys[i] / keys[i].norm(), keys[j] / keys[j].norm())) for j in others]
            best = sorted(range(len(others)), key=lambda t: -sims[t])[:32]
            x = features[b, i].clone()
            for t in best:
                x = x + attn[others[t]] * features[b, others[t]]
            merged.append(x)
        extra = torch.zeros(c)
        for j in pruned:
            extra = extra + attn[j] * features[b, j]
        merged.append(extra)
        with torch.no_grad():
            out.append((kept, model.model.multi_modal_projector(torch.stack(merged)[None])[0]))
    return out


def _peaked(model):
    """The model with its last tower block's queries scaled up: a trained CLIP's [CLS] attention is peaked
    (PruMerge's outliers), a random one is flat and often has none."""
    tower = model.model.vision_tower
    with torch.no_grad():
        getattr(tower, "vision_model", tower).encoder.layers[-1].self_attn.q_proj.weight.mul_(8)
    return model


@pytest.mark.parametrize("method", ["prumerge", "prumerge_plus"])
@pytest.mark.parametrize("seed", [0, 1])
def test_prumerge_reference_equals_the_official_pipeline(method, seed):
    model = _peaked(_llava(seed))
    batch = _batch(model, seed=seed)
    reference = official_prumerge(model, batch, plus=method == "prumerge_plus")
    logits, recorded = wrapped_call(model, batch, method, variant="reference")
    for (kept, outputs), red in zip(reference, recorded):
        assert _kept_in_order(red.assignment, len(kept)) == kept
        torch.testing.assert_close(red.features, outputs, atol=1e-5, rtol=1e-5)
    emb, pos = _official_sequence(model, batch, [o for _, o in reference])
    torch.testing.assert_close(logits[0, -emb.shape[0]:], reference_logits(model, emb, pos), atol=1e-4, rtol=1e-4)


def test_prumerge_plus_reference_never_adds_the_last_patch():
    """One outlier of 16 patches: the official stride is ``int(int(16) / 3) = 5`` over ``arange(0, 15)``
    (0, 5, 10), where the default strides over all 16 patches and adds patch 15 too."""
    n = 16
    attention = torch.full((n,), 0.01)
    attention[3] = 1.0
    keys = torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(n, 8, generator=torch.Generator().manual_seed(1))
    kept, _, _ = prumerge_reference(hidden, attention, keys, PruMergeConfig(variant="reference"), plus=True)
    assert kept.tolist() == [3, 0, 5, 10]
    sources, _, _ = prumerge_group(hidden, attention, keys, torch.arange(n), PruMergeConfig(), plus=True)
    assert sorted(sources.tolist()[:-1]) == [0, 3, 5, 10, 15]


def test_prumerge_default_reads_the_last_tower_layer():
    assert PruMergeConfig().layer == -1
    assert get_method("prumerge_plus").config_cls().layer == -1


# ----- VisionZip -------------------------------------------------------------------------------------------
def official_visionzip(model, batch, dominant: int, contextual: int):
    """VisionZip step by step as the official code does it: the [CLS] attention of block -2 summed over
    heads, its top ``dominant - 1`` patches and [CLS] kept in sequence order; the rest's head-mean keys of
    block -2, L2-normalised; ``contextual`` targets at stride ``rest // contextual``; every other token
    joins its most similar target, which becomes target + mean of its members; outputs
    ``[CLS, dominant, contextual]`` of the feature layer's hidden states, projected."""
    tower = model.model.vision_tower
    with torch.no_grad():
        out = tower(batch["pixel_values"], output_hidden_states=True, output_attentions=True)
    _, _, k = _tower_pass(model, batch, -2)
    heads = model.config.vision_config.num_attention_heads
    hidden = out.hidden_states[-2]
    result = []
    for b in range(hidden.shape[0]):
        attn = out.attentions[-2][b, :, 0, 1:].sum(0)
        top = (torch.topk(attn, dominant - 1).indices + 1).tolist()
        keep = [0, *sorted(top)]
        rest = [t for t in range(hidden.shape[1]) if t not in keep]
        metric = k[b].view(hidden.shape[1], heads, -1).mean(1)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        step = max(1, len(rest) // contextual)
        targets = list(range(0, len(rest), step))[:contextual]
        others = [t for t in range(len(rest)) if t not in targets]
        members = {t: [] for t in range(len(targets))}
        for o in others:
            sims = [float(metric[rest[o]] @ metric[rest[t]]) for t in targets]
            members[max(range(len(targets)), key=lambda t: (sims[t], -t))].append(rest[o])
        context = []
        for t, target in enumerate(targets):
            total = torch.zeros(hidden.shape[2])
            for m in members[t]:
                total = total + hidden[b, m]
            context.append(hidden[b, rest[target]] + total / max(1, len(members[t])))
        tokens = torch.stack([hidden[b, t] for t in keep] + context)
        with torch.no_grad():
            projected = model.model.multi_modal_projector(tokens[None])[0]
        result.append(([t - 1 for t in keep[1:]], [rest[t] - 1 for t in targets], projected))
    return result


@pytest.mark.parametrize("seed", [0, 1])
def test_visionzip_reference_equals_the_official_pipeline(seed):
    model = _llava(seed)
    batch = _batch(model, seed=seed)
    reference = official_visionzip(model, batch, dominant=9, contextual=4)
    logits, recorded = wrapped_call(model, batch, "visionzip", variant="reference", dominant=9, contextual=4)
    for (dominant, targets, outputs), red in zip(reference, recorded):
        assert red.features.shape[0] == 1 + len(dominant) + len(targets) == 13  # [CLS] + 8 patches + 4
        # output 0 is [CLS]; outputs 1..8 the dominant patches, ascending; then the contextual targets
        assert [int((red.assignment == 1 + j).nonzero()[0]) for j in range(len(dominant))] == dominant
        assert all(int(red.assignment[t]) >= 1 + len(dominant) for t in targets)
        torch.testing.assert_close(red.features, outputs, atol=1e-5, rtol=1e-5)
    emb, pos = _official_sequence(model, batch, [o for *_, o in reference])
    torch.testing.assert_close(logits[0, -emb.shape[0]:], reference_logits(model, emb, pos), atol=1e-4, rtol=1e-4)


def test_reference_variants_need_a_llava_1_5_model():
    from tokenreduce.testing.tiny import tiny_model

    with pytest.raises(ValueError, match=r"`variant`='reference' of 'visionzip' reproduces the official LLaVA-1\.5"):
        tr.wrap(tiny_model("llava_next"), "visionzip", variant="reference")
    with pytest.raises(ValueError, match="`variant` must be one of"):
        get_method("prumerge").config_cls(variant="official")
    with pytest.raises(ValueError, match="`keep` must be None with variant='reference'"):
        get_method("prumerge").config_cls(variant="reference", keep=0.25)


# ----- PyramidDrop -----------------------------------------------------------------------------------------
def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def official_pdrop(model, batch, layers, ratios):
    """PyramidDrop step by step as the official ``pdrop_rank_drop``: before layer K, layer K's own input norm
    and q / k projections on the hidden states entering it (RoPE at consecutive positions), the last prompt
    token's softmax attention averaged over heads, ``int(N * ratio)`` image tokens by it (sorted back),
    consecutive positions after the drop. Returns (kept image columns per stage, final logits, columns)."""
    lm = model.model.language_model
    ids = batch["input_ids"][0]
    emb = model.model.get_input_embeddings()(ids).detach().clone()
    emb[ids == IMAGE_TOKEN] = torch.cat(encoder_features(model, "image", batch))
    current = list(range(ids.numel()))  # original column of every column of the current sequence
    image = [c for c in current if int(ids[c]) == IMAGE_TOKEN]
    n_image = len(image)
    h = emb[None]
    kept_per_stage = {}
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            if i in layers:
                attn = layer.self_attn
                normed = layer.input_layernorm(h)
                length = h.shape[1]
                cos, sin = lm.rotary_emb(h, torch.arange(length)[None])
                q = _rope(attn.q_proj(normed).view(1, length, -1, attn.head_dim).transpose(1, 2), cos, sin)
                k = _rope(attn.k_proj(normed).view(1, length, -1, attn.head_dim).transpose(1, 2), cos, sin)
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # each query head reads its kv head
                weights = torch.softmax(q[0, :, -1:] @ k[0].transpose(1, 2) / math.sqrt(attn.head_dim), dim=-1)
                weights = weights.mean(0)[0]
                score = weights[[current.index(c) for c in image]]
                count = int(n_image * ratios[layers.index(i)])
                image = sorted(image[j] for j in torch.topk(score, count).indices.tolist())
                kept_per_stage[i] = image
                survivors = [c for c in current if int(ids[c]) != IMAGE_TOKEN or c in image]
                h = h[:, [current.index(c) for c in survivors]]
                current = survivors
            length = h.shape[1]
            cos, sin = lm.rotary_emb(h, torch.arange(length)[None])
            mask = torch.full((length, length), torch.finfo(h.dtype).min).triu(1)[None, None]
            h = layer(h, attention_mask=mask, position_ids=torch.arange(length)[None], position_embeddings=(cos, sin))
        logits = model.lm_head(lm.norm(h))[0]
    return kept_per_stage, logits, current


@pytest.mark.parametrize("seed", [0, 1])
def test_pdrop_reference_equals_the_official_ranking(seed):
    """Ratios 0.6 / 0.3 / 0.15 of 128 image tokens: the official keeps int() = 76 / 38 / 19 (the default's
    ceil: 77 / 39 / 20)."""
    model = _llava(seed)
    batch = _batch(model, seed=seed)
    layers, ratios = (1, 2, 3), (0.6, 0.3, 0.15)
    kept, ref_logits, columns = official_pdrop(model, batch, list(layers), list(ratios))
    tr.wrap(model, "pdrop", layers=layers, keep=ratios, variant="reference")
    try:
        with torch.no_grad():
            logits = model(**batch).logits
        stages = {s.layer: s for s in get_handle(model).llm_stage.stages}
    finally:
        tr.unwrap(model)
    ids = batch["input_ids"][0]
    for k in layers:
        got = [c for c in stages[k].columns[0].tolist() if int(ids[c]) == IMAGE_TOKEN]
        assert got == kept[k]
    assert [len(kept[k]) for k in layers] == [76, 38, 19]
    torch.testing.assert_close(logits[0, columns], ref_logits, atol=1e-4, rtol=1e-4)


def test_pdrop_default_scores_with_the_layer_before():
    """The default ranks with layer K-1's attention inputs: on these weights its kept set differs from the
    reference's at some stage (so the reference test above can tell the two apart)."""
    model = _llava(0)
    batch = _batch(model)
    kept = {}
    for variant in ("default", "reference"):
        tr.wrap(model, "pdrop", layers=(1, 2, 3), keep=(0.5, 0.25, 0.125), variant=variant)
        try:
            with torch.no_grad():
                model(**batch)
            kept[variant] = [s.columns[0].tolist() for s in get_handle(model).llm_stage.stages]
        finally:
            tr.unwrap(model)
    assert kept["default"] != kept["reference"]


# ----- ToMe --------------------------------------------------------------------------------------------------
def official_tome_step(x, size, metric, r, class_token):
    """One ToMe merge as the official ``bipartite_soft_matching`` + ``merge_wavg``, with loops: A = even, B =
    odd tokens; cosine scores; a class token's row is -inf; A tokens by decreasing best score, the first
    ``r`` merged (size-weighted) into their best B token; returns ``cat([unmerged A, B])``, unmerged A
    ascending when there is a class token, in score order otherwise."""
    n = x.shape[0]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
    best, score = [], []
    for i, a in enumerate(a_idx):
        sims = [float(unit[a] @ unit[b]) for b in b_idx]
        j = max(range(len(b_idx)), key=lambda t: (sims[t], -t))
        best.append(j)
        score.append(-math.inf if class_token and i == 0 else sims[j])
    ranked = sorted(range(len(a_idx)), key=lambda i: (-score[i], i))
    merged, unmerged = ranked[:r], ranked[r:]
    if class_token:
        unmerged = sorted(unmerged)
    total = {j: x[b_idx[j]] * size[b_idx[j]] for j in range(len(b_idx))}
    sizes = {j: size[b_idx[j]].clone() for j in range(len(b_idx))}
    for i in merged:
        total[best[i]] = total[best[i]] + x[a_idx[i]] * size[a_idx[i]]
        sizes[best[i]] = sizes[best[i]] + size[a_idx[i]]
    out = [x[a_idx[i]] for i in unmerged] + [total[j] / sizes[j] for j in range(len(b_idx))]
    out_size = [size[a_idx[i]] for i in unmerged] + [sizes[j] for j in range(len(b_idx))]
    return torch.stack(out), torch.stack(out_size)


@pytest.mark.parametrize("prefix", [0, 1])
def test_tome_reference_order_equals_official_merges(prefix):
    """Three merges in a row: after the first, the official order pairs different tokens than spatial order
    would; values and sizes agree through all three."""
    gen = torch.Generator().manual_seed(prefix)
    x = torch.randn(1, 23, 6, generator=gen)
    size = torch.ones(1, 23)
    slot = torch.arange(23)[None]
    ref_x, ref_size = x[0], size[0]
    spatial_x, spatial_size, spatial_slot = x, size, slot
    for r in (5, 4, 3):
        ref_x, ref_size = official_tome_step(ref_x, ref_size, ref_x, r, class_token=prefix == 1)
        x, size, slot = merge_step(x, size, x, slot, r, prefix, order="reference")
        torch.testing.assert_close(x[0], ref_x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(size[0], ref_size)
        spatial_x, spatial_size, spatial_slot = merge_step(spatial_x, spatial_size, spatial_x, spatial_slot, r, prefix)
    # every original token's slot holds the token it was merged into
    members = [(slot[0] == j).nonzero().flatten() for j in range(x.shape[1])]
    assert sum(m.numel() for m in members) == 23
    assert not torch.allclose(spatial_x.sort(dim=1).values, x.sort(dim=1).values)


def test_tome_reference_runs_in_a_timm_vit():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64, depth=3).eval()
    images = torch.randn(2, 3, 64, 64)
    out = {}
    for variant in ("default", "reference"):
        tr.wrap(vit, "tome", r=4, variant=variant)
        try:
            with torch.no_grad():
                out[variant] = vit(images)
            sample = tr.stats(vit).samples[0].items[0]
        finally:
            tr.unwrap(vit)
        assert sample.tokens_out == 16 - 3 * 4
    assert not torch.allclose(out["default"], out["reference"])


# ----- DivPrune ----------------------------------------------------------------------------------------------
def official_divprune(x, ratio):
    """DivPrune as the official code: ``int(round(ratio * N))`` picks; the first maximises its column's
    second-smallest distance (1 - cosine), each next the smallest distance to the picks so far."""
    n = x.shape[0]
    unit = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - unit @ unit.T
    picks = []
    for i in range(round(ratio * n)):
        if i == 0:
            scores = [sorted(dist[:, j].tolist())[1] for j in range(n)]
        else:
            scores = [min(float(dist[s, j]) for s in picks) for j in range(n)]
        picks.append(max(range(n), key=lambda j: (scores[j], -j)))
    return picks


def test_divprune_reference_count_and_selection():
    """``keep=0.098`` of 576 tokens: the official ``int(round(56.45)) = 56``; the default's ceil keeps 57."""
    x = torch.randn(576, 16, generator=torch.Generator().manual_seed(0))
    layout = TokenLayout.flat("image", 576)
    context = ReduceContext(layout=layout, modality="image", row=0, item=0)
    spec = get_method("divprune")
    reference = spec.method_cls(spec.config_cls(keep=0.098, variant="reference")).reduce(x, context)
    default = spec.method_cls(spec.config_cls(keep=0.098)).reduce(x, context)
    assert sorted(reference.sources.tolist()) == sorted(official_divprune(x, 0.098))
    assert reference.sources.numel() == 56 and default.sources.numel() == 57
    assert spec.config_cls(variant="reference").renumber_positions


def official_dart(model, batch, layer, keep, pivot_image, pivot_text):
    """DART step by step as the official ``get_retained_image_token`` on LLaVA-1.5 (one unpadded row, one
    image block): layer K-1's post-RoPE keys flattened over heads give the L1 norms; ``pivot_image`` image
    and ``pivot_text`` later tokens by ``topk``; a Python set of their positions; for each of its items in
    the set's order, ``keep // pivots`` of the remaining image tokens by ``topk`` of the negated cosine
    similarity of the final-normed states entering layer K; the text pivots left out. Layers >= K run on the
    kept columns at their original positions with a causal mask. Returns (kept image columns, logits,
    columns)."""
    lm = model.model.language_model
    ids = batch["input_ids"][0]
    emb = model.model.get_input_embeddings()(ids).detach().clone()
    emb[ids == IMAGE_TOKEN] = torch.cat(encoder_features(model, "image", batch))
    image = [c for c in range(ids.numel()) if int(ids[c]) == IMAGE_TOKEN]
    start, length = image[0], len(image)
    assert image == list(range(start, start + length))  # one block, as the official code assumes
    h = emb[None]
    positions = torch.arange(ids.numel())
    with torch.no_grad():
        for i, block in enumerate(lm.layers):
            if i == layer - 1:
                attn = block.self_attn
                n = h.shape[1]
                cos, sin = lm.rotary_emb(h, positions[None])
                k = _rope(attn.k_proj(block.input_layernorm(h)).view(1, n, -1, attn.head_dim).transpose(1, 2), cos, sin)
                k_states = k.permute(0, 2, 1, 3).reshape(1, n, -1)[0]
            if i == layer:
                state = lm.norm(h)[0]
                per_pivot = keep // (pivot_image + pivot_text)
                image_norm = k_states[start:start + length].abs().sum(-1)
                query_norm = k_states[start + length:].abs().sum(-1)
                image_pivots = (image_norm.topk(pivot_image).indices + start).tolist()
                query_pivots = (query_norm.topk(pivot_text).indices + start + length).tolist()
                kept = set(image_pivots + query_pivots)
                valid = set(range(start, start + length))
                valid.difference_update(image_pivots)
                for item in list(kept.copy()):
                    candidates = list(valid)
                    similarity = -torch.nn.functional.cosine_similarity(state[item], state[candidates], dim=-1)
                    chosen = [candidates[j] for j in similarity.topk(per_pivot).indices.tolist()]
                    kept.update(chosen)
                    valid.difference_update(chosen)
                kept.difference_update(query_pivots)
                columns = sorted(list(range(start)) + sorted(kept) + list(range(start + length, ids.numel())))
                h, positions = h[:, columns], torch.tensor(columns)
            n = h.shape[1]
            cos, sin = lm.rotary_emb(h, positions[None])
            mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
            h = block(h, attention_mask=mask, position_ids=positions[None], position_embeddings=(cos, sin))
        logits = model.lm_head(lm.norm(h))[0]
    return sorted(kept), logits, columns


@pytest.mark.parametrize("seed", [0, 1])
def test_dart_reference_equals_the_official_selection(seed):
    """30 of 64 image tokens with 4 + 4 pivots: the official keeps 4 + 8 * (30 // 8) = 28 (the default: 30)."""
    model = _llava(seed)
    batch = _batch(model, images=1, seed=seed)
    options = dict(layer=2, keep=30, pivot_image=4, pivot_text=4)
    kept, ref_logits, columns = official_dart(model, batch, **options)
    got = {}
    for variant in ("reference", "default"):
        tr.wrap(model, "dart", variant=variant, **options)
        try:
            with torch.no_grad():
                logits = model(**batch).logits
            ids = batch["input_ids"][0]
            got[variant] = [c for c in get_handle(model).llm_stage.stages[0].columns[0].tolist()
                            if int(ids[c]) == IMAGE_TOKEN]
        finally:
            tr.unwrap(model)
        if variant == "reference":
            torch.testing.assert_close(logits[0, columns], ref_logits, atol=1e-4, rtol=1e-4)
    assert got["reference"] == kept and len(kept) == 28
    assert len(got["default"]) == 30


# ----- every baseline has the switch -------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["prumerge", "prumerge_plus", "visionzip", "pdrop", "tome", "tome_projector",
                                    "divprune", "dart", "evs"])
def test_every_baseline_has_a_reference_variant(method):
    config = get_method(method).config_cls(variant="reference")
    assert config.variant == "reference"
    assert get_method(method).config_cls().variant == "default"
    assert type(config).from_dict(config.to_dict()) == config
