"""Every generate mode is row-exact, for every registered method on every family it supports.

``generate`` repeats each row for beam search and ``num_return_sequences`` (``repeat_interleave``), after
tokenreduce has reduced the caller's rows. A row of a left-padded batch must then give what the same row
gives alone: the same sequences and the same raw logits at every step, with beam search, several returned
sequences, and sampling with a fixed seed. In-LLM methods must prune every copy of a row exactly as the row
alone is pruned. The table is derived from the registry: a method is covered by registering it.
"""

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.api import get_handle
from tokenreduce.core.registry import get_method, method_specs
from tokenreduce.testing.tiny import FAMILIES, default_rows, tiny_batch

from .tables import NEEDS_TRAINED_WEIGHTS, cached_model, runs_on

# Modes a method refuses at call time, with the option its one-line message names.
REFUSED = {("ares", "beams"): "num_beams", ("ares", "beams_return2"): "num_beams"}
NUM_LAYERS = 4
NEW_TOKENS = 3

CASES = [
    pytest.param(spec.name, family, id=f"{spec.name}-{family}")
    for spec in method_specs()
    if spec.name not in NEEDS_TRAINED_WEIGHTS
    for family in FAMILIES
    if runs_on(spec, family)
]

MODES = {
    "beams": dict(num_beams=2, do_sample=False),
    "beams_return2": dict(num_beams=2, num_return_sequences=2, do_sample=False),
    # top_k=1 makes the draw the argmax, so a row's tokens do not depend on how many rows shared the RNG,
    # while generate still takes the sampling path and expands rows for the returned sequences.
    "sample_return2": dict(do_sample=True, top_k=1, num_return_sequences=2),
}


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, family):
    return cached_model(models, family, num_layers=NUM_LAYERS)


def _config(name):
    spec = get_method(name)
    # decode-stage methods keep every visual token: their only visual budget is 1.0
    budget = 1.0 if spec.stages == ("decode",) else 0.5
    return spec.config_cls.at_budget(budget, num_layers=NUM_LAYERS)


def _run(model, batch, mode):
    """New tokens, raw logits per step and the in-LLM kept columns (original columns, padding removed)."""
    torch.manual_seed(1234)
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=NEW_TOKENS, return_dict_in_generate=True, output_logits=True, **MODES[mode]
        )
    pad = (batch["attention_mask"] == 0).sum(1)
    handle = get_handle(model)
    kept = {}
    if handle is not None and handle.llm_stage is not None:
        for stage in handle.llm_stage.stages:
            cols = stage.columns
            factor = cols.shape[0] // batch["input_ids"].shape[0]
            # columns of the caller's row (expanded row // factor), without its left padding
            kept[stage.layer] = [
                (cols[e][cols[e] >= 0] - pad[e // factor]).tolist() for e in range(cols.shape[0])
            ]
    return out.sequences[:, -NEW_TOKENS:], torch.stack(out.logits, 1), kept


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("method,family", CASES)
def test_rows_of_a_batch_equal_rows_alone(models, method, family, mode):
    model = _model(models, family)
    rows = default_rows(family, n=2, video=True)
    batch = tiny_batch(model, rows)
    tr.wrap(model, _config(method))
    try:
        if (method, mode) in REFUSED:
            with pytest.raises(ValueError, match=f"^`{REFUSED[method, mode]}`=2 is not supported by method '{method}'"):
                _run(model, batch, mode)
            return
        tokens, logits, kept = _run(model, batch, mode)
        alone = [_run(model, tiny_batch(model, [row]), mode) for row in rows]
        samples = tr.stats(model).samples
    finally:
        tr.unwrap(model)
    copies = tokens.shape[0] // len(rows)  # returned sequences per row
    expanded = 2  # rows generate runs per caller row: beams or returned sequences
    for r, (tok_r, logit_r, kept_r) in enumerate(alone):
        sl = slice(r * copies, (r + 1) * copies)
        assert tokens[sl].tolist() == tok_r.tolist(), f"{method}/{family}/{mode} row {r}"
        rows_r = slice(r * expanded, (r + 1) * expanded)
        torch.testing.assert_close(logits[rows_r], logit_r, atol=1e-4, rtol=1e-4, msg=f"{method}/{family} row {r}")
        for layer, cols in kept_r.items():
            # every copy of the row (beam / returned sequence) keeps the columns the row alone keeps
            assert len(cols) == expanded and cols[0] == cols[1]
            assert kept[layer][rows_r] == cols, f"{method}/{family}/{mode} row {r} layer {layer}"
    if kept:
        # in-LLM methods really pruned every copy: fewer tokens after their first stage than the row holds
        lengths = [len(c) for c in kept[min(kept)]]
        full = batch["attention_mask"].sum(1).repeat_interleave(expanded).tolist()
        assert all(n < f for n, f in zip(lengths, full))
        assert all(s.layers for s in samples)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl", "llava_next_video"])
@pytest.mark.parametrize("mode", ["beams", "beams_return2"])
def test_keep_all_feeds_every_copy_its_own_features(models, family, mode):
    """At keep=1.0 a projector method hands every expanded row the embeddings the unwrapped model builds
    (OneVision packs videos as one joined tensor, which transformers' own expansion split wrongly)."""
    model = _model(models, family)
    batch = tiny_batch(model, default_rows(family, n=2, video=True))
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["inputs_embeds"]) if not seen else None, with_kwargs=True
    )
    try:
        with torch.no_grad():
            reference = model.generate(**batch, max_new_tokens=2, **MODES[mode])
            expected = seen.pop()
            tr.wrap(model, "pool", keep=1.0)
            try:
                got = model.generate(**batch, max_new_tokens=2, **MODES[mode])
            finally:
                tr.unwrap(model)
    finally:
        hook.remove()
    assert torch.equal(got, reference)
    torch.testing.assert_close(seen[0], expected, atol=0, rtol=0)
    # the copies of a row are alike and rows differ: a misordered expansion cannot pass unseen
    assert torch.equal(expected[0], expected[1]) and not torch.equal(expected[1], expected[2])
