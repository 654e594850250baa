"""The decode stage, for every decode-stage method on every family that runs it (derived from the registry).

A decode-stage method acts through the logits processors and stopping criteria it hands ``generate``; the
core appends them to the caller's and keeps every visual token. Reference: the UNWRAPPED model's
``generate`` given the method's own hooks as the caller's processors. Sampled with a seed, the wrapped
model must return exactly the same sequences, its prompt unchanged.
"""

import pytest
import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

import tokenreduce as tr
from tokenreduce.core.api import get_handle
from tokenreduce.core.registry import get_method
from tokenreduce.testing.tiny import default_rows, tiny_batch, tiny_model

from .tables import cases

CASES = cases("decode")
NEW_TOKENS = 8


@pytest.mark.parametrize("method, family", CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_generate_equals_plain_generate_with_the_methods_hooks(method, family):
    model = tiny_model(family)
    batch = tiny_batch(model, default_rows(family, n=2, video=True))
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, temperature=1.5)
    tr.wrap(model, get_method(method).config_cls.at_budget(1.0))
    try:
        torch.manual_seed(5)
        with torch.no_grad():
            wrapped = model.generate(**batch, **kwargs)
        stats = tr.stats(model).last
        handle = get_handle(model)
        with tr.disabled(model):
            hooks = handle.method.generation_hooks(handle, dict(batch, **kwargs))
            torch.manual_seed(5)
            with torch.no_grad():
                reference = model.generate(
                    **batch, **kwargs, logits_processor=LogitsProcessorList(hooks.get("logits_processor", [])),
                    stopping_criteria=StoppingCriteriaList(hooks.get("stopping_criteria", [])),
                )
    finally:
        tr.unwrap(model)
    assert wrapped.tolist() == reference.tolist()
    assert torch.equal(wrapped[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    assert all(s.visual_tokens_out == s.visual_tokens_in > 0 for s in stats)  # every visual token kept
    # sampling at a high temperature: the comparison is not one of two greedy argmaxes
    torch.manual_seed(6)
    with torch.no_grad():
        other = model.generate(**batch, **kwargs)
    assert other.tolist() != reference.tolist()
