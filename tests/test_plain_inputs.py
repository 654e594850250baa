"""Inputs the plain model takes pass through a wrapped model, at keep-all and with a real reduction.

Placeholders without pixels, caller-given 2-D position ids on Qwen2-VL, ``generate`` without
``mm_token_type_ids``, FastV's default layer on a model shallower than it, assisted decoding, continuing
from returned ``past_key_values``, and ``inputs_embeds`` with pixels (``forward`` and ``generate``).
"""

import warnings

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.registry import get_method, method_specs
from tokenreduce.testing.tiny import FAMILIES, IMAGE_TOKEN, default_rows, tiny_batch, tiny_model

from .reference import QWEN, reduced_rows, reference_generate
from .tables import NEEDS_TRAINED_WEIGHTS, cached_model, runs_on, token_cases
from .test_wrap import NOT_IDENTITY_AT_FULL_BUDGET

CASES = token_cases()


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, family):
    return cached_model(models, family)


@pytest.mark.parametrize("method,family", CASES)
def test_placeholders_without_pixels_pass_through_and_say_so(models, method, family):
    spec = get_method(method)
    model = _model(models, family)
    batch = tiny_batch(model, default_rows(family, n=2))
    text_only = {k: v for k, v in batch.items()
                 if k in ("input_ids", "attention_mask")}  # the image placeholders stay, the pixels go
    with torch.no_grad():
        plain = model(**text_only).logits
    tr.wrap(model, spec.config_cls.at_budget(0.5, num_layers=4))
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            got = model(**text_only).logits
        samples = tr.stats(model).last
    finally:
        tr.unwrap(model)
    torch.testing.assert_close(got, plain, atol=0, rtol=0)
    assert sum("no `pixel_values` was given" in str(w.message) for w in caught) == 1
    for r, s in enumerate(samples):
        n = int((batch["input_ids"][r] == IMAGE_TOKEN).sum())
        assert s.extra["notes"] == [f"`input_ids` hold image placeholder tokens but no `pixel_values` was given: "
                                    f"nothing to reduce, the call passed through ({n} in row {r})"]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_two_dimensional_position_ids(models, family):
    model = _model(models, family)
    batch = tiny_batch(model, default_rows(family, n=2))
    # the caller's 2-D ids (e.g. transformers' left-padding test): the model uses them on every M-RoPE axis
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0) + 5
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["position_ids"]), with_kwargs=True)
    try:
        with torch.no_grad():
            plain = model(**batch, position_ids=positions).logits
            tr.wrap(model, "pool", keep=1.0)
            try:
                same = model(**batch, position_ids=positions).logits
            finally:
                tr.unwrap(model)
            seen.clear()
            tr.wrap(model, "pool", keep=0.25)
            try:
                model(**batch, position_ids=positions)
            finally:
                tr.unwrap(model)
    finally:
        hook.remove()
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=1e-5)
    got = seen[0]
    method = get_method("pool").method_cls(get_method("pool").config_cls(keep=0.25))
    for r, (_, _, cols) in enumerate(reduced_rows(model, method, batch)):
        n = cols.numel()
        for axis in (1, 2, 3):
            assert torch.equal(got[axis, r, -n:], positions[r, cols])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_generate_without_mm_token_type_ids(models, family):
    model = _model(models, family)
    batch = tiny_batch(model, default_rows(family, n=2))
    untyped = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        plain = model.generate(**untyped, max_new_tokens=4, do_sample=False)
        tr.wrap(model, "pool", keep=1.0)
        try:
            same = model.generate(**untyped, max_new_tokens=4, do_sample=False)
        finally:
            tr.unwrap(model)
        tr.wrap(model, "pool", keep=0.25)
        try:
            reduced = model.generate(**untyped, max_new_tokens=4, do_sample=False)
        finally:
            tr.unwrap(model)
    assert torch.equal(same, plain)
    # plain generate gives such inputs text positions (cumsum of the mask) on every axis: the kept tokens keep theirs
    text = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    method = get_method("pool").method_cls(get_method("pool").config_cls(keep=0.25))
    for r, (emb, _, cols) in enumerate(reduced_rows(model, method, batch)):
        expected = reference_generate(model, emb, text[r, cols].expand(3, -1), 4)
        assert reduced[r, -4:].tolist() == expected.tolist()


def test_fastv_default_layer_adapts_to_a_two_layer_model():
    model = tiny_model("llava", num_layers=2)
    batch = tiny_batch(model, default_rows("llava", n=2))
    tr.wrap(model, "fastv")
    try:
        with torch.no_grad():
            model(**batch)
        assert list(tr.stats(model).last[0].layers) == [1]
    finally:
        tr.unwrap(model)
    # an explicit layer is never moved: the refusal names the layers that work
    with pytest.raises(ValueError, match=r"`layer` must be in \[1, 1\] for this model \(2 decoder layers\), got 3"):
        tr.wrap(model, "fastv", layer=3)


# ARES traces one trajectory's entropy per row: it refuses assisted generation.
REFUSES_ASSISTED = {"ares"}
ASSISTED = [pytest.param(s.name, f, id=f"{s.name}-{f}") for s in method_specs() if s.name not in NEEDS_TRAINED_WEIGHTS
            for f in ("llava", "qwen2_vl", "llava_onevision") if runs_on(s, f)]


@pytest.mark.parametrize("method,family", ASSISTED)
def test_assisted_decoding_gives_the_tokens_of_plain_decoding(models, method, family):
    """Greedy assisted decoding (an assistant model; prompt lookup) is lossless: it must give the wrapped
    model's own greedy tokens. The assistant's candidates ride along the prefill, and the features a
    projector method hands ``generate`` are deep-copied for the assistant."""
    model = _model(models, family)
    key = f"{family}-assistant"
    if key not in models:
        models[key] = tiny_model(family, seed=1, num_layers=2)
    batch = tiny_batch(model, default_rows(family, n=1, video=True))
    spec = get_method(method)
    tr.wrap(model, spec.config_cls.at_budget(1.0 if spec.stages == ("decode",) else 0.3, num_layers=4))
    try:
        with torch.no_grad():
            if method in REFUSES_ASSISTED:  # a one-line refusal naming the option, at call time
                with pytest.raises(ValueError, match=rf"^`assistant_model` .* is not supported by method '{method}'"):
                    model.generate(**batch, max_new_tokens=5, do_sample=False, assistant_model=models[key])
                return
            kw = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
            plain = model.generate(**batch, **kw)
            helped = model.generate(**batch, **kw, assistant_model=models[key])
            lookup = model.generate(**batch, **kw, prompt_lookup_num_tokens=2)
    finally:
        tr.unwrap(model)
    for out in (helped, lookup):
        assert out.sequences.tolist() == plain.sequences.tolist()
        # the same logits, not only the same argmax: in-LLM methods choose from the prompt alone
        torch.testing.assert_close(torch.stack(out.logits), torch.stack(plain.logits), atol=1e-5, rtol=1e-5)


def _continue(model, batch, new_tokens=3):
    """Generate, then continue the conversation (two more words) from the returned cache, without pixels."""
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True)
        rows, grown = out.sequences.shape[0], out.sequences.shape[1] - batch["input_ids"].shape[1] + 2
        ids = torch.cat([out.sequences, torch.arange(5, 5 + 2 * rows).view(rows, 2)], 1)
        extra = {"attention_mask": torch.cat([batch["attention_mask"], torch.ones(rows, grown, dtype=torch.long)], 1)}
        if "mm_token_type_ids" in batch:
            extra["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros(rows, grown, dtype=torch.long)], 1)
        return model.generate(input_ids=ids, past_key_values=out.past_key_values, max_new_tokens=new_tokens,
                              do_sample=False, **extra)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["pool", "fastv"])
def test_continuing_from_returned_past_key_values(models, family, method):
    """At keep-all a conversation continues from the returned cache as with the plain model, without a
    warning (the continued prompt's placeholders have their pixels in the cache). With a reduction:
    tests/test_continuation.py."""
    model = _model(models, family)
    batch = tiny_batch(model, default_rows(family, n=2))
    plain = _continue(model, batch)
    tr.wrap(model, method, keep=1.0)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="tokenreduce")
            assert torch.equal(_continue(model, batch), plain)
    finally:
        tr.unwrap(model)


def _embeds_call(model, batch):
    """The batch as a caller giving ``inputs_embeds`` (the embedding of each id) instead of ``input_ids``."""
    out = {k: v for k, v in batch.items() if k != "input_ids"}
    with torch.no_grad():
        out["inputs_embeds"] = model.get_input_embeddings()(batch["input_ids"])
    return out


def _forget_rope_deltas(model):
    # Qwen caches the last call's M-RoPE offsets and reads them for a call without ids: start each call bare.
    if hasattr(model.model, "rope_deltas"):
        model.model.rope_deltas = None


@pytest.mark.parametrize("method,family", CASES)
def test_inputs_embeds_with_pixels_reduce_as_input_ids_do(models, method, family):
    """transformers finds the placeholders of an ``inputs_embeds`` call by comparing each embedding with the
    placeholder's; a wrapped model finds the same ones. At keep-all it reads what the plain model reads; with
    a reduction it gives the output of the same call made with ``input_ids``."""
    spec = get_method(method)
    model = _model(models, family)
    batch = tiny_batch(model, default_rows(family, n=2, video=True))
    embedded = _embeds_call(model, batch)
    real = batch["attention_mask"].bool()
    # Without ids Qwen's forward has no image positions: consecutive ones on every axis (the same call with
    # ids is given those explicitly).
    same_positions = {"position_ids": torch.arange(batch["input_ids"].shape[1]).expand(2, -1)} if family in QWEN else {}
    with torch.no_grad():
        _forget_rope_deltas(model)
        plain = model(**embedded).logits
        tr.wrap(model, spec.config_cls.at_budget(1.0, num_layers=4))
        try:
            _forget_rope_deltas(model)
            kept = model(**embedded).logits
        finally:
            tr.unwrap(model)
        tr.wrap(model, spec.config_cls.at_budget(0.3, num_layers=4))
        try:
            _forget_rope_deltas(model)
            reduced = model(**embedded).logits
            reduced_tokens = [(s.visual_tokens_in, s.visual_tokens_out, dict(s.layers)) for s in tr.stats(model).last]
            with_ids = model(**batch, **same_positions).logits
            with_ids_tokens = [(s.visual_tokens_in, s.visual_tokens_out, dict(s.layers)) for s in tr.stats(model).last]
        finally:
            tr.unwrap(model)
    if method not in NOT_IDENTITY_AT_FULL_BUDGET:
        # padding columns: an in-LLM method gives them no state (they are never read)
        torch.testing.assert_close(kept[real], plain[real], atol=1e-5, rtol=1e-5)
    assert reduced.shape == with_ids.shape
    torch.testing.assert_close(reduced, with_ids, atol=1e-5, rtol=1e-5)
    assert reduced_tokens == with_ids_tokens  # the same items found, reduced to the same counts


GENERATE_EMBEDS = ["pool", "random", "divprune", "fastv", "pdrop"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", GENERATE_EMBEDS)
def test_generate_from_inputs_embeds_with_pixels(models, method, family):
    """``generate(inputs_embeds=..., pixel_values=...)`` (new tokens only, as transformers returns them):
    the plain model's tokens at keep-all, and with a reduction the tokens of the same call with ids."""
    spec = get_method(method)
    model = _model(models, family)
    batch = tiny_batch(model, default_rows(family, n=2, video=True))
    embedded = _embeds_call(model, batch)
    # Qwen's generate gives a call without ids text positions; without `mm_token_type_ids` a call with ids too
    with_ids = {k: v for k, v in batch.items() if not (family in QWEN and k == "mm_token_type_ids")}
    kw = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        plain = model.generate(**embedded, **kw)
        tr.wrap(model, spec.config_cls.at_budget(1.0, num_layers=4))
        try:
            kept = model.generate(**embedded, **kw)
        finally:
            tr.unwrap(model)
        tr.wrap(model, spec.config_cls.at_budget(0.3, num_layers=4))
        try:
            reduced = model.generate(**embedded, **kw)
            reference = model.generate(**with_ids, **kw)
        finally:
            tr.unwrap(model)
    assert torch.equal(kept, plain)
    assert reduced.tolist() == reference[:, -4:].tolist()


def test_inputs_embeds_with_pixels_on_docowl_is_refused():
    """DocOwl's one placeholder per crop stands for many visual tokens: embeddings cannot say where each
    goes, so the call is refused in one line naming what to pass instead."""
    from .doc_correlation.docowl_tiny import docowl_batch, tiny_docowl

    model = tiny_docowl().eval()
    batch = docowl_batch([((1, 2), 1)])
    ids = batch.pop("input_ids")
    embeds = model.get_input_embeddings()(ids.clamp_min(0))
    tr.wrap(model, "pool", keep=0.5)
    try:
        with pytest.raises(ValueError, match=r"^`inputs_embeds` with pixels is not supported for docowl .*; pass `input_ids`$"):
            model(inputs_embeds=embeds, **batch)
    finally:
        tr.unwrap(model)
