"""ATP's config (validation, default layers, ``at_budget``) and its threshold rules against the definition,
written here step by step in plain Python on the unwrapped eager model's attention (issue #36: references
independent of the code under test, falsy option values, budgets that do not divide evenly)."""

import math
import statistics

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.api import get_handle
from tokenreduce.ops.llm import average_keep
from tokenreduce.plugins.atp import ATPConfig
from tokenreduce.plugins.atp.method import default_layers
from tokenreduce.testing.tiny import IMAGE_TOKEN, VIDEO_TOKEN, default_rows, tiny_batch, tiny_model

from .reference import llm_stage_reference, visual_tokens

NUM_LAYERS = 6


@pytest.fixture(scope="module")
def model():
    return tiny_model("llava_onevision", num_layers=NUM_LAYERS)


# ----- config ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_layers, expected", [
    (32, (4, 14, 24)),  # the public reimplementation's layers on LLaVA-1.5
    (6, (1, 3, 4)),     # round(0.75) = 1, round(2.625) = 3, round(4.5) = 4 (half to even)
    (8, (1, 4, 6)),     # round(1.0), round(3.5) = 4, round(6.0)
    (3, (1, 2)),        # round(0.375) = 0 -> 1, round(1.3125) = 1 -> one stage, round(2.25) = 2
    (2, (1,)),          # every stage at layer 1 (never layer 0, never past the last)
    (40, (5, 18, 30)),  # round(5.0), round(17.5) = 18, round(30.0)
])
def test_default_layers_are_the_depth_fractions_rounded(num_layers, expected):
    """4/32, 14/32 and 24/32 of the depth, rounded half to even, within [1, num_layers - 1], deduplicated."""
    by_hand = sorted({min(num_layers - 1, max(1, round(f * num_layers))) for f in (0.125, 0.4375, 0.75)})
    assert default_layers(num_layers) == expected == tuple(by_hand)


def test_config_accepts_the_bounds_and_falsy_values():
    """``keep=1.0``, a rate of 0 or 1, ``self_weight`` 0 or 1 and ``spatial_score_scale=0`` are allowed."""
    config = ATPConfig(layers=(1, 2), keep=(1.0, 0.25), spatial_rates=(0.0, 1.0), self_weight=0.0,
                       spatial_score_scale=0.0, threshold_rule="quantile", cross="all_text", score_layer="current")
    assert (config.keep, config.spatial_rates, config.self_weight, config.spatial_score_scale) == (
        (1.0, 0.25), (0.0, 1.0), 0.0, 0.0)
    assert ATPConfig(layers=[3], keep=[0.5], spatial_rates=[0.0], self_weight=1.0).layers == (3,)
    defaults = ATPConfig()
    assert defaults.layers is None and len(defaults.keep) == len(defaults.spatial_rates) == 3


@pytest.mark.parametrize("options, message", [
    (dict(layers=()), "`layers` must hold at least one decoder layer (or be None for the defaults), got ()"),
    (dict(keep=(0.0, 0.5, 0.5)), "`keep`"),
    (dict(keep=(0.5, 1.5, 0.5)), "`keep`"),
    (dict(spatial_rates=(0.25, -0.1, 0.0)), "`spatial_rates`"),
    (dict(spatial_rates=(0.25, 1.1, 0.0)), "`spatial_rates`"),
    (dict(threshold_rule="median"), "`threshold_rule`"),
    (dict(self_weight=1.5), "`self_weight`"),
    (dict(self_weight=-0.5), "`self_weight`"),
    (dict(score_layer="next"), "`score_layer`"),
    (dict(spatial_score_scale=-1.0), "`spatial_score_scale`"),
    (dict(keep=(0.5, 0.5)), "`keep` needs one value per pruning layer (3), got (0.5, 0.5)"),
    (dict(spatial_rates=(0.0,) * 4), "`spatial_rates` needs one value per pruning layer (3), got (0.0, 0.0, 0.0, 0.0)"),
    (dict(layers=(2, 4), keep=(0.5,) * 3, spatial_rates=(0.0,) * 2),
     "`keep` needs one value per pruning layer (2), got (0.5, 0.5, 0.5)"),
    (dict(layers=(4, 2), keep=(0.5,) * 2, spatial_rates=(0.0,) * 2), "`layers`"),
])
def test_config_refuses_values_naming_the_option(options, message):
    with pytest.raises(ValueError) as error:
        ATPConfig(**options)
    assert message in str(error.value)


def _achieved(config, num_layers):
    """The visual share kept averaged over the depth (or after the last stage), from the config's keep and
    rates: after stage i, ``prod_{j <= i} min(1, keep_j + (1 - keep_j) rate_j)``."""
    fractions, current = [], 1.0
    for kappa, rate in zip(config.keep, config.spatial_rates):
        current *= min(1.0, kappa + (1 - kappa) * rate)
        fractions.append(current)
    if num_layers is None:
        return fractions[-1]
    # tokens kept from each stage layer on: layers before the first keep everything
    total, bounds = 0.0, [0, *config.layers, num_layers]
    shares = [1.0, *fractions]
    for i, share in enumerate(shares):
        total += share * (bounds[i + 1] - bounds[i])
    return total / num_layers


@pytest.mark.parametrize("budget, num_layers, options, rates", [
    (0.37, 32, {}, (0.25, 0.0625, 0.0)),
    (0.37, 13, {}, None),  # default layers of a depth the fractions do not divide
    (0.3, None, {}, (0.25, 0.0625, 0.0)),  # no depth: the share after the last stage
    (0.5, 10, dict(layers=(2, 5)), (0.25, 0.0625)),  # given layers: the default rates cut to two stages
    (0.5, 10, dict(layers=(2, 5, 7, 8)), (0.25, 0.0625, 0.0, 0.0)),  # four stages: rates padded with 0
    (0.4, 12, dict(spatial_rates=(0.1, 0.0, 0.0)), (0.1, 0.0, 0.0)),  # given rates kept as given
    (0.42, 12, dict(spatial_rates=(0.0, 0.0, 0.0), threshold_rule="quantile", self_weight=0.0, cross="all_text"),
     (0.0, 0.0, 0.0)),
])
def test_at_budget_reaches_the_budget(budget, num_layers, options, rates):
    """The common keep found by ``at_budget`` gives ``budget`` by the averaging written above, and the options
    reach the config."""
    config = ATPConfig.at_budget(budget, num_layers=num_layers, **options)
    assert abs(_achieved(config, num_layers) - budget) < 1e-6
    assert len(set(config.keep)) == 1 and 0 < config.keep[0] <= 1
    if num_layers is not None:
        assert config.layers == tuple(options.get("layers", default_layers(num_layers)))
    else:
        assert config.layers is None
    if rates is not None:
        assert config.spatial_rates == rates
    for name in ("threshold_rule", "self_weight", "cross"):
        if name in options:
            assert getattr(config, name) == options[name]


def test_at_budget_scales_default_rates_down_to_fit():
    """On a shallow LLM the default rates' floor (kappa -> 0) exceeds a small budget: they are halved until
    it fits, and refused once even no sampling cannot reach it."""
    # 6 layers, stages at (1, 3, 4): floor of the default rates with keep -> 0:
    # (1 * 1 + 0.25 * 2 + 0.015625 * 1 + 0 * 2) / 6 = 0.2526 > 0.25, halved: 0.1250 + ... fits
    floor = (1 + 0.25 * 2 + 0.25 * 0.0625 + 0) / 6
    assert floor > 0.25
    config = ATPConfig.at_budget(0.25, num_layers=6)
    assert config.spatial_rates == (0.125, 0.03125, 0.0)
    # a budget whose floor needs a quarter of the default rates
    quarter = ATPConfig.at_budget(0.2, num_layers=6)
    assert quarter.spatial_rates == (0.0625, 0.015625, 0.0)
    assert abs(_achieved(quarter, 6) - 0.2) < 1e-6
    # an eighth: floor (1 + 2 * 0.03125 + 0.03125 * 0.0078125) / 6 = 0.1771 fits 0.18
    assert ATPConfig.at_budget(0.18, num_layers=6).spatial_rates == (0.03125, 0.0078125, 0.0)
    # no sampling at all: rates of 0 (floor 1 / 6 = 0.1667)
    none = ATPConfig.at_budget(0.17, num_layers=6)
    assert none.spatial_rates == (0.0, 0.0, 0.0)
    # the unavoidable first layer (1 / 6 = 0.167) is the floor
    with pytest.raises(ValueError) as error:
        ATPConfig.at_budget(0.16, num_layers=6)
    assert str(error.value) == ("atp with stages at (1, 3, 4) and spatial rates (0.0, 0.0, 0.0) cannot reach 16% of "
                                "the visual tokens averaged over 6 layers")
    with pytest.raises(ValueError) as error:  # no depth: the share after the last stage, 0.5 ** 3 at least
        ATPConfig.at_budget(0.12, spatial_rates=(0.5, 0.5, 0.5))
    assert str(error.value) == ("atp with stages at None and spatial rates (0.5, 0.5, 0.5) cannot reach 12% of the "
                                "visual tokens")
    assert ATPConfig.at_budget(0.13, spatial_rates=(0.5, 0.5, 0.5)).spatial_rates == (0.5, 0.5, 0.5)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="`budget`"):
            ATPConfig.at_budget(bad, num_layers=6)
    assert ATPConfig.at_budget(1.0, num_layers=6).keep[0] > 0.999


# ----- threshold rules against the definition ---------------------------------------------------------------
def _quantile(values, q):
    """Linear-interpolation quantile of a list (numpy's default, torch.quantile's)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _definition(options, grid):
    """ATP's training-free selection at one stage: scores ``log(w * self + (1 - w) * cross)`` relative to
    uniform (self importance averaged over the visual queries that see each key), kept above the row's
    threshold (``mean + z(1 - keep) std`` or the ``1 - keep`` quantile; everything at ``keep = 1``), plus the
    tokens on the spatial grid; the best-scored token when nothing passes."""

    def select(stage, attention, visual, text, row):
        att = attention.double().mean(0)
        n = visual.numel()
        if n == 0:
            return []
        self_imp = att[visual][:, visual].mean(0) * n / torch.arange(n, 0, -1, dtype=torch.float64)
        self_imp = self_imp / self_imp.sum() * n
        cross = att[text][:, visual].mean(0)
        cross = cross / cross.sum() * n
        w = options.get("self_weight", 0.5)
        scores = [math.log(max(v, 1e-6)) for v in (w * self_imp + (1 - w) * cross).tolist()]
        keep = options["keep"][stage]
        if "heads" in options:  # trained heads: a fixed redundancy threshold; sampled tokens pass when their
            threshold = options["heads"][0]  # spatial score 1 - rate * scale exceeds the spatial one
        elif keep >= 1:
            threshold = -math.inf
        elif options.get("threshold_rule", "mean_std") == "quantile":
            threshold = _quantile(scores, 1 - keep)
        else:
            spread = statistics.stdev(scores) if n > 1 else 0.0
            threshold = statistics.fmean(scores) + statistics.NormalDist().inv_cdf(1 - keep) * spread
        rate = options["spatial_rates"][stage]
        stride = max(1, round(1 / math.sqrt(rate))) if rate > 0 else 0
        if "heads" in options and not 1 - rate * options["heads"][2] > options["heads"][1]:
            stride = 0
        out = []
        for c, s in zip(visual.tolist(), scores):
            layout, j = grid[row][c]
            sampled = bool(stride) and int(layout.rows[j]) % stride == stride // 2 \
                and int(layout.cols[j]) % stride == stride // 2 and bool(layout.content_mask[j])
            if s > threshold or sampled:
                out.append(c)
        return out or [visual.tolist()[max(range(n), key=lambda i: scores[i])]]

    return select


RULES = {
    # a 1 - keep quantile that falls between two scores, in both stages
    "quantile": dict(layers=(2, 4), keep=(0.37, 0.7), spatial_rates=(0.0, 0.0), threshold_rule="quantile"),
    # keep = 1 keeps every token at that stage (no threshold), then a mean + k std stage
    "keep-all-then-mean-std": dict(layers=(1, 3), keep=(1.0, 0.45), spatial_rates=(0.0, 0.0)),
    "quantile-keep-all": dict(layers=(2, 4), keep=(1.0, 0.3), spatial_rates=(0.0, 0.0), threshold_rule="quantile"),
    # falsy weights: cross importance alone, then self importance alone
    "cross-only": dict(layers=(2, 4), keep=(0.4, 0.6), spatial_rates=(0.0, 0.0), self_weight=0.0),
    "self-only": dict(layers=(2, 4), keep=(0.4, 0.6), spatial_rates=(0.0, 0.0), self_weight=1.0),
    # spatial sampling at a rate whose stride rounds (1 / sqrt(0.3) = 1.83 -> 2) and at the second stage
    "sampling-at-stage-2": dict(layers=(1, 3), keep=(0.6, 0.2), spatial_rates=(0.3, 0.11)),
    # a rate of 1: stride 1, every content token sampled
    "sampling-everything": dict(layers=(2, 4), keep=(0.3, 0.5), spatial_rates=(1.0, 0.0)),
}


@pytest.mark.parametrize("name", list(RULES))
def test_threshold_rules_keep_what_the_definition_keeps(model, name):
    """Which visual tokens each stage keeps, per row, and every output column, by the definition above."""
    options = RULES[name]
    batch = tiny_batch(model, default_rows("llava_onevision", video=True))
    tr.wrap(model, "atp", **options)
    try:
        with torch.no_grad():
            logits = model(**batch).logits
        stages = {s.layer: s.columns.clone() for s in get_handle(model).llm_stage.stages}
        samples = tr.stats(model).samples
    finally:
        tr.unwrap(model)
    reference, kept = llm_stage_reference(model, batch, options["layers"], _definition(options, visual_tokens(model, batch)))
    ids = batch["input_ids"]
    for layer, cols in stages.items():
        for r in range(ids.shape[0]):
            c = cols[r][cols[r] >= 0]
            got = c[(ids[r, c] == IMAGE_TOKEN) | (ids[r, c] == VIDEO_TOKEN)]
            assert got.tolist() == kept[layer][r].tolist(), f"stage {layer} row {r}"
            assert samples[r].layers[layer] == kept[layer][r].numel()
    if options["keep"][0] >= 1:  # nothing dropped at a stage that keeps everything
        first = options["layers"][0]
        assert [kept[first][r].numel() for r in range(ids.shape[0])] == [
            int(((ids[r] == IMAGE_TOKEN) | (ids[r] == VIDEO_TOKEN)).sum()) for r in range(ids.shape[0])]
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], reference[valid], atol=1e-4, rtol=1e-4)


def test_at_budget_config_runs_at_its_default_layers(model):
    """A config from ``at_budget`` with the model's depth prunes at the default layers of that depth."""
    config = ATPConfig.at_budget(0.45, num_layers=NUM_LAYERS, spatial_rates=(0.0, 0.0, 0.0))
    batch = tiny_batch(model, default_rows("llava_onevision", n=1))
    tr.wrap(model, config)
    try:
        with torch.no_grad():
            model(**batch)
        assert sorted(s.layer for s in get_handle(model).llm_stage.stages) == list(default_layers(NUM_LAYERS))
        assert tuple(get_handle(model).method.layers) == (1, 3, 4)
    finally:
        tr.unwrap(model)
    assert average_keep([1, 3, 4], [config.keep[0] ** (i + 1) for i in range(3)], NUM_LAYERS) == pytest.approx(0.45)


def test_trained_heads_bring_their_layers_rates_and_spatial_scale(model, tmp_path):
    """With ``layers`` unset, heads prune at their own layers with their spatial rates and score scale:
    heads whose thresholds are constants (zero weights, biases ``theta_r = 0.1``, ``theta_s = 0.4``) keep a
    token above 0.1, and a sampled one since ``1 - 0.25 * 2.0 = 0.5 > 0.4`` (the config's scale 3.0 would
    give 0.25, below it)."""
    from tokenreduce.plugins.atp import ThresholdHeads

    heads = ThresholdHeads([1, 3], spatial_rates=(0.25, 0.0), spatial_score_scale=2.0)
    with torch.no_grad():
        for mlp in heads.mlps:
            mlp[-1].bias.copy_(torch.tensor([0.1, 0.4]))
    heads.save_pretrained(tmp_path / "heads")
    batch = tiny_batch(model, default_rows("llava_onevision", video=True))
    tr.wrap(model, "atp", heads=str(tmp_path / "heads"))
    try:
        method = get_handle(model).method
        assert (tuple(method.layers), method.spatial_rates, method.spatial_score_scale) == ((1, 3), (0.25, 0.0), 2.0)
        with torch.no_grad():
            logits = model(**batch).logits
        stages = {s.layer: s.columns.clone() for s in get_handle(model).llm_stage.stages}
    finally:
        tr.unwrap(model)
    options = dict(layers=(1, 3), keep=(0.5, 0.5), spatial_rates=(0.25, 0.0), heads=(0.1, 0.4, 2.0))
    reference, kept = llm_stage_reference(model, batch, (1, 3), _definition(options, visual_tokens(model, batch)))
    ids = batch["input_ids"]
    for layer, cols in stages.items():
        for r in range(ids.shape[0]):
            c = cols[r][cols[r] >= 0]
            got = c[(ids[r, c] == IMAGE_TOKEN) | (ids[r, c] == VIDEO_TOKEN)]
            assert got.tolist() == kept[layer][r].tolist(), f"stage {layer} row {r}"
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], reference[valid], atol=1e-4, rtol=1e-4)

    ThresholdHeads([1, 3]).save_pretrained(tmp_path / "bare")  # no spatial rates saved
    with pytest.raises(ValueError) as error:
        tr.wrap(model, "atp", heads=str(tmp_path / "bare"))
    assert str(error.value) == ("`heads` prune at layers [1, 3] but carry no spatial rates; set `layers` and "
                                "`spatial_rates` to what they were trained with")
    with pytest.raises(ValueError) as error:
        tr.wrap(model, "atp", heads=str(tmp_path / "heads"), layers=(1, 4), keep=(0.5, 0.5), spatial_rates=(0.0, 0.0))
    assert str(error.value) == ("`heads` were trained for layers [1, 3], the config prunes at [1, 4]; "
                                "set `layers` to match")
    with pytest.raises(ValueError, match="`layers`"):
        tr.wrap(model, "atp", layers=(1, 9), keep=(0.5, 0.5), spatial_rates=(0.0, 0.0))


def test_grid_table_per_stride_and_never_from_a_stale_entry():
    """The sampling grid of every item at each stride (rows and columns at ``stride // 2`` modulo the stride,
    content tokens only), items laid end to end; a cached entry is only used for the same layout objects and
    the same stride."""
    from types import SimpleNamespace

    from tokenreduce.core.layout import TokenLayout
    from tokenreduce.plugins.atp import scores

    items = [SimpleNamespace(layout=TokenLayout.grid("image", 4, 5)), SimpleNamespace(layout=TokenLayout.grid("image", 3, 3))]

    def expected(stride):
        out = []
        for item in items:
            lay = item.layout
            out += [bool(lay.content_mask[j]) and int(lay.rows[j]) % stride == stride // 2
                    and int(lay.cols[j]) % stride == stride // 2 for j in range(lay.num_tokens)]
        return out

    cpu = torch.device("cpu")
    for stride in (2, 3, 1, 2):
        table, start = scores._grid_table(items, stride, cpu)
        assert table.tolist() == expected(stride) and start.tolist() == [0, 20]
    key = (2, cpu, tuple(id(item.layout) for item in items))
    scores._GRIDS[key] = ([object(), object()], torch.zeros(29, dtype=torch.bool), torch.tensor([0, 20]))
    table, _ = scores._grid_table(items, 2, cpu)
    assert table.tolist() == expected(2)
