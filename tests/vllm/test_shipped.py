"""The shipped synthetic image model (saved by transformers 5.24) loads in vLLM and answers as tr.wrap."""

from __future__ import annotations

from pathlib import Path

from tokenreduce.eval.synthetic import load_synthetic
from tokenreduce.integrations.vllm.synthetic import hf_answers, vllm_answers

MODEL = Path(__file__).resolve().parents[2] / "assets" / "models" / "synthetic-llava-image"


def test_shipped_image_model_answers_as_the_transformers_path():
    samples = load_synthetic("image", "test", 12)
    reduction = {"method": "pool", "keep": 0.25}
    served = vllm_answers(str(MODEL), samples, reduction, distributed_executor_backend="uni")
    wrapped = hf_answers(str(MODEL), samples, {**reduction, "renumber_positions": True})
    assert served == wrapped
    assert len(set(served)) > 3  # real answers, not one repeated token
