"""The shared oracles for stacks of methods (one per stage), derived from the registry for every family.

Cases: for every family, one stack of each kind (vision x llm, projector x llm, projector x decode,
projector x llm x decode) among the registered methods that run on it; the cross product is large, so each
family takes one combination per kind, rotating through the registry's lists so that the families together
cover the methods.

Reference of a stack: the UNWRAPPED model fed the sequence the vision/projector member leaves (the
independent reductions of ``reference.reduced_rows``: a plain reference where ``test_selection`` writes one,
a vision member's recorded choice), with the llm member's definition (``test_llm_stage``, independent of
the core) applied to that reduced sequence by explicit attention masks (``reference.llm_stage_reference``),
and the decode member's own logits processors handed to ``generate``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

import tokenreduce as tr
from tokenreduce.core.api import get_handle
from tokenreduce.core.config import StackConfig
from tokenreduce.core.registry import get_method
from tokenreduce.core.stack import method_in, stack_config
from tokenreduce.testing.tiny import FAMILIES, IMAGE_TOKEN, VIDEO_TOKEN, default_rows, tiny_batch, tiny_model

from .reference import (
    hide_columns,
    llm_stage_reference,
    recorded_reductions,
    reduced_rows,
    visual_tokens,
)
from .tables import methods, runs_on
from .test_llm_stage import CASES as LLM_DEFINITIONS
from .test_llm_stage import _atp_select, _dart_select, _fastv_pdrop_select
from .test_selection import reference_reducer
from .test_wrap import NOT_IDENTITY_AT_FULL_BUDGET

NUM_LAYERS = 6
NEW_TOKENS = 6
KINDS = {
    "vision-llm": (methods("vision"), methods("llm", only=True)),
    "projector-llm": (methods("projector", only=True), methods("llm", only=True)),
    "projector-decode": (methods("projector", only=True), methods("decode", only=True)),
    "projector-llm-decode": (methods("projector", only=True), methods("llm", only=True), methods("decode", only=True)),
}


def stack_cases() -> list:
    """A ``pytest.param(stack, family)`` per family and kind of :data:`KINDS` the family runs: the combination
    holding the most methods no earlier case used (ties: rotating through the registry's order), so the
    families together cover every method that stacks."""
    out, used = [], set()
    for f, family in enumerate(FAMILIES):
        for k, lists in enumerate(KINDS.values()):
            combos = [c for c in itertools.product(*lists) if all(runs_on(get_method(m), family) for m in c)]
            if not combos:
                continue
            start = (5 * f + 3 * k) % len(combos)
            rotated = combos[start:] + combos[:start]
            combo = max(rotated, key=lambda c: len(set(c) - used))  # max keeps the first of equals
            used.update(combo)
            out.append(pytest.param("+".join(combo), family, id=f"{'+'.join(combo)}-{family}"))
    return out


CASES = stack_cases()


class _Models(dict):
    def __missing__(self, family):
        self[family] = tiny_model(family, num_layers=NUM_LAYERS)
        return self[family]


@pytest.fixture(scope="module")
def models():
    return _Models()


def _member_config(name: str, budget: float):
    """A member's config: the llm definitions' own options (``test_llm_stage.CASES``), else its
    ``at_budget``; decode members at keep-all (they take no budget)."""
    spec = get_method(name)
    if budget < 1.0 and name in LLM_DEFINITIONS:
        return spec.config_cls(**LLM_DEFINITIONS[name])
    return spec.config_cls.at_budget(1.0 if spec.stages == ("decode",) else budget, num_layers=NUM_LAYERS)


def _stack(stack: str, budget: float = 0.5) -> StackConfig:
    return StackConfig(configs=tuple(_member_config(m, budget) for m in stack.split("+")))


def _is_visual(batch, cols, r):
    ids = batch["input_ids"][r, cols]
    return (ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)


def _position_ids(pos):
    return pos[:, None, :] if pos.dim() == 2 else pos[None]


def _row_batch(emb, pos):
    return {"inputs_embeds": emb[None], "attention_mask": torch.ones(1, emb.shape[0], dtype=torch.long),
            "position_ids": _position_ids(pos)}


def reference_rows(model, batch, config: StackConfig, recorded):
    """Per row of ``batch``: (reference logits [L', V], its reduced row batch, the prompt columns each llm
    stage keeps, for ``hide_columns``), as the module docstring says."""
    reducer = config.member("projector") or config.member("vision")
    spec = get_method(reducer.method)
    if "vision" in spec.stages:
        rows = reduced_rows(model, None, batch, recorded=recorded)
    else:
        method = reference_reducer(reducer.method, reducer) or spec.method_cls(reducer)
        rows = reduced_rows(model, method, batch, modalities=reducer.modalities or spec.modalities)
    llm = config.member("llm")
    grid = visual_tokens(model, batch)
    out = []
    for r, (emb, pos, cols) in enumerate(rows):
        row = _row_batch(emb, pos)
        if llm is None:
            with torch.no_grad():
                out.append((model(**row).logits[0], row, {}))
            continue
        is_visual = _is_visual(batch, cols, r)[None]
        options = LLM_DEFINITIONS[llm.method]
        if llm.method == "atp":
            # the reduced row's visual columns, each with its item's layout and its source token's index there
            select = _atp_select(options, [{k: grid[r][c] for k, c in enumerate(cols.tolist()) if c in grid[r]}])
        elif llm.method == "dart":  # keys and states of the reduced row's own run
            select = _dart_select(model, row, options, [int(is_visual.sum())])
        else:
            select = _fastv_pdrop_select(options, [int(is_visual.sum())])
        layers = options["layers"] if "layers" in options else (options["layer"],)
        offset = 0 if options.get("score_layer") == "current" else 1
        logits, kept = llm_stage_reference(model, row, layers, select, score_offset=offset, is_visual=is_visual)
        text = (~is_visual[0]).nonzero().flatten()
        prompt = {k: [torch.cat([text, v[0]])] for k, v in kept.items()}
        out.append((logits[0], row, prompt))
    return out


def _decode_hooks(model, config, inputs):
    handle = get_handle(model)
    decode = method_in(handle, "decode")
    if decode is None:
        return {}
    with tr.disabled(model):
        hooks = decode.generation_hooks(handle, inputs)
    return {"logits_processor": LogitsProcessorList(hooks.get("logits_processor", [])),
            "stopping_criteria": StoppingCriteriaList(hooks.get("stopping_criteria", []))}


# Stacks whose members all keep every token at budget 1.0 (test_wrap's exceptions merge or quantize there).
KEEP_ALL = [p for p in CASES if not set(p.values[0].split("+")) & NOT_IDENTITY_AT_FULL_BUDGET]


@pytest.mark.parametrize("stack, family", KEEP_ALL)
def test_keep_all_equals_unwrapped(models, stack, family):
    model = models[family]
    batch = tiny_batch(model, default_rows(family, video=True))
    with torch.no_grad():
        plain = model(**batch).logits
    tr.wrap(model, stack_config(stack, 1.0, NUM_LAYERS))
    try:
        with torch.no_grad():
            got = model(**batch).logits
    finally:
        tr.unwrap(model)
    valid = batch["attention_mask"].bool()  # padding columns read nothing meaningful
    torch.testing.assert_close(got[valid], plain[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stack, family", CASES)
def test_forward_of_three_left_padded_rows_equals_the_reference_and_unwrap_restores(models, stack, family):
    model = models[family]
    batch = tiny_batch(model, default_rows(family, video=True))
    with torch.no_grad():
        plain = model(**batch).logits
    params = {k: v.clone() for k, v in model.state_dict().items()}
    config = _stack(stack)
    tr.wrap(model, config)
    try:
        with torch.no_grad():
            out = model(**batch).logits
        recorded = recorded_reductions(model)
        stages = tr.stats(model).stage_summary()
    finally:
        tr.unwrap(model)
    refs = reference_rows(model, batch, config, recorded)
    for r, (ref, _, _) in enumerate(refs):
        torch.testing.assert_close(out[r, -ref.shape[0]:], ref, atol=1e-4, rtol=1e-4, msg=f"{stack}/{family} row {r}")
    assert out.shape[1] == max(ref.shape[0] for ref, _, _ in refs)  # left padded to the longest row
    assert set(stages) == {*get_handle_stages(config), "prefill_flops_ratio"}
    # unwrap restores exactly: no handle, same parameters, the same logits bit for bit
    assert get_handle(model) is None and "forward" not in model.__dict__
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain)


def get_handle_stages(config: StackConfig) -> set[str]:
    """The stage names ``Stats.stage_summary`` reports for a stack: vision and projector as one entry
    (named by the later) unless a vision-only member precedes a projector member."""
    stages = {s for c in config.configs for s in get_method(c.method).stages}
    if {"vision", "projector"} <= stages:
        stages.discard("vision")
    return stages


@pytest.mark.parametrize("beams", [1, 2], ids=["greedy", "beams"])
@pytest.mark.parametrize("stack, family", CASES)
def test_generate_equals_the_reduced_reference(models, stack, family, beams):
    model = models[family]
    batch = tiny_batch(model, default_rows(family, video=True))
    config = _stack(stack)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=beams)
    decode = config.member("decode")
    if decode is not None and beams > 1:
        refused = _refusal(model, decode, batch, kwargs)
        if refused is not None:  # a decode member that refuses beams: the stack refuses them in its words
            with pytest.raises(type(refused)) as info:
                _refusal(model, config, batch, kwargs, reraise=True)
            assert str(info.value) == str(refused)
            return
    tr.wrap(model, config)
    try:
        with torch.no_grad():
            tokens = model.generate(**batch, **kwargs)
            model(**batch)  # the reductions of this batch, for a vision member's reference
        recorded = recorded_reductions(model)
        references = []
        for ref in reference_rows(model, batch, config, recorded):
            references.append((ref, _decode_hooks(model, config, dict(ref[1], **kwargs))))
    finally:
        tr.unwrap(model)
    ids = batch["input_ids"]
    assert torch.equal(tokens[:, : ids.shape[1]], ids)
    for r, ((_, row, prompt), hooks) in enumerate(references):
        kept = {k: v * beams for k, v in prompt.items()}
        with hide_columns(model, kept, row["attention_mask"].shape[1]) if kept else _nothing(), torch.no_grad():
            expected = model.generate(**row, **kwargs, **hooks)[0, -NEW_TOKENS:]
        assert tokens[r, ids.shape[1]:].tolist() == expected.tolist(), f"{stack}/{family} row {r}"


def _refusal(model, config, batch, kwargs, reraise=False):
    """The error ``generate`` of ``model`` wrapped with ``config`` raises with ``kwargs``, or None."""
    tr.wrap(model, config)
    try:
        with torch.no_grad():
            model.generate(**batch, **kwargs)
    except ValueError as err:
        if reraise:
            raise
        return err
    finally:
        tr.unwrap(model)
    return None


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_cases_cover_every_kind_and_the_registrys_methods():
    """The sample is derived from the registry: every kind runs on some family, and every projector-only,
    llm and decode method (langdc aside: trained weights) is in some case."""
    used = {m for p in CASES for m in p.values[0].split("+")}
    for kind, lists in KINDS.items():
        assert any(all(m in used for m in combo) for combo in itertools.product(*lists)), kind
    for stage in ("projector", "llm", "decode"):
        assert set(methods(stage, only=True)) <= used, stage
