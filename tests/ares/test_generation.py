"""ares at generation time: recorded entropies, untouched tokens, the budget controller, stats and plots."""

import json

import numpy as np
import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.config import MethodConfig, build_config
from tokenreduce.plugins.ares import (
    AresConfig,
    EntropyController,
    ares_records,
    calibrate_threshold,
    difficulty_labels,
    end_sequence_ids,
    plot_entropy,
    save_entropy_plots,
)
from tokenreduce.testing.tiny import default_rows, tiny_batch, tiny_tokenizer

from ..tables import cases
from .helpers import direct_entropy, forward_windows, text_batch, tiny_vlm

END = (7, 8)


@pytest.fixture(scope="module")
def qwen():
    return tiny_vlm("qwen2_vl")


@pytest.fixture(scope="module")
def llava():
    return tiny_vlm("llava")


def _generate(model, batch, **kwargs):
    with torch.no_grad():
        return model.generate(**batch, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Recorded entropy equals the full-softmax entropy of the generated steps' scores
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [1000, 32000, 152064])
def test_recorded_entropy_equals_full_softmax(vocab):
    model = tiny_vlm("qwen2_vl", vocab=vocab)
    batch = tiny_batch(model, default_rows("qwen2_vl", 2))
    tr.wrap(model, "ares", window=3)
    out = _generate(model, batch, max_new_tokens=7, do_sample=False, return_dict_in_generate=True,
                    output_logits=True)
    records = ares_records(model)
    assert len(records) == 2 and len(tr.stats(model).last) == 2
    reference = direct_entropy(torch.stack(out.logits, 1))
    assert float(reference.std()) > 0.05, "the tiny model's entropies should vary between steps"
    # float32 accumulation over V terms (a float32 full-softmax computation in torch errs as much: ~1e-4 at
    # 152k); the recorded values are float32.
    for row, rec in enumerate(records):
        assert rec["generated_tokens"] == 7
        np.testing.assert_allclose(rec["entropy"], reference[row].numpy(), rtol=3e-5, atol=3e-5)
        expected = forward_windows(reference[row].tolist(), 3)
        got = rec["window_entropy"]
        assert [g is None for g in got] == [e is None for e in expected]
        np.testing.assert_allclose([g for g in got if g is not None], [e for e in expected if e is not None],
                                   rtol=3e-5, atol=3e-5)


def test_recorded_entropy_temperature_and_next_window(qwen):
    batch = text_batch()
    tr.wrap(qwen, "ares", temperature=0.7, window=2, window_mode="next")
    try:
        out = _generate(qwen, batch, max_new_tokens=7, do_sample=False, return_dict_in_generate=True,
                        output_logits=True)
        records = ares_records(qwen)
    finally:
        tr.unwrap(qwen)
    reference = direct_entropy(torch.stack(out.logits, 1), 0.7)
    for row, rec in enumerate(records):
        np.testing.assert_allclose(rec["entropy"], reference[row].numpy(), rtol=1e-5, atol=2e-5)
        expected = forward_windows(reference[row].tolist(), 2, offset=1)
        got = rec["window_entropy"]
        assert [g is None for g in got] == [e is None for e in expected]
        np.testing.assert_allclose([g for g in got if g is not None], [e for e in expected if e is not None],
                                   rtol=1e-5, atol=2e-5)


def test_entropy_is_of_the_scores_after_the_callers_processors(qwen):
    # A repetition penalty runs before ares: the tracked entropy is of the penalised scores the sampler
    # sees (greedy: no warper follows, so they are what generate returns as `scores`).
    batch = text_batch()
    tr.wrap(qwen, "ares")
    try:
        out = _generate(qwen, batch, max_new_tokens=8, do_sample=False, repetition_penalty=3.0,
                        return_dict_in_generate=True, output_scores=True, output_logits=True)
        records = ares_records(qwen)
    finally:
        tr.unwrap(qwen)
    seen = direct_entropy(torch.stack(out.scores, 1))
    raw = direct_entropy(torch.stack(out.logits, 1))
    assert float((seen - raw).abs().max()) > 1e-2
    for row, rec in enumerate(records):
        np.testing.assert_allclose(rec["entropy"], seen[row].numpy(), rtol=1e-5, atol=2e-5)


# ----------------------------------------------------------------------------------------------------
# Controller off: no token changes
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [f for m, f in cases("decode") if m == "ares"])  # every family running it
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_tracking_changes_no_token(family, sample, qwen, llava):
    model = {"llava": llava, "qwen2_vl": qwen}.get(family) or tiny_vlm(family)
    batch = tiny_batch(model, default_rows(family, 2))
    kwargs = dict(max_new_tokens=12, do_sample=sample, top_k=0, temperature=1.3 if sample else None)
    torch.manual_seed(11)
    reference = _generate(model, batch, **kwargs)
    tr.wrap(model, "ares", hwe_threshold=0.5)
    try:
        torch.manual_seed(11)
        tracked = _generate(model, batch, **kwargs)
        records = ares_records(model)
    finally:
        tr.unwrap(model)
    assert torch.equal(tracked, reference)
    assert [r["generated_tokens"] for r in records] == [12, 12]
    if sample:  # sampled tokens differ from the greedy ones, so the comparison above is not vacuous
        assert not torch.equal(reference, _generate(model, batch, max_new_tokens=12, do_sample=False))


def test_processor_returns_the_scores_it_was_given_when_off():
    controller = EntropyController(AresConfig(hwe_threshold=1.0))
    scores = torch.randn(3, 50)
    for step in range(5):
        ids = torch.zeros(3, 4 + step, dtype=torch.long)
        assert controller(ids, scores) is scores
    assert len(controller.history) == 5


# ----------------------------------------------------------------------------------------------------
# The budget controller on synthetic scores (hand-checkable decisions)
# ----------------------------------------------------------------------------------------------------


def _scores_with_entropy(targets: list[float], vocab: int = 64) -> list[torch.Tensor]:
    """One [1, vocab] logits row per target entropy (two-level distributions found by bisection)."""
    rows = []
    for h in targets:
        lo, hi = 0.0, 50.0
        for _ in range(80):
            mid = (lo + hi) / 2
            z = torch.zeros(1, vocab, dtype=torch.float64)
            z[0, 0] = mid
            ent = float(-(z.softmax(-1) * z.log_softmax(-1)).sum())
            lo, hi = (mid, hi) if ent > h else (lo, mid)
        z = torch.zeros(1, vocab)
        z[0, 0] = (lo + hi) / 2
        rows.append(z)
    return rows


def _run(controller, rows):
    ids = torch.zeros(1, 3, dtype=torch.long)
    chosen = []
    for z in rows:
        out = controller(ids, z)
        token = int(out.argmax(-1))
        chosen.append((token, bool(torch.isinf(out).any())))
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return chosen


def test_controller_closes_at_first_low_entropy_point_after_the_budget():
    # Entropy dips below the running mean at step 7; budget 5, window 2: the trailing mean of steps 6-7
    # (2.0, 0.5 -> 1.25) is below the running mean (17.5 / 8 = 2.19) only at step 7.
    ent = [2.0, 2.5, 3.0, 2.0, 2.5, 3.0, 2.0, 0.5, 2.0, 2.0, 2.0, 2.0]
    cfg = AresConfig(budgets={"hard": 5}, difficulty="hard", window=2, end_ids=END)
    controller = EntropyController(cfg, end_ids=END, pad_id=0)
    chosen = _run(controller, _scores_with_entropy(ent))
    forced = [i for i, (_, pinned) in enumerate(chosen) if pinned]
    assert forced == [7, 8]
    assert [chosen[7][0], chosen[8][0]] == list(END)
    assert int(controller.close_pos[0]) == 7


def test_controller_closes_at_the_deadline_without_a_low_entropy_point():
    ent = [0.2 * (i + 1) for i in range(14)]  # rising: the trailing window never falls to the running mean
    cfg = AresConfig(budgets={"easy": 4}, difficulty="easy", window=3, end_ids=END)
    controller = EntropyController(cfg, end_ids=END, pad_id=0)
    chosen = _run(controller, _scores_with_entropy(ent))
    forced = [i for i, (_, pinned) in enumerate(chosen) if pinned]
    assert forced == [7, 8]  # budget 4 + window 3
    # With a fixed close threshold of 0.85 the trailing mean of steps 2-4 (0.8) is already low enough.
    cfg = AresConfig(budgets={"easy": 4}, difficulty="easy", window=3, end_ids=END, close_threshold=0.85)
    controller = EntropyController(cfg, end_ids=END, pad_id=0)
    forced = [i for i, (_, pinned) in enumerate(_run(controller, _scores_with_entropy(ent))) if pinned]
    assert forced == [4, 5]


def test_controller_difficulty_probe_picks_the_budget():
    # probe of 3 steps with mean entropy 0.4 -> easy (threshold 1.0); a second row with 3.0 -> hard.
    ent_easy = [0.4] * 20
    ent_hard = [3.0] * 20
    rows = [torch.cat(pair) for pair in zip(_scores_with_entropy(ent_easy), _scores_with_entropy(ent_hard))]
    cfg = AresConfig(budgets={"easy": 3, "hard": 10}, probe_tokens=3, window=2, end_ids=END,
                     difficulty_thresholds=(1.0, 2.5))
    controller = EntropyController(cfg, end_ids=END, pad_id=0)
    ids = torch.zeros(2, 3, dtype=torch.long)
    starts = {}
    for step, z in enumerate(rows):
        out = controller(ids, z)
        for r in range(2):
            if torch.isinf(out[r]).any() and r not in starts:
                starts[r] = step
        ids = torch.cat([ids, out.argmax(-1, keepdim=True)], 1)
    assert controller.difficulty.tolist() == [0, 2]
    np.testing.assert_allclose(controller.probe_mean.tolist(), [0.4, 3.0], atol=1e-4)
    # Constant entropy: the trailing mean equals the running mean, a low-entropy point at once.
    assert starts == {0: 3, 1: 10}


# ----------------------------------------------------------------------------------------------------
# The budget controller on tiny models
# ----------------------------------------------------------------------------------------------------


def _first(seq: list[int], sub: tuple[int, ...]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if tuple(seq[i : i + len(sub)]) == sub:
            return i
    return -1


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_budget_closes_reasoning_within_budget_plus_window(qwen, sample):
    batch = tiny_batch(qwen, default_rows("qwen2_vl", 3))
    budgets = {"easy": 5, "medium": 8, "hard": 11}
    tr.wrap(qwen, "ares", budgets=budgets, difficulty="auto", probe_tokens=4, window=4, end_ids=END)
    try:
        torch.manual_seed(3)
        out = _generate(qwen, batch, max_new_tokens=30, do_sample=sample, top_k=0)
        records = ares_records(qwen)
    finally:
        tr.unwrap(qwen)
    generated = out[:, batch["input_ids"].shape[1]:].tolist()
    for seq, rec in zip(generated, records):
        budget = budgets[rec["difficulty"]]
        assert rec["difficulty_source"] == "entropy"
        assert rec["probe_entropy"] == pytest.approx(float(np.mean(rec["entropy"][:4])), abs=1e-5)
        position = _first(seq, END)
        assert position == rec["reasoning_tokens"]
        assert position <= budget + 4
        if rec["reasoning_closed"] == "forced":
            assert position >= budget
        assert isinstance(rec["hwe_positions"], list)
        assert rec["hwe_theta"] == pytest.approx(float(np.percentile(rec["entropy"], 95)), abs=1e-5)


def test_labels_take_precedence_and_rows_follow_their_budget(qwen):
    batch = tiny_batch(qwen, default_rows("qwen2_vl", 2))
    tr.wrap(qwen, "ares", budgets={"easy": 3, "hard": 12}, probe_tokens=2, window=2, end_ids=END)
    try:
        with difficulty_labels(qwen, ["easy", "hard"]):
            out = _generate(qwen, batch, max_new_tokens=24, do_sample=False)
        records = ares_records(qwen)
        with pytest.raises(ValueError, match="`labels` has 3 entries for 2 prompt rows"), \
                difficulty_labels(qwen, ["easy", "hard", None]):
            _generate(qwen, batch, max_new_tokens=4)
        with pytest.raises(ValueError, match=r"`labels` entries must be one of \('easy', 'medium', 'hard'\)"), \
                difficulty_labels(qwen, ["trivial"]):
            pass
    finally:
        tr.unwrap(qwen)
    generated = out[:, batch["input_ids"].shape[1]:].tolist()
    assert [r["difficulty"] for r in records] == ["easy", "hard"]
    assert [r["difficulty_source"] for r in records] == ["label", "label"]
    assert 3 <= _first(generated[0], END) <= 5
    assert 12 <= _first(generated[1], END) <= 14 or records[1]["reasoning_closed"] == "model"


def test_eos_closes_and_finishes_the_row(qwen):
    batch = text_batch(rows=2)
    tr.wrap(qwen, "ares", budgets={"medium": 4}, difficulty="medium", window=2)
    try:
        out = _generate(qwen, batch, max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=0)
        records = ares_records(qwen)
        with pytest.raises(ValueError, match="`end_ids` is empty"):
            _generate(qwen, batch, max_new_tokens=4)
        with pytest.raises(ValueError, match="`num_beams`=2 is not supported"):
            _generate(qwen, batch, max_new_tokens=4, num_beams=2, eos_token_id=2)
    finally:
        tr.unwrap(qwen)
    generated = out[:, batch["input_ids"].shape[1]:].tolist()
    for seq, rec in zip(generated, records):
        stop = seq.index(2)
        assert 4 <= stop <= 6
        assert all(t == 0 for t in seq[stop + 1 :])
        assert rec["reasoning_tokens"] == stop and rec["generated_tokens"] == stop + 1
        assert rec["reasoning_closed"] == "forced"
    # Every row stopped: generation ended before max_new_tokens.
    assert out.shape[1] - batch["input_ids"].shape[1] < 16


def test_exploration_raises_temperature_only_at_hwe_positions(qwen):
    batch = text_batch(rows=2)
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=0)
    tr.wrap(qwen, "ares", explore_temperature=3.0, hwe_threshold=0.0, end_ids=END)
    try:
        torch.manual_seed(0)
        explored = _generate(qwen, batch, **kwargs)
        records = ares_records(qwen)
    finally:
        tr.unwrap(qwen)
    # Threshold 0: every reasoning position is HWE, so the temperature was raised at each of them.
    assert all(r["explored_positions"] == list(range(r["reasoning_tokens"])) for r in records)
    torch.manual_seed(0)
    plain = _generate(qwen, batch, **kwargs)
    assert not torch.equal(explored, plain)


# ----------------------------------------------------------------------------------------------------
# Stats, HWE positions, calibration, plots
# ----------------------------------------------------------------------------------------------------


def test_stats_hold_hwe_positions_by_both_rules(qwen):
    batch = tiny_batch(qwen, default_rows("qwen2_vl", 2))
    tr.wrap(qwen, "ares", hwe_threshold=1.0, window=3)
    try:
        _generate(qwen, batch, max_new_tokens=20, do_sample=False)
        stats = tr.stats(qwen)
        rows = stats.last
    finally:
        tr.unwrap(qwen)
    assert len(rows) == 2 and all(r.items for r in rows)  # the visual rows prepare() made carry the records
    any_hwe = False
    for row in rows:
        rec = row.extra["ares"]
        ent = np.array(rec["entropy"])
        theta = np.percentile(ent, 95)
        windows = forward_windows(list(ent), 3)
        expected = [t for t, w in enumerate(windows) if w is not None and w >= theta]
        fixed = [t for t, w in enumerate(windows) if w is not None and w >= 1.0]
        assert rec["hwe_theta"] == pytest.approx(theta, abs=1e-5)
        assert rec["hwe_positions"] == expected
        assert rec["hwe_threshold_positions"] == fixed
        any_hwe |= bool(expected)
    assert any_hwe
    json.dumps(stats.to_dict())  # records are JSON-ready


def test_text_only_prompts_get_rows_and_return_sequences(qwen):
    batch = text_batch(rows=2)
    tr.wrap(qwen, "ares")
    try:
        _generate(qwen, batch, max_new_tokens=5, do_sample=True, num_return_sequences=3)
        rows = tr.stats(qwen).last
    finally:
        tr.unwrap(qwen)
    assert len(rows) == 2
    assert all(len(r.extra["ares_sequences"]) == 3 for r in rows)
    assert all(r.extra["ares"] is r.extra["ares_sequences"][0] for r in rows)


def test_calibrate_threshold_from_records(qwen):
    batch = text_batch(rows=2)
    tr.wrap(qwen, "ares")
    try:
        _generate(qwen, batch, max_new_tokens=12, do_sample=False)
        rows = tr.stats(qwen).last
    finally:
        tr.unwrap(qwen)
    per = [np.percentile([w for w in forward_windows(r.extra["ares"]["entropy"], 4) if w is not None], 95)
           for r in rows]
    assert calibrate_threshold(rows) == pytest.approx(float(np.mean(per)), abs=1e-5)
    assert calibrate_threshold([r.to_dict() for r in rows], reduce="median") == pytest.approx(
        float(np.median(per)), abs=1e-5)
    tokens = [np.percentile(r.extra["ares"]["entropy"], 90) for r in rows]
    assert calibrate_threshold([r.extra["ares"]["entropy"] for r in rows], source="token", quantile=0.9) == (
        pytest.approx(float(np.mean(tokens)), abs=1e-5))
    with pytest.raises(ValueError, match="no trajectory is long enough"):
        calibrate_threshold([[1.0, 2.0]], window=4)


def test_plots_are_written(qwen, tmp_path):
    batch = text_batch(rows=2)
    tr.wrap(qwen, "ares", hwe_threshold=1.0, budgets={"hard": 4, "easy": 4, "medium": 4}, probe_tokens=2,
            end_ids=END)
    try:
        _generate(qwen, batch, max_new_tokens=14, do_sample=False)
        stats = tr.stats(qwen)
        paths = save_entropy_plots(stats, tmp_path / "plots")
        from_json = save_entropy_plots(json.loads(json.dumps(stats.to_dict()))["samples"], tmp_path / "json")
    finally:
        tr.unwrap(qwen)
    assert [p.name for p in paths] == ["ares_call1_row0.png", "ares_call1_row1.png"]
    for p in [*paths, *from_json]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    fig = plot_entropy(stats.samples[0])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(t.startswith("HWE") or t.startswith("window") for t in labels)
    assert any("reasoning closed" in t for t in labels)
    with pytest.raises(ValueError, match="not an ares record"):
        plot_entropy({"call": 1})


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------


def test_config_round_trips_with_controller_options(tmp_path):
    cfg = AresConfig(budgets={"easy": 64, "hard": 512}, end_ids=(5, 6), difficulty_thresholds=(0.5, 2.0),
                     hwe_threshold=1.5, explore_temperature=1.2, window_mode="next")
    cfg.save_pretrained(tmp_path)
    loaded = MethodConfig.from_pretrained(tmp_path)
    assert loaded == cfg and loaded.controller_enabled
    assert not AresConfig().controller_enabled
    assert AresConfig.at_budget(1.0, num_layers=4, window=8).window == 8


@pytest.mark.parametrize("options, message", [
    ({"budgets": {"trivial": 5}}, r"`budgets` keys must be one of \('easy', 'medium', 'hard'\), got 'trivial'"),
    ({"budgets": {"easy": 0}}, r"`budgets\['easy'\]` must be in \[1, inf\], got 0"),
    ({"budgets": {"easy": 8}}, r"`budgets` \{'easy': 8\} are below `probe_tokens`=32"),
    ({"explore_temperature": 2.0}, r"`explore_temperature`=2.0 needs `hwe_threshold`"),
    ({"window_mode": "back"}, r"`window_mode` must be one of \('forward', 'next'\), got 'back'"),
    ({"difficulty_thresholds": (2.0, 1.0)}, r"`difficulty_thresholds` must satisfy t_easy <= t_hard"),
    ({"end_ids": (-1,)}, r"`end_ids` must be in \[0, inf\], got -1"),
    ({"hwe_quantile": 1.5}, r"`hwe_quantile` must be in \[0.0, 1.0\], got 1.5"),
])
def test_config_errors_name_the_parameter(options, message):
    with pytest.raises(ValueError, match=message):
        build_config("ares", **options)


def test_visual_budget_is_refused():
    with pytest.raises(ValueError, match=r"`budget`=0.5 is a visual-token budget; ares is a decode-stage method"):
        AresConfig.at_budget(0.5)


def test_end_sequence_ids():
    tok = tiny_tokenizer()
    assert end_sequence_ids(tok, "w7 w8") == (7, 8)
