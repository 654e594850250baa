"""The shipped VQ-attention module on the shipped synthetic video model, through the wrapped model."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_MODEL = ROOT / "assets" / "models" / "synthetic-onevision-video"
SHIPPED_ATTENTION = ROOT / "assets" / "vqtoken" / "synthetic-onevision-video"
pytestmark = pytest.mark.skipif(
    not (SHIPPED_MODEL / "config.json").is_file() or not (SHIPPED_ATTENTION / "vq_attention.json").is_file(),
    reason="the shipped synthetic video model and its VQ-attention module are not in assets/ yet",
)


def test_shipped_vq_attention_keeps_most_of_full_accuracy_at_five_codes():
    """First 64 test videos, 5 code tokens of 577: the trained module (with its LLM adapters) against full
    tokens and codebook only; unwrapping leaves the model as it was."""
    from tokenreduce.eval.predict import predict
    from tokenreduce.eval.synthetic import load_synthetic
    from tokenreduce.eval.synthetic.models import load
    from tokenreduce.eval.synthetic.prompting import exact_match
    from tokenreduce.plugins.vqtoken import VQAttention
    from tokenreduce.plugins.vqtoken.training import synthetic_accuracy

    model, processor = load("video", SHIPPED_MODEL)
    samples = load_synthetic("video", "test", n=64)

    def full_accuracy() -> float:
        answers = predict(model, processor, samples, batch_size=16, max_new_tokens=3)
        return sum(exact_match(a, s.answer) for a, s in zip(answers, samples)) / len(samples)

    full = full_accuracy()
    module = VQAttention.from_pretrained(SHIPPED_ATTENTION)
    vq = synthetic_accuracy(model, processor, samples, module, {"keep": 5})["all"]
    codebook = synthetic_accuracy(model, processor, samples, None, {"keep": 5})["all"]
    assert full_accuracy() == full  # the adapters left with the wrap
    assert vq >= 0.9 * full  # 0.859 vs 0.906 for the shipped module (codebook only: 0.109)
    assert vq >= codebook + 0.5
