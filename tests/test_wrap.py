"""wrap / unwrap / disabled / stats on every family: keep-all equivalence, exact undo, isolation, errors."""

import copy

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.api import get_handle
from tokenreduce.core.registry import get_method, method_specs
from tokenreduce.testing.tiny import FAMILIES, VIDEO_FAMILIES, default_rows, tiny_batch, tiny_model

REDUCING = [s.name for s in method_specs() if set(s.stages) & {"projector", "vision", "llm"}]
# PruMerge merges neighbours into every kept token, so keeping every token is not the identity. VQToken
# feeds one token per distinct code at sequential positions (the paper's) without OneVision's video newline.
# LangDC adds soft caption tokens (from a trained captioner) to whatever the base branch keeps.
NOT_IDENTITY_AT_FULL_BUDGET = {"prumerge", "prumerge_plus", "vqtoken", "vqtoken_codebook", "langdc"}
KEEP_ALL = [(m, f) for m in REDUCING if m not in NOT_IDENTITY_AT_FULL_BUDGET for f in FAMILIES
            if get_method(m).families is None or f in get_method(m).families]


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in FAMILIES}


def _snapshot(model):
    return {
        "class": type(model),
        "dict_keys": set(model.__dict__),
        "modules": {n: type(m) for n, m in model.named_modules()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


@pytest.mark.parametrize("method, family", KEEP_ALL, ids=[f"{m}-{f}" for m, f in KEEP_ALL])
def test_keep_all_equals_unwrapped(models, method, family):
    model = models[family]
    batch = tiny_batch(model, default_rows(family, video=True))
    with torch.no_grad():
        reference = model(**batch).logits
    num_layers = model.config.get_text_config().num_hidden_layers
    tr.wrap(model, get_method(method).config_cls.at_budget(1.0, num_layers=num_layers))
    try:
        with torch.no_grad():
            out = model(**batch).logits
    finally:
        tr.unwrap(model)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out[valid], reference[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_unwrap_restores_everything(models, family):
    model = models[family]
    batch = tiny_batch(model, default_rows(family))
    before = _snapshot(model)
    with torch.no_grad():
        reference = model(**batch).logits
        ref_gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
    tr.wrap(model, "pool", keep=0.25)
    assert get_handle(model) is not None
    with torch.no_grad():
        model(**batch)
        model.generate(**batch, max_new_tokens=4, do_sample=False)
    tr.unwrap(model)
    after = _snapshot(model)
    assert get_handle(model) is None
    assert after["class"] is before["class"]
    assert after["dict_keys"] == before["dict_keys"]
    assert after["modules"] == before["modules"]
    assert after["hooks"] == before["hooks"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)
        assert torch.equal(model.generate(**batch, max_new_tokens=4, do_sample=False), ref_gen)


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
              "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
              "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _full_snapshot(model):
    """Everything wrapping may touch: classes, instance attributes and every hook dict of every submodule,
    the global module hooks, the weights."""
    import torch.nn.modules.module as module_globals

    return {
        "modules": {n: (type(m), sorted(m.__dict__)) for n, m in model.named_modules()},
        "hooks": {(n, d): dict(getattr(m, d)) for n, m in model.named_modules() for d in HOOK_DICTS if hasattr(m, d)},
        "global": [dict(getattr(module_globals, g)) for g in dir(module_globals) if g.startswith("_global_")
                   and isinstance(getattr(module_globals, g), dict)],
        "class": type(model), "dict": sorted(model.__dict__),
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def _unwrap_case(spec):
    """A family whose inputs the method reduces, and the batch rows (videos for video-only methods)."""
    video = "image" not in spec.modalities
    families = [f for f in (VIDEO_FAMILIES if video else FAMILIES) if spec.families is None or f in spec.families]
    return families[0], video


@pytest.mark.parametrize("name", [s.name for s in method_specs()])
def test_unwrap_restores_everything_for_every_method(models, name, tmp_path):
    """Each registered method, wrapped, run (forward and generate) and unwrapped, leaves the module tree, every
    hook dict of every submodule, the weights and the outputs as they were."""
    spec = get_method(name)
    family, video = _unwrap_case(spec)
    model = models[family]
    batch = tiny_batch(model, default_rows(family, video=video))
    before = _full_snapshot(model)
    with torch.no_grad():
        reference = model(**batch).logits
        ref_gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
    num_layers = model.config.get_text_config().num_hidden_layers
    options = {}
    if name == "langdc":
        from tests.langdc.helpers import fit_tiny_captioner

        fit_tiny_captioner(tmp_path / "captioner", family, model)
        options["captioner"] = str(tmp_path / "captioner")
    config = spec.config_cls.at_budget(1.0 if spec.stages == ("decode",) else 0.5, num_layers=num_layers, **options)
    tr.wrap(model, config)
    try:
        during = _full_snapshot(model)  # the snapshot sees the wrapping
        assert any(during[k] != before[k] for k in ("dict", "modules", "hooks"))
        with torch.no_grad():
            reduced = model(**batch).logits
            model.generate(**batch, max_new_tokens=3, do_sample=False)
        if spec.stages != ("decode",):  # the method reduced something: its hooks were live
            assert tr.stats(model).samples[-1].visual_tokens_out < tr.stats(model).samples[-1].visual_tokens_in
        assert reduced.shape[0] == reference.shape[0]
    finally:
        tr.unwrap(model)
    after = _full_snapshot(model)
    assert get_handle(model) is None
    for key in ("class", "dict", "modules", "hooks", "global"):
        assert after[key] == before[key], key
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)
        assert torch.equal(model.generate(**batch, max_new_tokens=3, do_sample=False), ref_gen)


def test_two_models_of_the_same_class_are_independent():
    a, b = tiny_model("llava", seed=0), tiny_model("llava", seed=0)
    batch = tiny_batch(a, default_rows("llava"))
    with torch.no_grad():
        reference = b(**batch).logits
    tr.wrap(a, "pool", keep=0.25)
    try:
        with torch.no_grad():
            reduced = a(**batch).logits
            untouched = b(**batch).logits
    finally:
        tr.unwrap(a)
    assert reduced.shape[1] < reference.shape[1]
    assert torch.equal(untouched, reference)
    assert get_handle(b) is None
    assert "forward" not in type(a).__dict__ or type(a).forward is type(b).forward


def test_disabled_runs_the_original(models):
    model = models["llava"]
    batch = tiny_batch(model, default_rows("llava"))
    with torch.no_grad():
        reference = model(**batch).logits
    tr.wrap(model, "pool", keep=0.25)
    try:
        with tr.disabled(model), torch.no_grad():
            out = model(**batch).logits
            gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
        with torch.no_grad():
            reduced = model(**batch).logits
    finally:
        tr.unwrap(model)
    assert torch.equal(out, reference)
    assert gen.shape == (3, batch["input_ids"].shape[1] + 3)
    assert reduced.shape[1] < reference.shape[1]


def test_stats_record_per_sample_tokens_and_time(models):
    model = models["llava_next"]
    batch = tiny_batch(model, default_rows("llava_next"))
    tr.wrap(model, "pool", keep=0.5)
    try:
        with torch.no_grad():
            model(**batch)
        s = tr.stats(model)
        assert len(s.samples) == 3
        for row in s.samples:
            assert row.visual_tokens_in > row.visual_tokens_out > 0
            assert row.reducer_ms >= 0
            assert row.to_dict()["items"][0]["modality"] == "image"
        snap = tr.stats(model, reset=True)
        assert len(snap.samples) == 3 and len(tr.stats(model).samples) == 0
        assert "->" in repr(snap)
    finally:
        tr.unwrap(model)


def test_text_only_inputs_pass_through(models):
    model = models["llava"]
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    tr.wrap(model, "random", keep=0.5)
    try:
        with torch.no_grad():
            out = model(input_ids=ids).logits
    finally:
        tr.unwrap(model)
    assert torch.equal(out, reference)


def test_generate_positional_inputs_and_deepcopy_of_unwrapped(models):
    model = models["llava"]
    batch = tiny_batch(model, default_rows("llava", n=1))
    tr.wrap(model, "pool", keep=0.25)
    try:
        ids = batch.pop("input_ids")
        with torch.no_grad():
            out = model.generate(ids, **batch, max_new_tokens=2, do_sample=False)
        assert torch.equal(out[:, : ids.shape[1]], ids)
    finally:
        tr.unwrap(model)
    clone = copy.deepcopy(model)
    assert get_handle(clone) is None


# ----- errors a user can cause --------------------------------------------------------------------------
def test_unknown_method_lists_known(models):
    with pytest.raises(ValueError, match=r"unknown method 'nope'; known methods: .*pool.*random"):
        tr.wrap(models["llava"], "nope")


def test_unsupported_model_names_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(TypeError, match=r"unsupported model type 'llama'; supported families: docowl, llava, "):
        tr.wrap(lm, "random")
    with pytest.raises(TypeError, match=r"no `config\.model_type`"):
        tr.wrap(torch.nn.Linear(2, 2), "random")


def test_wrapping_twice_is_refused(models):
    model = models["llava"]
    tr.wrap(model, "random")
    try:
        with pytest.raises(ValueError, match="already wrapped with method 'random'"):
            tr.wrap(model, "pool")
    finally:
        tr.unwrap(model)
    with pytest.raises(ValueError, match="not wrapped"):
        tr.unwrap(model)


@pytest.mark.parametrize("keep, message", [
    (0, r"`keep` as a token count must be >= 1, got 0"),
    (-3, r"`keep` as a token count must be >= 1, got -3"),
    (1.5, r"`keep` as a fraction must be in \(0, 1\], got 1.5"),
    (0.0, r"`keep` as a fraction must be in \(0, 1\], got 0.0"),
    ("half", r"`keep` must be a token count \(int >= 1\) or a fraction \(float in \(0, 1\]\), got 'half'"),
    (True, r"`keep` must be a token count"),
])
def test_bad_budget(models, keep, message):
    with pytest.raises(ValueError, match=message):
        tr.wrap(models["llava"], "pool", keep=keep)
    assert get_handle(models["llava"]) is None


def test_option_of_another_method(models):
    with pytest.raises(TypeError, match=r"method 'pool' got unexpected option\(s\) 'seed'; accepted options: .*keep"):
        tr.wrap(models["llava"], "pool", seed=3)


def test_called_without_images(models):
    """Placeholders without pixels: the plain model embeds them as tokens; the wrapped one passes through
    (tests/test_plain_inputs.py checks every method and the note in tr.stats)."""
    model = models["llava"]
    batch = tiny_batch(model, default_rows("llava"))
    batch.pop("pixel_values")
    with torch.no_grad():
        plain = model.generate(**batch, max_new_tokens=2, do_sample=False)
    tr.wrap(model, "pool")
    try:
        with pytest.warns(UserWarning, match="no `pixel_values` was given: nothing to reduce"), torch.no_grad():
            got = model.generate(**batch, max_new_tokens=2, do_sample=False)
    finally:
        tr.unwrap(model)
    assert torch.equal(got, plain)


def test_wrap_with_config_object_and_extra_options(models):
    with pytest.raises(TypeError, match="set them on the config instead"):
        tr.wrap(models["llava"], tr.PoolConfig(keep=0.5), keep=0.2)
    with pytest.raises(TypeError, match="must be a method name or a MethodConfig"):
        tr.wrap(models["llava"], 42)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("wrapped_vlm", [False, True], ids=["plain_vlm", "wrapped_vlm"])
def test_submodule_of_a_vlm_is_refused_naming_the_model_to_wrap(family, wrapped_vlm):
    model = tiny_model(family)
    if wrapped_vlm:
        tr.wrap(model, "pool", keep=0.5)
    tower = model.model.vision_tower if family == "llava" else model.model.visual
    cls = type(model).__name__
    for sub, path, method in ((tower, "model.vision_tower" if family == "llava" else "model.visual", "tome"),
                              (model.model.language_model, "model.language_model", "fastv"),
                              (model.model, "model", "pool")):
        if method == "tome" and family != "llava":
            method = "pool"
        with pytest.raises(TypeError, match=rf"^cannot wrap {type(sub).__name__}: it is `{path}` inside {cls}, .*wrap the {cls} itself"):
            tr.wrap(sub, method)
        assert get_handle(sub) is None
    if wrapped_vlm:
        tr.unwrap(model)


def test_bare_tower_outside_a_vlm_is_still_wrapped():
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel(tiny_model("llava").config.vision_config)
    tr.wrap(tower, "tome", r=2)
    assert get_handle(tower) is not None
    tr.unwrap(tower)
