"""torch.compile of a wrapped model: decoder layers trace without graph breaks, and the compiled language
model gives the uncompiled outputs for pool and fastv at a fixed budget (default backend, CPU)."""

from __future__ import annotations

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.registry import get_method
from tokenreduce.testing.tiny import default_rows, tiny_batch, tiny_model

CONFIGS = {"pool": {"keep": 0.25}, "fastv": {"layer": 2, "keep": 0.5}}


def _wrapped(method: str):
    model = tiny_model("llava", num_layers=4, attn_implementation="sdpa")
    batch = tiny_batch(model, default_rows("llava", n=1))
    tr.wrap(model, get_method(method).config_cls(**CONFIGS[method]))
    return model, batch


@pytest.mark.parametrize("method", list(CONFIGS))
def test_decoder_layers_trace_without_graph_breaks(method):
    import torch._dynamo as dynamo

    model, batch = _wrapped(method)
    layers = model.model.language_model.layers
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: seen.append((m, a, k)), with_kwargs=True)
             for layer in layers]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    # the first layer and the last (after fastv's pruning layer: fewer tokens, rebuilt mask and rotary)
    for module, args, kwargs in (seen[0], seen[-1]):
        dynamo.reset()
        explained = dynamo.explain(module)(*args, **kwargs)
        assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CONFIGS))
def test_compiled_language_model_matches(method):
    model, batch = _wrapped(method)
    with torch.no_grad():
        want = model(**batch).logits
        model.model.language_model.compile()
        got = model(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
