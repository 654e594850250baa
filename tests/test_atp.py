"""ATP: scores, spatial augmented pruning, thresholds, heads, soft-mask training (the llm-stage oracles run
ATP through tests/test_llm_stage.py's table)."""

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.api import get_handle
from tokenreduce.core.llm import LLMContext
from tokenreduce.core.sequence import column_index
from tokenreduce.ops.llm import average_keep
from tokenreduce.plugins.atp import ATPConfig, ATPMethod, ThresholdHeads
from tokenreduce.plugins.atp.scores import normal_quantile, spatial_sample
from tokenreduce.plugins.atp.training import SoftMaskATP, budget_loss, train_heads
from tokenreduce.testing.tiny import RowSpec, default_rows, tiny_batch, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llava", num_layers=8)


def test_counts_differ_per_instance_and_equal_the_definition(model):
    """Each instance keeps its own count at each stage: the counts of ATP's definition on the unwrapped
    model (tests/test_llm_stage.py's reference), which differ between rows."""
    from .test_llm_stage import reference_run

    rows = [RowSpec(images=[(56, 56)] * (1 + i % 2), prefix=2 + i, suffix=3 + 2 * i, seed=10 + i) for i in range(4)]
    batch = tiny_batch(model, rows)
    options = dict(layers=(2, 4, 6), keep=(0.3, 0.6, 0.6), spatial_rates=(0.0, 0.0, 0.0))
    tr.wrap(model, "atp", **options)
    try:
        with torch.no_grad():
            model(**batch)
        counts = [tuple(s.layers.values()) for s in tr.stats(model).samples]
    finally:
        tr.unwrap(model)
    _, kept = reference_run(model, batch, "atp", options)
    assert counts == [tuple(kept[k][r].numel() for k in options["layers"]) for r in range(4)]
    assert len(set(counts)) > 1, counts


def test_spatial_sampling_is_a_uniform_grid_per_segment(model, monkeypatch):
    batch = tiny_batch(model, default_rows("llava", n=1))
    seen = {}
    original = ATPMethod.select

    def recording(self, ctx: LLMContext):
        if ctx.layer == 2:  # the first stage sees the whole grid
            seen["sampled"] = spatial_sample(ctx, 0, 0.25)
            seen["tokens"] = ctx.visual_tokens[0]
            seen["layout"] = ctx.items[0].layout
        return original(self, ctx)

    monkeypatch.setattr(ATPMethod, "select", recording)
    tr.wrap(model, "atp", layers=(2, 4, 6), spatial_rates=(0.25, 0.0, 0.0))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        tr.unwrap(model)
    layout, idx = seen["layout"], seen["tokens"][seen["sampled"], 1]
    # a 4x4 grid at stride 2 samples rows 1, 3 and columns 1, 3
    assert sorted(zip(layout.rows[idx].tolist(), layout.cols[idx].tolist())) == [(1, 1), (1, 3), (3, 1), (3, 3)]


def test_training_free_threshold_rule(model, monkeypatch):
    batch = tiny_batch(model, default_rows("llava", n=2))
    seen = []
    original = ATPMethod.thresholds

    def recording(self, ctx, scores, features):
        theta_r, theta_s = original(self, ctx, scores, features)
        seen.append((scores, theta_r))
        return theta_r, theta_s

    monkeypatch.setattr(ATPMethod, "thresholds", recording)
    tr.wrap(model, "atp", layers=(2, 4, 6), keep=(0.3, 0.5, 0.5), spatial_rates=(0.0, 0.0, 0.0))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        tr.unwrap(model)
    scores, theta = seen[0]
    k = normal_quantile(0.7)
    for s, t in zip(scores, theta):
        torch.testing.assert_close(t, s.float().mean() + k * s.float().std())
    assert abs(normal_quantile(0.975) - 1.95996) < 1e-4


def test_cross_all_text_lets_text_before_the_image_score_it(model, monkeypatch):
    rows = [RowSpec(images=[(56, 56)], prefix=6, suffix=2, seed=3), RowSpec(images=[(56, 56)], prefix=4, suffix=5, seed=4)]
    batch = tiny_batch(model, rows)
    seen = {}
    original = ATPMethod.select

    def recording(self, ctx: LLMContext):
        if ctx.layer == 2:
            seen["causal"] = ctx.text_attention()
            seen["all"] = ctx.text_attention(causal=False)
            cols = column_index(ctx.text, device=ctx.hidden.device)
            q = ctx.capture.query_states(cols.clamp_min(0))
            k = ctx.capture.key_states()
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            logits = (q @ k.transpose(-1, -2)) * ctx.capture.module.scaling
            logits = logits.masked_fill(~ctx.attention_mask.bool()[:, None, None, :], float("-inf"))
            probs = logits.softmax(-1).mean(1)  # [B, Q, L], heads averaged
            valid = (cols >= 0).float()[..., None]
            seen["oracle"] = (probs * valid).sum(1) / valid.sum(1)
            seen["visual"] = ctx.visual
        return original(self, ctx)

    monkeypatch.setattr(ATPMethod, "select", recording)
    for cross in ("text", "all_text"):
        tr.wrap(model, "atp", layers=(2, 4, 6), spatial_rates=(0.0, 0.0, 0.0), cross=cross)
        try:
            with torch.no_grad():
                model(**batch)
        finally:
            tr.unwrap(model)
    torch.testing.assert_close(seen["all"], seen["oracle"], atol=1e-5, rtol=1e-4)
    for r, vis in enumerate(seen["visual"]):
        # the causal share comes from the suffix alone; the prefix adds its own, so the two differ
        assert float(seen["all"][r, vis].sum()) > 0 and not torch.allclose(seen["all"][r, vis], seen["causal"][r, vis])
    with pytest.raises(ValueError, match="`cross`"):
        ATPConfig(cross="question")


def test_current_layer_scores_are_that_layers_own_attention(model, monkeypatch):
    batch = tiny_batch(model, default_rows("llava", n=2))
    with torch.no_grad():
        eager = model(**batch, output_attentions=True).attentions[2]  # [B, H, L, L], nothing pruned yet
    seen = {}
    original = ATPMethod.select

    def recording(self, ctx: LLMContext):
        if ctx.layer == 2:
            current = ctx.at_current_layer()
            assert current.capture.module is get_handle(model).llm_stage.layers[2].self_attn
            seen["scores"], seen["text"] = current.text_attention(), ctx.text
        return original(self, ctx)

    monkeypatch.setattr(ATPMethod, "select", recording)
    tr.wrap(model, "atp", layers=(2, 4, 6), spatial_rates=(0.0, 0.0, 0.0), score_layer="current")
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        tr.unwrap(model)
    for r, cols in enumerate(seen["text"]):
        torch.testing.assert_close(seen["scores"][r], eager[r][:, cols].mean((0, 1)), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="`score_layer`"):
        ATPConfig(score_layer="next")


def test_current_layer_hands_its_projections_to_the_layer_it_scored_for(model, monkeypatch):
    # score_layer="current" projects every token's query and key at layer K to score them; layer K then
    # reads the kept tokens' projections (its q_proj / k_proj run on no rows) and computes what it computes
    # when it projects them itself.
    from tokenreduce.core.llm import LLMStage

    batch = tiny_batch(model, default_rows("llava", n=2))
    rows = {}

    def counting(name):  # rows the projection computed (the input after every pre-hook)
        def hook(module, args, output):
            rows.setdefault(name, []).append(args[0].shape[-2])
        return hook

    attn = model.model.language_model.layers[2].self_attn
    hooks = [attn.q_proj.register_forward_hook(counting("q"), prepend=True),
             attn.k_proj.register_forward_hook(counting("k"), prepend=True),
             attn.v_proj.register_forward_hook(counting("v"), prepend=True)]
    outputs = {}
    try:
        for reuse in (True, False):
            if not reuse:
                monkeypatch.setattr(LLMStage, "_reuse_projections", lambda self, *args: None)
            rows.clear()
            tr.wrap(model, "atp", layers=(2, 4, 6), spatial_rates=(0.0, 0.0, 0.0), score_layer="current")
            try:
                with torch.no_grad():
                    outputs[reuse] = model(**batch)
            finally:
                tr.unwrap(model)
            kept = rows["v"][-1]  # the layer's own value projection: the kept length
            length = batch["input_ids"].shape[1]
            assert rows["q"] == ([length, 0] if reuse else [length, kept]) and kept < length
            assert rows["k"] == rows["q"]
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(outputs[True].logits, outputs[False].logits, atol=0, rtol=0)
    for a, b in zip(outputs[True].past_key_values.layers, outputs[False].past_key_values.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=0, rtol=0)


def test_at_budget_averages_over_depth():
    cfg = ATPConfig.at_budget(0.25, num_layers=32)
    assert cfg.layers == (4, 14, 24)
    fractions, current = [], 1.0
    for kappa, rate in zip(cfg.keep, cfg.spatial_rates):
        current *= kappa + (1 - kappa) * rate
        fractions.append(current)
    assert abs(average_keep(list(cfg.layers), fractions, 32) - 0.25) < 1e-6
    with pytest.raises(ValueError, match="cannot reach 5%"):
        ATPConfig.at_budget(0.05, num_layers=8)
    shallow = ATPConfig.at_budget(0.25, num_layers=6)  # the default rates' floor (0.29) is over budget: halved
    assert shallow.spatial_rates == (0.125, 0.03125, 0.0)
    with pytest.raises(ValueError, match="cannot reach 25%"):  # given rates are kept as they are
        ATPConfig.at_budget(0.25, num_layers=6, spatial_rates=(0.25, 0.0625, 0.0))
    with pytest.raises(ValueError, match="`keep` needs one value per pruning layer"):
        ATPConfig(layers=(2, 4), keep=(0.5,), spatial_rates=(0.0, 0.0))


def test_budget_loss_matches_hand_computation():
    kept = {2: torch.tensor([0.5, 1.0]), 4: torch.tensor([0.25, 0.5])}
    loss, average = budget_loss(kept, 8, target=0.5, depth_weight=0.1, target_weight=1.0)
    # row 0: (2*1 + 2*0.5 + 4*0.25) / 8 = 0.5; row 1: (2 + 2 + 4*0.5) / 8 = 0.75
    torch.testing.assert_close(average, torch.tensor([0.5, 0.75]))
    depth = 0.1 * ((2 / 8) * torch.tensor([0.5, 1.0]) + (4 / 8) * torch.tensor([0.25, 0.5])).mean()
    torch.testing.assert_close(loss, depth + (0.625 - 0.5))
    # per-stage targets add |mean kept after each stage - its target|: |0.75 - 0.5| + |0.375 - 0.5|
    staged, _ = budget_loss(kept, 8, target=0.5, depth_weight=0.0, target_weight=1.0, stage_targets=(0.5, 0.5))
    torch.testing.assert_close(staged, torch.tensor(0.125 + 0.25 + 0.125))
    with pytest.raises(ValueError, match="one share per stage"):
        budget_loss(kept, 8, 0.5, 0.0, 1.0, stage_targets=(0.5,))


def test_soft_masks_at_open_thresholds_leave_the_model_unchanged(model):
    batch = tiny_batch(model, default_rows("llava"), labels=True)
    heads = ThresholdHeads([2, 4, 6])
    with torch.no_grad():
        for mlp in heads.mlps:
            mlp[-1].bias.fill_(-1e4)  # every threshold far below every score: masks are 1
        reference = model(**batch).logits
    trainer = SoftMaskATP(model, ATPConfig(layers=(2, 4, 6)), heads=heads)
    try:
        with torch.no_grad():
            out, kept = trainer(batch)
    finally:
        trainer.remove_hooks()
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[valid], reference[valid], atol=1e-4, rtol=1e-4)
    assert all(bool((v > 0.999).all()) for v in kept.values())


def test_training_reaches_the_target_and_heads_round_trip(model, tmp_path):
    batch = tiny_batch(model, default_rows("llava"), labels=True)
    config = ATPConfig.at_budget(0.3, num_layers=8, cross="all_text", self_weight=0.4, score_layer="current")
    heads, log = train_heads(model, [batch], config, steps=30, target=0.3, lr=5e-2, log_every=5)
    assert log[-1]["budget"] < log[0]["budget"]
    assert abs(log[-1]["average_kept"] - 0.3) < 0.05
    assert all(p.grad is None or not p.requires_grad for p in model.parameters())
    heads.save_pretrained(tmp_path)
    loaded = ThresholdHeads.from_pretrained(tmp_path)
    for a, b in zip(heads.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert (loaded.cross, loaded.self_weight, loaded.score_layer) == ("all_text", 0.4, "current")  # the scoring fit to
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    tr.wrap(model, "atp", layers=config.layers, spatial_rates=config.spatial_rates, keep=config.keep, heads=str(tmp_path))
    try:
        method = get_handle(model).method
        assert method.heads is not None and (method.cross, method.self_weight, method.score_layer) == (
            "all_text", 0.4, "current")
        with torch.no_grad():
            model(**inputs)
        assert tr.stats(model).summary()["layer_mean_keep_ratio"] < 0.6
    finally:
        tr.unwrap(model)
    with pytest.raises(ValueError, match=r"`heads` were trained for layers \[1, 4, 6\]"):
        tr.wrap(model, "atp", heads=str(tmp_path), layers=(2, 4, 6))
    with pytest.raises(ValueError, match="is neither a local directory nor a reachable hub repo"):
        tr.wrap(model, "atp", heads=str(tmp_path / "missing"), layers=(1, 4, 6))
