"""The shipped synthetic models (saved by transformers 5.24) load in vLLM and answer as tr.wrap does."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenreduce.eval.synthetic import load_synthetic
from tokenreduce.integrations.vllm.synthetic import hf_answers, vllm_answers

MODELS = Path(__file__).resolve().parents[2] / "assets" / "models"


@pytest.mark.parametrize(("kind", "model", "reduction"), [
    ("image", "synthetic-llava-image", {"method": "divprune", "keep": 0.25}),
    ("video", "synthetic-onevision-video", {"method": "pool", "keep": 0.25}),
    # anyres document pages (a base grid and up to 2 x 2 crops of 168 pixels, newline slots)
    ("document", "synthetic-onevision-document", {"method": "pool", "keep": 0.25}),
    # 32 codes: the synthetic videos' flat backgrounds leave 72 or more distinct tokens, so every video
    # uses all 32 (below that, vLLM's fixed placeholder count differs from what tr.wrap feeds).
    ("video", "synthetic-onevision-video", {"method": "vqtoken", "keep": 32, "kmeans": "torch"}),
])
def test_shipped_model_answers_as_the_transformers_path(kind, model, reduction):
    samples = load_synthetic(kind, "test", 12)
    served = vllm_answers(str(MODELS / model), samples, reduction, distributed_executor_backend="uni")
    wrapped = hf_answers(str(MODELS / model), samples, reduction)
    assert served == wrapped
    assert len(set(served)) > 3  # real answers, not one repeated token
