"""Oracles of dropping visual tokens inside the LLM, for every llm-stage method on every family that runs it.

Reference: the UNWRAPPED eager model, with the same tokens hidden from layers >= K by explicit 4D masks
(original positions, dropped tokens still present). Physical dropping must give the same logits at every
kept position and the same greedy tokens. Which tokens are hidden comes from the method's definition,
written here independently (``CASES``); a method registered without one is checked on its own recorded
choice (``reference_run``), so registering an llm-stage method puts it in the table.
"""

import math
import statistics
from contextlib import contextmanager
from statistics import NormalDist

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.api import get_handle
from tokenreduce.core.config import build_config
from tokenreduce.core.llm import LLMContext
from tokenreduce.core.registry import get_method
from tokenreduce.plugins.baselines.fastv import FastVConfig, FastVMethod
from tokenreduce.plugins.baselines.pdrop import PDropConfig
from tokenreduce.testing.tiny import (
    FAMILIES,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    RowSpec,
    default_rows,
    tiny_batch,
    tiny_model,
)

from .reference import hide_columns, llm_stage_reference, visual_tokens
from .tables import cases

NUM_LAYERS = 6
# Options of the methods whose definitions are written below (``reference_run``).
CASES = {
    "fastv": dict(layer=2, keep=0.3),
    "pdrop": dict(layers=(1, 3, 4), keep=(0.6, 0.4, 0.2)),
    # instance-adaptive counts (mean + k std thresholds) plus spatial sampling
    "atp": dict(layers=(1, 3, 4), keep=(0.5, 0.6, 0.6), spatial_rates=(0.25, 0.0, 0.0)),
    # picks that do not divide evenly over the pivots (2 image + up to 3 text)
    "dart": dict(layer=2, keep=0.45, pivot_image=2, pivot_text=3),
}


def _models(family):
    return tiny_model(family, num_layers=NUM_LAYERS), tiny_model(family, num_layers=NUM_LAYERS, attn_implementation="sdpa")


class _Models(dict):
    """Family -> (eager, sdpa) models, built on first use (a run of a few tests builds only theirs)."""

    def __missing__(self, family):
        self[family] = _models(family)
        return self[family]


@pytest.fixture(scope="module")
def models():
    return _Models()


def _kept_columns(model):
    """Per stage layer: [B, L'] original columns each row keeps (-1 padding), from the wrapped model."""
    return {s.layer: s.columns.clone() for s in get_handle(model).llm_stage.stages}


# ----- the methods' definitions, on attention probabilities of the unwrapped eager model ------------------
def _count(keep, n_input):
    """Tokens a budget keeps of the row's LLM-input visual tokens: a count, or ceil(share * count)."""
    if isinstance(keep, int):
        return keep
    return max(1, math.ceil(round(keep * n_input, 6)))


def _top(scores, visual, k):
    """The ``k`` best-scored columns of ``visual``; ties go to the lower column."""
    ranked = sorted(visual.tolist(), key=lambda c: (-float(scores[c]), c))
    return ranked[: min(k, len(ranked))]


def _fastv_pdrop_select(options, n_input):
    keeps = options["keep"] if isinstance(options["keep"], tuple) else (options["keep"],)

    def select(stage, attention, visual, text, row):
        if options.get("query", "last") == "text":  # mean over heads and every text query
            scores = attention[:, text].mean((0, 1))
        else:
            last = int(text.max())  # the row's last real token
            scores = attention[:, last].mean(0)
        return _top(scores, visual, _count(keeps[stage], n_input[row]))

    return select


def _atp_select(options, grid):
    """ATP's training-free rule: log of the mixed self / cross importance relative to uniform, kept above
    mean + z(1 - keep) * std of the row's scores, plus the tokens on the spatial sampling grid."""

    def select(stage, attention, visual, text, row):
        att = attention.double().mean(0)
        n = visual.numel()
        if n == 0:  # a row without visual tokens keeps none
            return []
        vis = visual.tolist()
        # self: mean over all visual queries, rescaled by how many of them see each key (causal)
        self_imp = att[visual][:, visual].mean(0) * n / torch.arange(n, 0, -1, dtype=torch.float64)
        self_imp = self_imp / self_imp.sum() * n
        cross = att[text][:, visual].mean(0)
        cross = cross / cross.sum() * n
        weight = options.get("self_weight", 0.5)
        scores = torch.log(weight * self_imp + (1 - weight) * cross).tolist()
        keep = options["keep"][stage]
        spread = statistics.stdev(scores) if n > 1 else 0.0
        threshold = statistics.fmean(scores) + NormalDist().inv_cdf(1 - keep) * spread
        rate = options["spatial_rates"][stage]
        stride = round(1 / math.sqrt(rate)) if rate > 0 else 0
        out = []
        for c, s in zip(vis, scores):
            layout, j = grid[row][c]
            sampled = stride and int(layout.rows[j]) % stride == stride // 2 and int(layout.cols[j]) % stride == stride // 2 \
                and bool(layout.content_mask[j])
            if s > threshold or sampled:
                out.append(c)
        return out or [vis[max(range(n), key=lambda i: scores[i])]]

    return select


def _dart_select(model, batch, options, n_input):
    """DART on the unwrapped model's own tensors: layer K-1's keys before the rotary embedding (its input norm
    and k_proj of the states entering it) give each token's L1 norm, the final norm of the states entering
    layer K its vector. Pivots: the ``pivot_image`` visual tokens and
    ``pivot_text`` text tokens after the row's last visual token of largest norm (ties to the lower column);
    the image pivots stay, and each pivot in turn (image ones first, by norm) takes its share of the
    remaining budget among the visual tokens not yet taken, lowest cosine similarity first."""
    layer = options["layer"]
    lm = model.model.language_model
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        attn = lm.layers[layer - 1].self_attn
        keys = attn.k_proj(lm.layers[layer - 1].input_layernorm(out.hidden_states[layer - 1]))
        keys = keys.view(*keys.shape[:2], -1, attn.head_dim)
        if getattr(attn, "k_norm", None) is not None:
            keys = attn.k_norm(keys)
        norms = keys.double().abs().sum((2, 3))  # before the rotary embedding
        states = lm.norm(out.hidden_states[layer]).double()

    def select(stage, attention, visual, text, row):
        vis = visual.tolist()
        if not vis:
            return []
        k = min(len(vis), _count(options["keep"], n_input[row]))
        by_norm = lambda cols: sorted(cols, key=lambda c: (-float(norms[row, c]), c))  # noqa: E731
        image = by_norm(vis)[: min(options["pivot_image"], k)]
        pivots = image + by_norm([c for c in text.tolist() if c > max(vis)])[: options["pivot_text"]]
        taken = set(image)
        share, extra = divmod(k - len(image), len(pivots))
        for j, pivot in enumerate(pivots):
            unit = states[row, pivot] / states[row, pivot].norm()
            free = [c for c in vis if c not in taken]
            free.sort(key=lambda c: (float(unit @ states[row, c] / states[row, c].norm()), c))
            taken.update(free[: share + (j < extra)])
        return sorted(taken)

    return select


def _recorded_select(recorded):
    """The choice a wrapped model made (``_visual_kept`` of its stages): the reference of a method whose
    definition is not written here, so the oracle checks the core's dropping of whatever it chose."""
    layers = sorted(recorded)

    def select(stage, attention, visual, text, row):
        return recorded[layers[stage]][row].tolist()

    return select


def _config(method, options=None):
    """The config a table case wraps ``method`` with: ``options``, else its row of ``CASES``, else half the
    visual tokens averaged over depth (a method whose definition is not written here)."""
    options = options or CASES.get(method)
    if options:
        return build_config(method, **options)
    return get_method(method).config_cls.at_budget(0.5, num_layers=NUM_LAYERS)


def reference_run(model, batch, method, options=None, renumber=False, recorded=None):
    """Logits and kept visual columns per stage of ``method`` by its definition (see :func:`llm_stage_reference`),
    or, given ``recorded`` (per stage layer and row, the visual columns a wrapped run kept), of that choice."""
    if recorded is not None:
        return llm_stage_reference(model, batch, sorted(recorded), _recorded_select(recorded), renumber=renumber)
    options = CASES[method] if options is None else options
    ids = batch["input_ids"]
    n_input = [int(((ids[r] == IMAGE_TOKEN) | (ids[r] == VIDEO_TOKEN)).sum()) for r in range(ids.shape[0])]
    if method == "atp":
        select = _atp_select(options, visual_tokens(model, batch))
    elif method == "dart":
        select = _dart_select(model, batch, options, n_input)
    else:
        select = _fastv_pdrop_select(options, n_input)
    layers = options["layers"] if "layers" in options else (options["layer"],)
    # ATP's score_layer="current" scores with layer K's own attention, the others with layer K-1's
    offset = 0 if options.get("score_layer") == "current" else 1
    return llm_stage_reference(model, batch, layers, select, renumber=renumber, score_offset=offset)


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


def _run_wrapped(model, batch, method, generate=False, **options):
    with wrapped(model, _config(method, options)):
        out = model.generate(**batch, max_new_tokens=10, do_sample=False) if generate else model(**batch).logits
        return out, _kept_columns(model), tr.stats(model).last


def _visual_kept(columns, batch):
    """Per stage and row: the visual columns among a wrapped model's kept columns."""
    ids = batch["input_ids"]
    out = {}
    for layer, cols in columns.items():
        out[layer] = []
        for r in range(cols.shape[0]):
            c = cols[r][cols[r] >= 0]
            out[layer].append(c[(ids[r, c] == IMAGE_TOKEN) | (ids[r, c] == VIDEO_TOKEN)])
    return out


LLM_CASES = cases("llm")
LLM_IDS = [f"{m}-{f}" for m, f in LLM_CASES]


def _reference_of(model, batch, method, columns):
    """The definition's run where ``CASES`` writes one, else the wrapped run's own choice (``columns``)."""
    if method in CASES:
        return reference_run(model, batch, method)
    return reference_run(model, batch, method, recorded=_visual_kept(columns, batch))


@pytest.mark.parametrize("method, family", LLM_CASES, ids=LLM_IDS)
@pytest.mark.parametrize("rows", [1, 3], ids=["B1", "B3"])
def test_forward_equals_reference_of_the_definition(models, family, method, rows):
    """Which tokens each stage keeps, how many, and every output column (dropped ones included) equal the
    method's definition computed on the unwrapped eager model."""
    eager, _ = models[family]
    batch = tiny_batch(eager, default_rows(family, n=rows, video=True))
    logits, columns, samples = _run_wrapped(eager, batch, method)
    reference, kept = _reference_of(eager, batch, method, columns)
    got = _visual_kept(columns, batch)
    assert sorted(got) == sorted(kept)
    for layer in kept:
        for r in range(rows):
            assert got[layer][r].tolist() == kept[layer][r].tolist(), f"stage {layer} row {r}"
            assert samples[r].layers[layer] == kept[layer][r].numel()
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], reference[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method, family", LLM_CASES, ids=LLM_IDS)
@pytest.mark.parametrize("rows", [1, 3], ids=["B1", "B3"])
def test_generate_equals_reference_of_the_definition(models, family, method, rows):
    eager, _ = models[family]
    batch = tiny_batch(eager, default_rows(family, n=rows, video=True))
    tokens, columns, _ = _run_wrapped(eager, batch, method, generate=True)
    _, kept = _reference_of(eager, batch, method, columns)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    is_visual = (ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)
    prompt = {k: [torch.cat([(mask[r].bool() & ~is_visual[r]).nonzero().flatten(), v[r]]) for r in range(rows)]
              for k, v in kept.items()}
    with hide_columns(eager, prompt, ids.shape[1]), torch.no_grad():
        reference = eager.generate(**batch, max_new_tokens=10, do_sample=False)
    assert torch.equal(tokens[:, : ids.shape[1]], ids)
    assert tokens.tolist() == reference.tolist()


@pytest.mark.parametrize("method", sorted({m for m, _ in LLM_CASES}))
def test_dropping_equals_masking_of_the_methods_own_choice(models, method):
    """The oracle a method registered without a written definition gets (every method here, at its budget
    config): the physical drop of what the wrapped model chose equals hiding the same tokens by masks."""
    eager, _ = models["llava"]
    batch = tiny_batch(eager, default_rows("llava", n=3))
    with wrapped(eager, get_method(method).config_cls.at_budget(0.5, num_layers=NUM_LAYERS)):
        logits = eager(**batch).logits
        columns = _kept_columns(eager)
    recorded = _visual_kept(columns, batch)
    ids = batch["input_ids"]
    n_visual = ((ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)).sum(1).tolist()
    last = recorded[max(recorded)]
    assert any(last[r].numel() < n_visual[r] for r in range(3)), "nothing dropped: the comparison would be vacuous"
    reference, _ = reference_run(eager, batch, method, recorded=recorded)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], reference[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_equals_eager_and_cache_lengths(models, family):
    eager, sdpa = models[family]
    batch = tiny_batch(eager, default_rows(family, video=True))
    reference, kept = reference_run(eager, batch, "pdrop")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    text = [int(mask[r].sum()) - int(((ids[r] == IMAGE_TOKEN) | (ids[r] == VIDEO_TOKEN)).sum()) for r in range(3)]
    # layers before the first stage hold the prompt; from a stage on, the longest row's text + kept tokens
    expected, length = {}, ids.shape[1]
    for i in range(NUM_LAYERS):
        stage = max((k for k in kept if k <= i), default=None)
        expected[i] = length if stage is None else max(text[r] + kept[stage][r].numel() for r in range(3))
    for model in (eager, sdpa):
        with wrapped(model, "pdrop", **CASES["pdrop"]):
            out = model(**batch, use_cache=True)
        assert {i: out.cache.layers[i].keys.shape[2] for i in range(NUM_LAYERS)} == expected
        valid = mask.bool()
        torch.testing.assert_close(out.logits[valid], reference[valid], atol=1e-4, rtol=1e-4)


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


@pytest.mark.parametrize("method, options", [
    ("fastv", dict(layer=2, keep=7)),
    ("fastv", dict(layer=3, keep=0.37, query="text")),
    ("fastv", dict(layer=1, keep=1.0)),
    ("pdrop", dict(layers=(1, 2, 4), keep=(0.55, 0.33, 0.1), query="text")),
    ("pdrop", dict(layers=(2, 5), keep=(0.49, 0.49))),
    ("atp", dict(layers=(2, 4), keep=(0.3, 0.7), spatial_rates=(0.0, 0.1))),
    # more text pivots asked than text tokens follow the visual ones: only those serve
    ("dart", dict(layer=2, keep=0.37, pivot_image=1, pivot_text=40)),
    ("dart", dict(layer=3, keep=5, pivot_image=6, pivot_text=2)),
], ids=["fastv-count", "fastv-text-0.37", "fastv-all", "pdrop-text-uneven", "pdrop-equal", "atp-uneven",
        "dart-few-text", "dart-pivots-over-budget"])
def test_counts_at_budgets_that_do_not_divide(models, method, options):
    """Budgets whose share of the visual count is not whole (48 * 0.37 = 17.76 keeps 18), by the
    definition, on rows with different visual counts."""
    eager, _ = models["llava_onevision"]
    batch = tiny_batch(eager, default_rows("llava_onevision", video=True))
    logits, columns, samples = _run_wrapped(eager, batch, method, **options)
    reference, kept = reference_run(eager, batch, method, options)
    got = _visual_kept(columns, batch)
    for layer in kept:
        for r in range(3):
            assert got[layer][r].tolist() == kept[layer][r].tolist(), f"stage {layer} row {r}"
            assert samples[r].layers[layer] == kept[layer][r].numel()
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], reference[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_renumbered_positions_equal_reference(models, family):
    """With ``renumber_positions`` the kept tokens read their ranks as positions from layer K on (on every
    M-RoPE axis alike for Qwen), in prefill and in every decode step."""
    eager, _ = models[family]
    batch = tiny_batch(eager, default_rows(family))
    options = dict(layer=2, keep=0.25)
    decode = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with wrapped(eager, "fastv", renumber_positions=True, **options):
        generated = eager.generate(**batch, **decode)
        logits = eager(**batch).logits
    reference, kept = reference_run(eager, batch, "fastv", options, renumber=True)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], reference[valid], atol=1e-4, rtol=1e-4)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    is_visual = (ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)
    prompt = {2: [torch.cat([(mask[r].bool() & ~is_visual[r]).nonzero().flatten(), kept[2][r]])
                  for r in range(ids.shape[0])]}
    with hide_columns(eager, prompt, ids.shape[1], renumber=True), torch.no_grad():
        expected = eager.generate(**batch, **decode)
    assert generated.sequences.tolist() == expected.sequences.tolist()
    # every decode step's logits: the prompt's keys and the new queries read positions on one scale
    torch.testing.assert_close(torch.stack(generated.logits), torch.stack(expected.logits), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_loss_covers_dropped_columns(models, family):
    """Outside generate the loss reads every column: kept ones and dropped ones (their state at drop time)."""
    eager, _ = models[family]
    batch = tiny_batch(eager, default_rows(family), labels=True)
    with wrapped(eager, "pdrop", **CASES["pdrop"]):
        loss = eager(**batch).loss
    labels = batch.pop("labels")
    reference, _ = reference_run(eager, batch, "pdrop")
    expected = torch.nn.functional.cross_entropy(
        reference[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 3], ids=["B1", "B3"])
def test_dropped_states_scattered_before_the_norm_equal_those_scattered_after_it(models, rows):
    """Outside generate the dropped states go back into the final norm's input (one norm over the sequence),
    unless hidden states are recorded (their last one is the norm's output, at the pruned length): then they
    are normed per stage and scattered after the model. Both give the same logits, bit for bit."""
    eager, _ = models["llava"]
    batch = tiny_batch(eager, default_rows("llava", n=rows))
    with wrapped(eager, "pdrop", **CASES["pdrop"]), torch.no_grad():
        before_norm = eager(**batch).logits
        recorded = eager(**batch, output_hidden_states=True)
    assert torch.equal(before_norm, recorded.logits)
    assert recorded.hidden_states[-1].shape[1] < batch["input_ids"].shape[1]


def test_layer_out_of_range_is_explained(models):
    eager, _ = models["llava"]
    with pytest.raises(ValueError, match=r"`layer` must be in \[1, 5\] for this model \(6 decoder layers\), got 9"):
        tr.wrap(eager, "fastv", layer=9)
    with pytest.raises(ValueError, match="`layers` must be strictly increasing"):
        tr.wrap(eager, "pdrop", layers=(3, 2, 4))
    assert get_handle(eager) is None


def test_budget_averaged_over_depth():
    from tokenreduce.ops.llm import average_keep
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


@pytest.mark.parametrize("budget, num_layers", [(0.3, 7), (0.45, 11), (0.37, 32)])
def test_budgets_averaged_over_depth_at_uneven_values(budget, num_layers):
    """The configs' keep shares average ``budget`` over the layers (computed here by hand: the first layer
    of each stage on, the stage's share), at depths and budgets that do not divide."""
    from tokenreduce.plugins.baselines.fastv import FastVConfig
    from tokenreduce.plugins.baselines.pdrop import PDropConfig

    def by_hand(layers, keeps):
        shares = [1.0] * num_layers
        for layer, keep in zip(layers, keeps):
            shares[layer:] = [keep] * (num_layers - layer)
        return sum(shares) / num_layers

    fastv = FastVConfig.at_budget(budget, num_layers=num_layers)
    assert fastv.layer == min(2, max(1, math.ceil(num_layers * budget) - 1))
    assert by_hand([fastv.layer], [fastv.keep]) == pytest.approx(budget, abs=1e-9)
    pdrop = PDropConfig.at_budget(budget, num_layers=num_layers)
    assert pdrop.layers == tuple(sorted({max(1, round(num_layers * f)) for f in (1 / 16, 1 / 4, 1 / 2)}))
    ratio = pdrop.keep[0]
    assert pdrop.keep == pytest.approx(tuple(ratio ** (i + 1) for i in range(len(pdrop.layers))))
    assert by_hand(pdrop.layers, pdrop.keep) == pytest.approx(budget, abs=1e-6)
    # without a depth, the share kept after the last stage
    assert FastVConfig.at_budget(budget).keep == budget
    assert PDropConfig.at_budget(budget).keep[-1] == pytest.approx(budget)


# ----- configs of the in-LLM baselines ---------------------------------------------------------------------
@pytest.mark.parametrize("build, message", [
    (lambda: FastVConfig(layer=0), r"`layer` must be in [1, inf], got 0"),
    (lambda: FastVConfig(layer=1.5), r"`layer` must be an int, got 1.5"),
    (lambda: FastVConfig(keep=0), r"`keep` as a token count must be >= 1, got 0"),
    (lambda: FastVConfig(query="all"), r"`query` must be one of ('last', 'text'), got 'all'"),
    (lambda: FastVConfig.at_budget(0.0), r"`budget` must be in (0.0, 1.0], got 0.0"),
    (lambda: FastVConfig.at_budget(1.5, num_layers=8), r"`budget` must be in (0.0, 1.0], got 1.5"),
    (lambda: FastVConfig.at_budget(-0.5), r"`budget` must be in (0.0, 1.0], got -0.5"),
    (lambda: FastVConfig.at_budget(0.25, num_layers=8, layer=2),
     "fastv with `layer`=2 cannot average 25% of the visual tokens over 8 layers (the first 2 layers see all of "
     "them); choose a smaller `layer` or a larger budget"),
    # at the smallest `layer` only the budget can change
    (lambda: FastVConfig.at_budget(0.1, num_layers=6),
     "fastv with `layer`=1 cannot average 10% of the visual tokens over 6 layers (the first layer sees all of "
     "them); choose a budget above 17%"),
    (lambda: PDropConfig(layers=(), keep=()), "`layers` and `keep` must be non-empty and of equal length, got 0 and 0"),
    (lambda: PDropConfig(layers=(1, 2), keep=(0.5,)), "`layers` and `keep` must be non-empty and of equal length, got 2 and 1"),
    (lambda: PDropConfig(layers=(1,), keep=(0.0,)), r"`keep` must be in (0.0, 1.0], got 0.0"),
    (lambda: PDropConfig(layers=(1,), keep=(1.5,)), r"`keep` must be in (0.0, 1.0], got 1.5"),
    (lambda: PDropConfig(layers=(1, 2), keep=(0.2, 0.5)), "`keep` must be non-increasing, got (0.2, 0.5)"),
    (lambda: PDropConfig(query="all"), r"`query` must be one of ('last', 'text'), got 'all'"),
    (lambda: PDropConfig.at_budget(0.0), r"`budget` must be in (0.0, 1.0], got 0.0"),
    (lambda: PDropConfig.at_budget(1.5), r"`budget` must be in (0.0, 1.0], got 1.5"),
    # the floor of stages at 2/8/16 of 32 is 2/32 = 6.25 %, plus what the smallest ratio keeps
    (lambda: PDropConfig.at_budget(0.0625 + 1e-9, num_layers=32),
     "pdrop with stages at (2, 8, 16) cannot average 6% of the visual tokens over 32 layers"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_llm_config_errors_are_exact(build, message):
    with pytest.raises(ValueError) as info:
        build()
    assert str(info.value) == message


def test_llm_config_budgets_and_options():
    """Options given to ``at_budget`` reach the config; the schedules' arithmetic, by hand."""
    assert FastVConfig.at_budget(0.5, query="text").query == "text"
    assert FastVConfig.at_budget(0.5, num_layers=8, query="text").query == "text"
    assert FastVConfig.at_budget(0.5, num_layers=8, layer=3).layer == 3
    # 8 layers at 20 %: K = max(1, ceil(1.6) - 1) = 1, and (1 + 7 * keep) / 8 = 0.2 gives keep = 0.6 / 7
    config = FastVConfig.at_budget(0.2, num_layers=8)
    assert (config.layer, config.keep) == (1, pytest.approx((1.6 - 1) / 7))
    assert PDropConfig.at_budget(0.125).keep == pytest.approx((0.5, 0.25, 0.125))
    assert PDropConfig.at_budget(0.125, query="text").query == "text"
    assert PDropConfig.at_budget(0.3, num_layers=32, query="text").query == "text"
    assert PDropConfig.at_budget(0.3, num_layers=24).layers == (2, 6, 12)  # 24/16 = 1.5 rounds to 2
    just = PDropConfig.at_budget(0.0625 + 1e-6, num_layers=32)  # just above the floor: reachable
    assert just.layers == (2, 8, 16) and just.keep[0] < 0.01


@pytest.mark.parametrize("method, options, message", [
    ("fastv", dict(layer=6), r"`layer` must be in [1, 5] for this model (6 decoder layers), got 6"),
    ("pdrop", dict(layers=(1, 9), keep=(0.5, 0.25)), r"`layers` must be in [1, 5] for this model (6 decoder layers), got 9"),
])
def test_llm_config_layers_beyond_the_model(models, method, options, message):
    eager, _ = models["llava"]
    with pytest.raises(ValueError) as info:
        tr.wrap(eager, method, **options)
    assert str(info.value) == message
    assert get_handle(eager) is None


def test_llm_config_top_visual_ties_go_to_the_lower_column():
    from tokenreduce.ops.llm import top_visual

    visual = [torch.tensor([2, 3, 4, 5, 6, 7]), torch.tensor([], dtype=torch.long)]
    scores = torch.tensor([[0.0, 0.0, 0.5, 0.1, 0.5, 0.1, 0.5, 0.1], [0.0] * 8])
    ctx = LLMContext(layer=1, hidden=None, attention_mask=None, visual=visual, visual_tokens=None, text=None,
                     items=None, original_visual=[6, 0], capture=None)
    kept = top_visual(ctx, scores, 4)
    assert kept[0].tolist() == [0, 2, 4, 1] and kept[1].tolist() == []


@pytest.mark.parametrize("method, options", [
    ("fastv", dict(layer=2, keep=0.4)),
    ("fastv", dict(layer=2, keep=0.4, query="text")),
    ("atp", dict(layers=(1, 3), keep=(0.5, 0.5), spatial_rates=(0.25, 0.0), score_layer="current")),
    ("atp", dict(layers=(2, 4), keep=(0.4, 0.6), spatial_rates=(0.0, 0.0), self_weight=0.25)),
], ids=["fastv-no-cache", "fastv-text-query", "atp-current-layer", "atp-self-weight"])
def test_without_cache_and_with_a_text_only_row(models, method, options):
    """Scores from keys projected afresh (no cache to read them from, or layer K's own projections), a
    batch row with no visual token at all: kept sets, counts and every logit equal the definition's."""
    eager, _ = models["llava_onevision"]
    rows = [*default_rows("llava_onevision", video=True), RowSpec(prefix=5, suffix=4, seed=9)]
    batch = tiny_batch(eager, rows)
    with wrapped(eager, method, **options):
        logits = eager(**batch, use_cache=False).logits
        columns, samples = _kept_columns(eager), tr.stats(eager).last
    reference, kept = reference_run(eager, batch, method, options)
    got = _visual_kept(columns, batch)
    for layer in kept:
        for r in range(len(rows)):
            assert got[layer][r].tolist() == kept[layer][r].tolist(), f"stage {layer} row {r}"
            assert samples[r].layers[layer] == kept[layer][r].numel()
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], reference[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config, num_layers, expected", [
    (FastVConfig(), 3, [2]),  # deep enough: the paper's K = 2
    (FastVConfig(), 2, [1]),  # K = 2 has no layer after it: the deepest layer with one before it
    (FastVConfig(), 1, r"`layer` must be in [1, 0] for this model (1 decoder layers), got 2"),
    (FastVConfig(layer=1), 2, [1]),
    (FastVConfig(layer=3), 3, r"`layer` must be in [1, 2] for this model (3 decoder layers), got 3"),
    (PDropConfig(layers=(1, 2), keep=(0.5, 0.25)), 3, [1, 2]),
    (PDropConfig(layers=(1, 3), keep=(0.5, 0.25)), 3, r"`layers` must be in [1, 2] for this model (3 decoder layers), got 3"),
], ids=["fastv-K2-of-3", "fastv-K2-of-2", "fastv-of-1", "fastv-K1-of-2", "fastv-K3-of-3", "pdrop-fits", "pdrop-beyond"])
def test_llm_config_layers_on_shallow_models(config, num_layers, expected):
    """A stage at layer K needs layer K-1 to score it and must leave a layer to see the pruned sequence:
    K in [1, num_layers - 1]; only fastv's default K = 2 moves down on a 2-layer model."""
    from tokenreduce.plugins.baselines.pdrop import PDropMethod

    method = (FastVMethod if isinstance(config, FastVConfig) else PDropMethod)(config)
    if isinstance(expected, list):
        assert method.llm_layers(num_layers) == expected
        return
    with pytest.raises(ValueError) as info:
        method.llm_layers(num_layers)
    assert str(info.value) == expected


def test_bookkeeping_disabled_text_only_and_a_cache_the_stage_did_not_prune(models):
    """Around a reduced prefill that leaves its stages behind: a forward under ``tr.disabled``, a text-only
    forward, and a decode step on the disabled prefill's cache are each the plain model's, bit for bit; the
    text-only call leaves no stage behind."""
    eager, _ = models["llava"]
    batch = tiny_batch(eager, default_rows("llava"))
    text = {"input_ids": batch["input_ids"][:, -4:], "attention_mask": batch["attention_mask"][:, -4:]}

    def prefill_and_step():
        out = eager(**batch)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(nxt)], dim=1)
        step = eager(input_ids=nxt, attention_mask=mask, cache=out.past_key_values)
        return out.logits, step.logits

    with torch.no_grad():
        plain, plain_step = prefill_and_step()
        plain_text = eager(**text).logits
    with wrapped(eager, "fastv", layer=2, keep=0.25):
        reduced = eager(**batch).logits
        assert get_handle(eager).llm_stage.stages  # the reduced prefill's stages stay behind
        # the one stage's time, shared evenly by the three rows
        shares = [float(e) for sample in tr.stats(eager).last for e in sample.llm_elapsed]
        assert len(shares) == 3 and shares[0] > 0 and shares == [shares[0]] * 3
        assert [sample.llm_reducer_ms for sample in tr.stats(eager).last] == shares
        with tr.disabled(eager):
            out = eager(**batch)
        assert torch.equal(out.logits, plain)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(nxt)], dim=1)
        step = eager(input_ids=nxt, attention_mask=mask, cache=out.past_key_values).logits
        assert torch.equal(step, plain_step)
        assert torch.equal(eager(**text).logits, plain_text)
        assert get_handle(eager).llm_stage.stages == []  # nothing for the text-only call's decode to substitute
    assert not torch.equal(reduced, plain)


@pytest.mark.parametrize("method, options", [
    ("fastv", CASES["fastv"]), ("pdrop", CASES["pdrop"]), ("fastv", dict(layer=2, keep=2, query="text")),
], ids=["fastv", "pdrop", "fastv-text-query"])
def test_bookkeeping_a_visual_token_at_column_0(models, method, options):
    """A prompt that opens with its images (no BOS): column 0 is a visual token, kept or dropped, and its
    logits are the definition's like every other column's (the longest row has no padding before it). Row
    0 holds fewer text tokens than row 1: with ``query="text"`` its padded query slots must not score."""
    eager, _ = models["llava"]
    rows = [RowSpec(images=[(56, 56), (56, 56)], prefix=0, suffix=3, seed=3),
            RowSpec(images=[(56, 56)], prefix=2, suffix=6, seed=4)]
    batch = tiny_batch(eager, rows)
    # drop the BOS column: row 0 then opens with its image, row 1 loses a padding column
    assert batch["attention_mask"][1, 0] == 0
    batch.update(input_ids=batch["input_ids"][:, 1:], attention_mask=batch["attention_mask"][:, 1:])
    assert batch["input_ids"][0, 0] == IMAGE_TOKEN
    with wrapped(eager, method, **options):
        logits = eager(**batch).logits
        columns = _kept_columns(eager)
    reference, kept = reference_run(eager, batch, method, options)
    got = _visual_kept(columns, batch)
    for layer in kept:
        for r in range(len(rows)):
            assert got[layer][r].tolist() == kept[layer][r].tolist(), f"stage {layer} row {r}"
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], reference[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["fastv", "pdrop"])
def test_bookkeeping_a_call_without_attention_mask(models, method):
    """One row without ``attention_mask``: every column is real, as with a mask of ones, and the kept sets
    are the definition's."""
    eager, _ = models["llava"]
    batch = tiny_batch(eager, default_rows("llava", n=1))
    assert bool(batch["attention_mask"].all())
    with wrapped(eager, method, **CASES[method]):
        logits = eager(**{k: v for k, v in batch.items() if k != "attention_mask"}).logits
        columns = _kept_columns(eager)
    reference, kept = reference_run(eager, batch, method)
    got = _visual_kept(columns, batch)
    assert {layer: [c.tolist() for c in rows] for layer, rows in got.items()} == \
        {layer: [c.tolist() for c in rows] for layer, rows in kept.items()}
    torch.testing.assert_close(logits[0], reference[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_apply_rope_is_the_models_rotary_embedding_bit_for_bit(dtype):
    # The scores' queries and keys must be the ones the model attends with: transformers' own rotary
    # embedding is the reference, on the strided [B, H, Q, d] view a projection's output is read through.
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from tokenreduce.core.llm import apply_rope

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 7, 4 * 16, generator=g) * 3).to(dtype).view(2, 7, 4, 16).transpose(1, 2)
    cos, sin = (torch.randn(2, 7, 16, generator=g).to(dtype) for _ in range(2))
    want, _ = apply_rotary_pos_emb(x, x, cos, sin)
    assert torch.equal(apply_rope(x, cos, sin), want)
    assert torch.equal(apply_rope(x.contiguous(), cos, sin), want)
