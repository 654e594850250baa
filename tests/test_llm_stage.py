"""Oracles of dropping visual tokens inside the LLM (fastv, pdrop) on every family.

Reference: the UNWRAPPED eager model, with the same tokens hidden from layers >= K by explicit 4D masks
(original positions, dropped tokens still present). Physical dropping must give the same logits at every
kept position and the same greedy tokens.
"""

from contextlib import contextmanager

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.api import get_handle
from tokenreduce.core.llm import LLMContext
from tokenreduce.plugins.baselines.fastv import FastVMethod
from tokenreduce.testing.tiny import FAMILIES, default_rows, tiny_batch, tiny_model

NUM_LAYERS = 6
CASES = {
    "fastv": dict(layer=2, keep=0.3),
    "pdrop": dict(layers=(1, 3, 4), keep=(0.6, 0.4, 0.2)),
    # instance-adaptive counts (mean + k std thresholds) plus spatial sampling
    "atp": dict(layers=(1, 3, 4), keep=(0.5, 0.6, 0.6), spatial_rates=(0.25, 0.0, 0.0)),
}


def _models(family):
    return tiny_model(family, num_layers=NUM_LAYERS), tiny_model(family, num_layers=NUM_LAYERS, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def models():
    return {f: _models(f) for f in FAMILIES}


def _kept_columns(model):
    """Per stage layer: [B, L'] original columns each row keeps (-1 padding), from the wrapped model."""
    return {s.layer: s.columns.clone() for s in get_handle(model).llm_stage.stages}


def _masked_reference_hooks(model, kept, prompt_len):
    """Hooks hiding, from layers >= K, the prompt columns not kept at stage K (4D additive masks)."""
    lm = model.model.language_model
    state = {}
    handles = [lm.register_forward_pre_hook(lambda m, a, k: state.update(mask2d=k.get("attention_mask")), with_kwargs=True)]
    stage_layers = sorted(kept)

    def layer_hook(i):
        def hook(module, args, kwargs):
            stage = max((k for k in stage_layers if k <= i), default=None)
            if stage is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            b, q = hidden.shape[:2]
            cache = kwargs.get("cache")
            past = cache.get_seq_length(i) if cache is not None else 0
            kv = past + q
            allowed = torch.ones(b, q, kv, dtype=torch.bool)
            qpos = torch.arange(past, past + q)
            allowed &= torch.arange(kv)[None, None, :] <= qpos[None, :, None]
            mask2d = state.get("mask2d")
            if mask2d is not None:
                allowed &= mask2d[:, None, :kv].bool()
            keep = torch.zeros(b, kv, dtype=torch.bool)
            keep[:, prompt_len:] = True
            cols = kept[stage]
            for r in range(b):
                keep[r, cols[r][cols[r] >= 0]] = True
            allowed &= keep[:, None, :]
            mask = torch.zeros(b, 1, q, kv, dtype=hidden.dtype).masked_fill(~allowed[:, None], torch.finfo(hidden.dtype).min)
            kwargs["attention_mask"] = mask
            return args, kwargs
        return hook

    for i in range(min(stage_layers), len(lm.layers)):
        handles.append(lm.layers[i].register_forward_pre_hook(layer_hook(i), with_kwargs=True))
    return handles


@contextmanager
def wrapped(model, method, **options):
    """``model`` wrapped with ``method`` inside the block, without gradients; unwrapped on the way out."""
    tr.wrap(model, method, **options)
    try:
        with torch.no_grad():
            yield model
    finally:
        tr.unwrap(model)


def _recording_select(monkeypatch, seen, **reads):
    """Make ``FastVMethod.select`` record ``reads`` (name -> function of the context) and its choice."""
    original = FastVMethod.select

    def recording(self, ctx: LLMContext):
        seen.update({name: read(ctx) for name, read in reads.items()})
        seen["keep"] = original(self, ctx)
        return seen["keep"]

    monkeypatch.setattr(FastVMethod, "select", recording)


def _run_wrapped(model, batch, method, generate=False):
    with wrapped(model, method, **CASES[method]):
        out = model.generate(**batch, max_new_tokens=10, do_sample=False) if generate else model(**batch).logits
        return out, _kept_columns(model), tr.stats(model).last


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(CASES))
@pytest.mark.parametrize("rows", [1, 3], ids=["B1", "B3"])
def test_physical_drop_equals_mask_reference_forward(models, family, method, rows):
    eager, _ = models[family]
    batch = tiny_batch(eager, default_rows(family, n=rows, video=True))
    logits, kept, samples = _run_wrapped(eager, batch, method)
    handles = _masked_reference_hooks(eager, kept, batch["input_ids"].shape[1])
    try:
        with torch.no_grad():
            reference = eager(**batch).logits
    finally:
        for h in handles:
            h.remove()
    final = kept[max(kept)]
    for r in range(rows):
        cols = final[r][final[r] >= 0]
        torch.testing.assert_close(logits[r, cols], reference[r, cols], atol=1e-4, rtol=1e-4)
        assert samples[r].visual_tokens_out < samples[r].visual_tokens_in
        assert list(samples[r].layers) == sorted(kept)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(CASES))
@pytest.mark.parametrize("rows", [1, 3], ids=["B1", "B3"])
def test_physical_drop_equals_mask_reference_generate(models, family, method, rows):
    eager, _ = models[family]
    batch = tiny_batch(eager, default_rows(family, n=rows, video=True))
    tokens, kept, _ = _run_wrapped(eager, batch, method, generate=True)
    handles = _masked_reference_hooks(eager, kept, batch["input_ids"].shape[1])
    try:
        with torch.no_grad():
            reference = eager.generate(**batch, max_new_tokens=10, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(tokens[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    assert tokens.tolist() == reference.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_equals_eager_and_cache_lengths(models, family):
    eager, sdpa = models[family]
    batch = tiny_batch(eager, default_rows(family, video=True))
    outs = {}
    for name, model in (("eager", eager), ("sdpa", sdpa)):
        with wrapped(model, "pdrop", **CASES["pdrop"]):
            out = model(**batch, use_cache=True)
            kept = _kept_columns(model)
        outs[name] = out.logits
        cache = out.cache
        length = batch["input_ids"].shape[1]
        expected = {}
        for i in range(NUM_LAYERS):
            stage = max((k for k in kept if k <= i), default=None)
            expected[i] = length if stage is None else kept[stage].shape[1]
        assert {i: cache.layers[i].keys.shape[2] for i in range(NUM_LAYERS)} == expected
        # the padded length is the longest row's kept count: text + kept visual tokens
        for cols in kept.values():
            assert cols.shape[1] == int((cols >= 0).sum(1).max())
    torch.testing.assert_close(outs["sdpa"], outs["eager"], atol=1e-4, rtol=1e-4)


def test_scores_equal_eager_attention_of_layer_before(models, monkeypatch):
    eager, _ = models["llava"]
    batch = tiny_batch(eager, default_rows("llava"))
    seen = {}
    _recording_select(
        monkeypatch, seen, scores=LLMContext.last_token_attention, text=LLMContext.text_attention
    )
    with wrapped(eager, "fastv", layer=2, keep=0.5):
        eager(**batch)
    with torch.no_grad():
        attn = eager(**batch, output_attentions=True).attentions[1]  # layer K-1 = 1, [B, H, L, L]
    torch.testing.assert_close(seen["scores"], attn[:, :, -1].mean(1), atol=1e-5, rtol=1e-4)
    mask = batch["attention_mask"].bool() & (batch["input_ids"] != 999)
    expected = torch.stack([attn[r, :, mask[r]].mean(0).mean(0) for r in range(3)])
    torch.testing.assert_close(seen["text"], expected, atol=1e-5, rtol=1e-4)


def test_fastv_keeps_top_scored_tokens(models, monkeypatch):
    eager, _ = models["llava"]
    batch = tiny_batch(eager, default_rows("llava"))
    seen = {}
    _recording_select(
        monkeypatch,
        seen,
        ctx_visual=lambda ctx: [v.clone() for v in ctx.visual],
        scores=LLMContext.last_token_attention,
    )
    with wrapped(eager, "fastv", layer=2, keep=4):
        eager(**batch)
    for r in range(3):
        vis_scores = seen["scores"][r, seen["ctx_visual"][r]]
        assert set(seen["keep"][r].tolist()) == set(vis_scores.topk(4).indices.tolist())


def test_renumber_positions_in_llm_stage_runs_and_differs(models):
    eager, _ = models["llava"]
    batch = tiny_batch(eager, default_rows("llava"))
    logits, generated = [], []
    for renumber in (False, True):
        with wrapped(eager, "fastv", layer=2, keep=0.25, renumber_positions=renumber):
            generated.append(eager.generate(**batch, max_new_tokens=4, do_sample=False))
            logits.append(eager(**batch).logits[:, -1])
    assert generated[0].shape == generated[1].shape
    # the kept tokens are the same; only their positions after layer 2 changed
    assert not torch.allclose(logits[0], logits[1], atol=1e-5)


def test_layer_out_of_range_is_explained(models):
    eager, _ = models["llava"]
    with pytest.raises(ValueError, match=r"`layer` must be in \[1, 5\] for this model \(6 decoder layers\), got 9"):
        tr.wrap(eager, "fastv", layer=9)
    with pytest.raises(ValueError, match="`layers` must be strictly increasing"):
        tr.wrap(eager, "pdrop", layers=(3, 2, 4))
    assert get_handle(eager) is None


def test_budget_averaged_over_depth():
    from tokenreduce.plugins.baselines._llm import average_keep
    from tokenreduce.plugins.baselines.fastv import FastVConfig
    from tokenreduce.plugins.baselines.pdrop import PDropConfig

    cfg = FastVConfig.at_budget(0.25, num_layers=32)
    assert cfg.layer == 2 and abs(average_keep([2], [cfg.keep], 32) - 0.25) < 1e-9
    cfg = PDropConfig.at_budget(0.25, num_layers=32)
    assert cfg.layers == (2, 8, 16)
    assert abs(average_keep(list(cfg.layers), list(cfg.keep), 32) - 0.25) < 1e-6
    with pytest.raises(ValueError, match="cannot average 5%"):
        FastVConfig.at_budget(0.05, num_layers=8, layer=2)
    with pytest.raises(ValueError, match="cannot average 20%"):
        PDropConfig.at_budget(0.2, num_layers=32, layers=(8, 16, 24))
