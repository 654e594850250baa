"""Fixtures of the evaluation-room tests: tiny local data in the benchmarks' real schemas, tiny models."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    # Tiny models run fastest on one thread, and far faster than on two when the cores are shared.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """Tests never reach the hub: the default dataset loader fails loudly if anything calls it."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"datasets.load_dataset called in a test: {args} {kwargs}")

    monkeypatch.setattr("tokenreduce.eval.tasks.source._default_loader", refuse)


@pytest.fixture(scope="session")
def synthetic_models(tmp_path_factory):
    """A folder holding the three synthetic models (the real classes, processors and tokenizer, untrained:
    they answer at chance), laid out like ``assets/models``."""
    from tokenreduce.eval.synthetic import MODEL_NAMES, build_processor
    from tokenreduce.eval.synthetic.models import build_model

    root = tmp_path_factory.mktemp("synthetic-models")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind, name in MODEL_NAMES.items():
            build_model(kind).save_pretrained(root / name)
            build_processor(kind).save_pretrained(root / name)
    finally:
        torch.set_num_threads(previous)
    return root


@pytest.fixture(scope="module")
def tiny_llava():
    """A tiny LLaVA (4 decoder layers) and its processor, shared by a test module."""
    from tokenreduce.testing.tiny import tiny_model, tiny_processor

    torch.manual_seed(0)
    return tiny_model("llava", num_layers=4), tiny_processor("llava")
