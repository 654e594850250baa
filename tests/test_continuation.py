"""Continuing a conversation from the cache a reducing ``generate`` returned, for every reducing method on
every family (the table comes from the registry), a left-padded batch of two rows, two turns.

The caller continues as with the plain model: the returned ``sequences``, then new ids, with
``past_key_values=`` the returned cache. The oracle is the UNWRAPPED model on the whole conversation with
the prompt reduced as the first call reduced it: for a method acting before the LLM, the reduced prompt's
embeddings and original positions (``tests/reference.py``) followed by the later tokens, whose positions
count on from the prompt's last; for an in-LLM method, the conversation with the dropped prompt tokens
hidden from the layers they were dropped at (``hide_columns``). Greedy tokens and logits must match.
"""

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.api import get_handle
from tokenreduce.core.registry import get_method, method_specs
from tokenreduce.testing.tiny import IMAGE_TOKEN, VIDEO_TOKEN, default_rows, tiny_batch, tiny_model

from .reference import hide_columns, recorded_reductions, reduced_rows
from .tables import NEEDS_TRAINED_WEIGHTS, cached_model, runs_on, token_cases

NUM_LAYERS = 4
NEW = 3  # tokens generated per turn
CASES = token_cases()


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, family):
    return cached_model(models, family, num_layers=NUM_LAYERS)


def _turn(model, batch, ids, mask, cache):
    """One more turn: ``ids`` (the conversation so far, in the caller's columns) continued from ``cache``."""
    extra = {}
    if "mm_token_type_ids" in batch:
        types = batch["mm_token_type_ids"]
        extra["mm_token_type_ids"] = torch.cat([types, types.new_zeros(ids.shape[0], ids.shape[1] - types.shape[1])], 1)
    return model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW,
                          do_sample=False, return_dict_in_generate=True, output_logits=True, **extra)


def _grow(sequences, mask, turn):
    """The conversation after a turn: the returned sequences, then two new ids (the user's next words)."""
    rows = sequences.shape[0]
    new = torch.arange(11 + 2 * turn, 11 + 2 * turn + 2 * rows).view(rows, 2)
    ids = torch.cat([sequences, new], 1)
    return ids, torch.cat([mask, mask.new_ones(rows, ids.shape[1] - mask.shape[1])], 1)


def _conversation(model, batch, other):
    """Prompt, then two continued turns; another conversation's call runs between the turns (the state of a
    conversation lives with its cache). Returns the last turn's output, the conversation's ids and the
    first turn's record (kept columns of an in-LLM method, reductions of the others)."""
    first = model.generate(**batch, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
    handle = get_handle(model)
    if handle.llm_stage is not None:
        record = {s.layer: s.columns.clone() for s in handle.llm_stage.stages}
    else:
        record = recorded_reductions(model)
    model.generate(**other, max_new_tokens=1, do_sample=False)
    ids, mask = _grow(first.sequences, batch["attention_mask"], 0)
    second = _turn(model, batch, ids, mask, first.past_key_values)
    assert torch.equal(second.sequences[:, : ids.shape[1]], ids)  # the caller's conversation, as given
    ids, mask = _grow(second.sequences, mask, 1)
    third = _turn(model, batch, ids, mask, first.past_key_values)
    return third, ids, mask, record


def _reference_before_llm(model, method, batch, record, ids):
    """Per row: the last turn's tokens and logits of the unwrapped model fed the reduced prompt's embeddings
    and positions, then the conversation's later tokens (positions counting on from the prompt's last)."""
    length = batch["input_ids"].shape[1]
    embed = model.get_input_embeddings()
    out = []
    for r, (emb, pos, _) in enumerate(reduced_rows(model, method, batch, recorded=record)):
        later = ids[r, length:]
        steps = torch.arange(1, later.numel() + 1)
        emb = torch.cat([emb, embed(later).detach()])
        pos = torch.cat([pos, pos[..., -1:] + steps.expand(*pos.shape[:-1], -1)], -1)
        position_ids = pos[:, None, :] if pos.dim() == 2 else pos[None]
        with torch.no_grad():
            gen = model.generate(inputs_embeds=emb[None], attention_mask=torch.ones(1, emb.shape[0], dtype=torch.long),
                                 position_ids=position_ids, max_new_tokens=NEW, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True)
        out.append((gen.sequences[0, -NEW:], torch.stack(gen.logits)[:, 0]))
    return out


def _reference_in_llm(model, batch, kept_columns, ids, mask):
    """The last turn of the unwrapped model on the whole conversation (pixels, original positions), the
    prompt tokens the first turn dropped at layer K hidden from layers >= K."""
    length = batch["input_ids"].shape[1]
    prompt_ids = batch["input_ids"]
    is_visual = (prompt_ids == IMAGE_TOKEN) | (prompt_ids == VIDEO_TOKEN)
    kept = {}
    for layer, cols in kept_columns.items():
        kept[layer] = []
        for r in range(cols.shape[0]):
            c = cols[r][cols[r] >= 0]
            visual = c[is_visual[r, c]]
            text = (batch["attention_mask"][r].bool() & ~is_visual[r]).nonzero().flatten()
            kept[layer].append(torch.cat([text, visual]))
    call = {**batch, "input_ids": ids, "attention_mask": mask}
    if "mm_token_type_ids" in batch:
        types = batch["mm_token_type_ids"]
        call["mm_token_type_ids"] = torch.cat([types, types.new_zeros(ids.shape[0], ids.shape[1] - length)], 1)
    with hide_columns(model, kept, length), torch.no_grad():
        gen = model.generate(**call, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    logits = torch.stack(gen.logits)
    return [(gen.sequences[r, -NEW:], logits[:, r]) for r in range(ids.shape[0])]


@pytest.mark.parametrize("method,family", CASES)
def test_continuing_a_reduced_conversation_equals_the_reduced_sequence_continued(models, method, family):
    spec = get_method(method)
    model = _model(models, family)
    batch = tiny_batch(model, default_rows(family, n=2, video=True))
    other = tiny_batch(model, default_rows(family, n=1))
    config = spec.config_cls.at_budget(0.4, num_layers=NUM_LAYERS)
    tr.wrap(model, config)
    try:
        with torch.no_grad():
            last, ids, mask, record = _conversation(model, batch, other)
    finally:
        tr.unwrap(model)
    if "llm" in spec.stages:
        expected = _reference_in_llm(model, batch, record, ids, mask)
    else:
        expected = _reference_before_llm(model, spec.method_cls(config), batch, record, ids)
    logits = torch.stack(last.logits)
    for r, (tokens, ref_logits) in enumerate(expected):
        assert last.sequences[r, -NEW:].tolist() == tokens.tolist(), f"row {r}"
        torch.testing.assert_close(logits[:, r], ref_logits, atol=1e-4, rtol=1e-4, msg=f"row {r}")


def _first_turn(model, batch):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)


@pytest.mark.parametrize("method", ["pool", "fastv"])
def test_what_cannot_continue_is_refused_in_one_line(models, method):
    """A prefix that is not the cached prompt, ids holding only the new tokens, new pixels in a continued
    turn, a conversation begun from ``inputs_embeds``, and pixels with a cache tokenreduce did not produce
    (and that reaches the visual tokens): each refused at call time, in one line naming what to do."""
    model = _model(models, "llava")
    batch = tiny_batch(model, default_rows("llava", n=2))
    length = batch["input_ids"].shape[1]
    with torch.no_grad():
        foreign = model.generate(**batch, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
    tr.wrap(model, method, keep=0.25)
    try:
        first = _first_turn(model, batch)
        ids, mask = _grow(first.sequences, batch["attention_mask"], 0)
        cache = first.past_key_values
        changed = ids.clone()
        changed[:, length - 1] += 1
        one = "[^\n]*$"
        with torch.no_grad():
            with pytest.raises(ValueError, match=rf"^`generate`: `input_ids` do not begin with the prompt{one}"):
                model.generate(input_ids=changed, attention_mask=mask, past_key_values=cache, max_new_tokens=1)
            with pytest.raises(ValueError, match=rf"^`generate` continuing from `past_key_values` of a wrapped model "
                                                 rf"needs `input_ids` holding the whole conversation{one}"):
                model.generate(input_ids=ids[:, -2:], attention_mask=mask, past_key_values=cache, max_new_tokens=1)
            with pytest.raises(ValueError, match=rf"^`generate` cannot add pixel values \(pixel_values\){one}"):
                model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=1,
                               pixel_values=batch["pixel_values"])
            embeds = {k: v for k, v in batch.items() if k != "input_ids"}
            embeds["inputs_embeds"] = model.get_input_embeddings()(batch["input_ids"])
            begun = model.generate(**embeds, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
            with pytest.raises(ValueError, match=rf"^`generate` cannot continue from `past_key_values` of a "
                                                 rf"conversation begun from `inputs_embeds`{one}"):
                model.generate(input_ids=ids, attention_mask=mask, past_key_values=begun.past_key_values,
                               max_new_tokens=1)
            if method == "pool":  # an in-LLM method reduces nothing of a continued prompt: nothing to misalign
                with pytest.raises(ValueError, match=rf"^`generate` got pixel values with a `past_key_values` that "
                                                     rf"tokenreduce did not produce{one}"):
                    model.generate(**{**batch, "input_ids": ids, "attention_mask": mask},
                                   past_key_values=foreign.past_key_values, max_new_tokens=1)
                with pytest.raises(ValueError, match=rf"^`forward` cannot continue from `past_key_values` whose prompt "
                                                     rf"tokenreduce reduced before the LLM{one}"):
                    model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=cache)
    finally:
        tr.unwrap(model)


def test_a_cached_text_prefix_before_the_image_lines_up():
    """A cache of the text before the first visual token (a cached system prompt, filled by the plain
    model) lines up with the reduced prompt: ``generate`` gives the tokens it gives without the cache."""
    model = tiny_model("llava", num_layers=NUM_LAYERS)
    batch = tiny_batch(model, default_rows("llava", n=1))
    prefix = int((batch["input_ids"][0] == IMAGE_TOKEN).nonzero()[0])
    with torch.no_grad():
        cached = model(input_ids=batch["input_ids"][:, :prefix], attention_mask=batch["attention_mask"][:, :prefix],
                       use_cache=True).past_key_values
    tr.wrap(model, "pool", keep=0.25)
    try:
        with torch.no_grad():
            alone = model.generate(**batch, max_new_tokens=NEW, do_sample=False)
            after = model.generate(**batch, past_key_values=cached, max_new_tokens=NEW, do_sample=False)
    finally:
        tr.unwrap(model)
    assert after.tolist() == alone.tolist()


def _representatives():
    """The first reducing method (registry order) of each set of stages: they share the core's paths."""
    first = {}
    for s in method_specs():
        if {"vision", "projector", "llm"} & set(s.stages) and s.name not in NEEDS_TRAINED_WEIGHTS:
            first.setdefault(s.stages, s.name)
    return sorted(first.values())


STATIC = [pytest.param(m, f, id=f"{m}-{f}") for m in _representatives() for f in ("llava", "qwen2_vl")
          if runs_on(get_method(m), f)]


@pytest.mark.parametrize("method,family", STATIC)
def test_continuing_on_a_static_cache_gives_the_dynamic_caches_tokens(models, method, family):
    """A conversation on a caller-made ``StaticCache`` (long enough for every turn) continues as on the
    dynamic cache (whose turns the oracle above checks): the same tokens and logits."""
    from transformers import StaticCache

    model = _model(models, family)
    batch = tiny_batch(model, default_rows(family, n=2))
    tr.wrap(model, get_method(method).config_cls.at_budget(0.4, num_layers=NUM_LAYERS))
    try:
        with torch.no_grad():
            outs = []
            for cache in (None, StaticCache(config=model.config.get_text_config(), max_cache_len=96)):
                first = model.generate(**batch, past_key_values=cache, max_new_tokens=NEW, do_sample=False,
                                       return_dict_in_generate=True)
                ids, mask = _grow(first.sequences, batch["attention_mask"], 0)
                outs.append(_turn(model, batch, ids, mask, first.past_key_values))
    finally:
        tr.unwrap(model)
    dynamic, static = outs
    assert static.sequences.tolist() == dynamic.sequences.tolist()
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["pool", "fastv"])
def test_a_reset_cache_begins_a_new_conversation(models, method):
    """A caller's cache emptied (``reset()``) and given to a new conversation forgets the old one: the new
    conversation continues as it does on a fresh cache, whether it holds an image or only text."""
    from transformers import StaticCache

    model = _model(models, "llava")
    batch = tiny_batch(model, default_rows("llava", n=2))
    other = tiny_batch(model, default_rows("llava", n=3))
    other = {k: v[1:] if torch.is_tensor(v) else v for k, v in other.items()}  # different rows
    text = {"input_ids": batch["input_ids"][:, -4:], "attention_mask": batch["attention_mask"][:, -4:]}

    def conversation(inputs, cache):
        first = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, do_sample=False,
                               return_dict_in_generate=True)
        ids, mask = _grow(first.sequences, inputs["attention_mask"], 0)
        return _turn(model, inputs, ids, mask, first.past_key_values).sequences

    config = get_method(method).config_cls.at_budget(0.4, num_layers=NUM_LAYERS)
    tr.wrap(model, config)
    try:
        with torch.no_grad():
            reused = StaticCache(config=model.config.get_text_config(), max_cache_len=96)
            conversation(batch, reused)
            for inputs in (other, text):
                reused.reset()
                fresh = conversation(inputs, StaticCache(config=model.config.get_text_config(), max_cache_len=96))
                assert conversation(inputs, reused).tolist() == fresh.tolist()
    finally:
        tr.unwrap(model)
