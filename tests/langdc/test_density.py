"""Semantic density: trained on captions whose length follows content, the captioner writes (and so feeds)
fewer tokens for static segments than for busy ones."""

from pathlib import Path

import pytest
import torch

from tokenreduce.plugins.langdc import Captioner, CaptionerConfig
from tokenreduce.plugins.langdc.data import VideoExample, happenings
from tokenreduce.plugins.langdc.training import (
    caption_metrics,
    generate_captions,
    pearson,
    spearman,
    train_captioner,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_MODEL = ROOT / "assets" / "models" / "synthetic-onevision-video"
SHIPPED_CAPTIONER = ROOT / "assets" / "langdc" / "synthetic-onevision-video"


def _toy_segments(n: int, seed: int):
    """Segments of 4 frames x 4 tokens: a static random pattern, in which 0-2 tokens change at some frame.
    Captions: ``[3, 4, 5]`` when nothing changes, four tokens per change otherwise."""
    gen = torch.Generator().manual_seed(seed)
    inputs, captions, events = [], [], []
    for i in range(n):
        k = i % 3
        frames = torch.randn(4, 16, generator=gen).repeat(4, 1, 1)  # [frame, token, dim]
        for e in range(k):  # a changed token carries a marker, as a trained tower makes motion visible
            at = int(torch.randint(1, 4, (1,), generator=gen))
            frames[at:, e, :4] += 4.0
        inputs.append(frames.reshape(16, 16))
        captions.append([3, 4, 5] if k == 0 else [6, 7, 8, 5] * k)
        events.append(k)
    return torch.stack(inputs), captions, events


def test_static_segments_get_fewer_tokens_than_busy_ones():
    config = CaptionerConfig(vlm_hidden=16, eos_token_id=2, hidden_layer=1, max_caption_tokens=12, prompt_ids=(1,))
    captioner = Captioner.build(config, dict(vocab_size=10, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=128), seed=0)
    inputs, captions, _ = _toy_segments(96, seed=0)
    log = train_captioner(captioner, inputs[:, None], [[c] for c in captions], steps=150, batch_size=48, lr=3e-3,
                          log_every=50)
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    held, held_captions, events = _toy_segments(30, seed=1)
    predicted = generate_captions(captioner, held[:, None])
    examples = [VideoExample(f"toy-{i}", torch.zeros(1), [c], [""], [k]) for i, (c, k) in enumerate(zip(held_captions, events))]
    metrics = caption_metrics(predicted, examples)
    assert metrics["mean_tokens_static"] < metrics["mean_tokens_busy"]
    assert metrics["spearman_tokens_vs_events"] > 0.5


def test_correlations_and_happenings():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
    assert spearman([1, 1, 2], [5, 5, 7]) == pytest.approx(1.0)
    assert happenings("nothing happens .") == 0
    assert happenings("the red circle moves left .") == 1
    assert happenings("the square turns blue . a green cross appears .") == 2


SHIPPED = pytest.mark.skipif(
    not (SHIPPED_MODEL / "config.json").is_file() or not (SHIPPED_CAPTIONER / "langdc_captioner.json").is_file(),
    reason="the shipped synthetic video model and its captioner are not in assets/ yet",
)


@pytest.fixture(scope="module")
def shipped():
    from tokenreduce.eval.synthetic.models import load
    from tokenreduce.plugins.langdc.data import build_examples

    model, processor = load("video", SHIPPED_MODEL)
    examples, layout = build_examples(model, processor, "test", 0, 48)
    return model, examples, layout, int(processor.tokenizer.pad_token_id or 0)


@SHIPPED
def test_shipped_captioner_static_below_busy_on_the_test_split(shipped):
    from tokenreduce.plugins.langdc.training import group_inputs

    _, examples, layout, _ = shipped
    captioner = Captioner.from_pretrained(SHIPPED_CAPTIONER)
    predicted = generate_captions(captioner, group_inputs(examples, layout, captioner.config))
    metrics = caption_metrics(predicted, examples)
    assert metrics["mean_tokens_static"] < metrics["mean_tokens_busy"]
    assert metrics["spearman_tokens_vs_events"] > 0.8
    assert metrics["exact_match"] > 0.8


@SHIPPED
def test_shipped_captioner_answers_far_above_pool_at_as_many_tokens(shipped):
    """Through the wrapped model (adapters hooked in while wrapped), on the first 48 test videos."""
    import tokenreduce as tr
    from tokenreduce.plugins.langdc.training import answer_accuracy

    model, examples, layout, pad = shipped
    pairs = [(ex, ex.questions[0]) for ex in examples]
    full = answer_accuracy(model, pairs, layout, pad)["accuracy"]
    tr.wrap(model, "langdc", captioner=str(SHIPPED_CAPTIONER))
    try:
        langdc = answer_accuracy(model, pairs, layout, pad)
    finally:
        tr.unwrap(model)
    tr.wrap(model, "pool", keep=int(langdc["visual_tokens"]) + 16)  # one more pooled token per frame
    try:
        pool = answer_accuracy(model, pairs, layout, pad)
    finally:
        tr.unwrap(model)
    assert pool["visual_tokens"] >= langdc["visual_tokens"]
    assert langdc["accuracy"] >= pool["accuracy"] + 0.3
    assert langdc["accuracy"] >= 0.85 * full  # 0.875 vs 0.896 for the shipped captioner
    assert answer_accuracy(model, pairs, layout, pad)["accuracy"] == full  # unwrap left no adapter behind
