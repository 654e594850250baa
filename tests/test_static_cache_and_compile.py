"""``cache_implementation="static"`` and ``torch.compile`` on a wrapped model.

With a static cache ``generate`` hands the text model a prepared 4-D mask (a per-layer-type dict on Qwen)
and a cache whose counters live on the device; it may compile the decode steps with ``fullgraph=True``.
At keep-all every method gives the plain model's tokens; with a reduction the static cache gives the
dynamic cache's tokens (those are checked against the independent references elsewhere), compiled or not.
"""

import warnings

import pytest
import torch
from transformers import CompileConfig

import tokenreduce as tr
from tokenreduce.core.registry import get_method
from tokenreduce.testing.tiny import default_rows, tiny_batch, tiny_model

from .test_plain_inputs import CASES
from .test_wrap import NOT_IDENTITY_AT_FULL_BUDGET

STATIC = dict(max_new_tokens=4, do_sample=False, cache_implementation="static")


@pytest.fixture(scope="module")
def models():
    return {}


def _setup(models, family):
    if family not in models:
        model = tiny_model(family, attn_implementation="sdpa")
        batch = tiny_batch(model, default_rows(family, n=2, video=True))  # left-padded rows
        with torch.no_grad():
            plain = model.generate(**batch, **STATIC)
        models[family] = model, batch, plain
    return models[family]


def _generate(model, config, batch, **kw):
    tr.wrap(model, config)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # methods that pass a modality through say so once
            return model.generate(**batch, **kw)
    finally:
        tr.unwrap(model)


@pytest.mark.parametrize("method,family", CASES)
def test_static_cache(models, method, family):
    model, batch, plain = _setup(models, family)
    spec = get_method(method)
    if method not in NOT_IDENTITY_AT_FULL_BUDGET:
        assert torch.equal(_generate(model, spec.config_cls.at_budget(1.0, num_layers=4), batch, **STATIC), plain)
    config = spec.config_cls.at_budget(0.3, num_layers=4)
    dynamic = _generate(model, config, batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(_generate(model, config, batch, **STATIC), dynamic)


def _fullgraph():
    # The eager backend traces with dynamo exactly as inductor would (a graph break fails `fullgraph`),
    # without compiling kernels: seconds on a CPU. generate compiles only on accelerators unless told.
    config = CompileConfig(fullgraph=True, dynamic=False, backend="eager")
    config._compile_all_devices = True
    return config


COMPILED = [("pool", "llava"), ("fastv", "llava"), ("pdrop", "llava"), ("pool", "qwen2_vl"), ("fastv", "qwen2_vl"),
            ("pdrop", "qwen2_vl")]


@pytest.mark.slow
@pytest.mark.parametrize("method,family", COMPILED)
def test_generate_compiles_the_decode_steps_fullgraph(models, method, family):
    """The decode steps (the text model and the in-LLM stage's hooks) trace as one graph: no read of the
    static cache's counters, no branch on device values."""
    model, batch, plain = _setup(models, family)
    spec = get_method(method)
    torch._dynamo.reset()
    compiled = dict(STATIC, compile_config=_fullgraph())
    assert torch.equal(_generate(model, spec.config_cls.at_budget(1.0, num_layers=4), batch, **compiled), plain)
    config = spec.config_cls.at_budget(0.3, num_layers=4)
    reference = _generate(model, config, batch, **STATIC)
    torch._dynamo.reset()
    assert torch.equal(_generate(model, config, batch, **compiled), reference)
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("method,family,keep", [("fastv", "llava", 1.0)])
def test_compiled_forward(models, method, family, keep):
    """``torch.compile(model)`` of a wrapped model (graph breaks allowed: the handle's bookkeeping reads the
    host) gives the uncompiled logits; at keep-all the plain model's."""
    model, batch, _ = _setup(models, family)
    with torch.no_grad():
        plain = model(**batch).logits
    tr.wrap(model, get_method(method).config_cls.at_budget(keep, num_layers=4))
    try:
        with torch.no_grad():
            want = model(**batch).logits
            torch._dynamo.reset()
            got = torch.compile(model, backend="eager")(**batch).logits
    finally:
        tr.unwrap(model)
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    if keep == 1.0:
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(got[real], plain[real], atol=1e-5, rtol=1e-5)
