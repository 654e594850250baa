"""Unit tests of the core's pure-Python parts (configs, registry, FLOPs, statistics), each reference written
from the definition, not read from the code under test (issue #36: mutation testing of the core).

No model is built: every test runs in milliseconds, so the ``core`` mutation group runs them per mutant.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pickle
import time
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch

from tokenreduce.core import registry
from tokenreduce.core.config import (
    BUDGET_MEANING,
    CONFIG_NAME,
    MethodConfig,
    build_config,
    check_choice,
    check_increasing_layers,
    check_keep,
    check_range,
    config_at_budget,
    resolve_keep,
)
from tokenreduce.core.flops import Geometry
from tokenreduce.core.stats import (
    Elapsed,
    ItemStats,
    LazyCount,
    SampleStats,
    Stats,
    budget_missed,
    timer,
)

# ----- a probe method registered for the duration of a test -------------------------------------------


@dataclasses.dataclass
class ProbeConfig(MethodConfig):
    """A config exercising every kind of field the JSON round trip restores."""

    keep: int | float = 0.5
    layers: tuple[int, ...] = (2, 4)
    rates: tuple[float, ...] = dataclasses.field(default_factory=lambda: (0.5,))
    names: list[str] | None = None

    def validate(self) -> None:
        check_keep("keep", self.keep)


@dataclasses.dataclass
class DerivedConfig(MethodConfig):
    """A config with a field set by ``validate``, not by the caller."""

    keep: float = 0.5
    derived: int = dataclasses.field(default=0, init=False)

    def validate(self) -> None:
        self.derived = 7


class ProbeMethod:
    """Probe method: first line of its docstring.

    More text the description leaves out.
    """

    stages = ("projector",)


class DecodeProbe:
    stages = ("decode",)


@pytest.fixture
def probe(monkeypatch):
    """``probe_method`` registered in a copy of the registry (the real one restored afterwards)."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(registry, "_PLUGIN_ERRORS", {})
    monkeypatch.setattr(ProbeConfig, "method", "")
    registry.register_method("probe_method", config_cls=ProbeConfig)(ProbeMethod)
    return registry.get_method("probe_method")


# ----- budgets --------------------------------------------------------------------------------------------


def _ceil_share(keep: float, total: int) -> int:
    """The definition: the smallest count holding ``keep`` of ``total`` (the decimal share, exactly)."""
    exact = Fraction(str(keep)) * total
    return max(1, min(total, math.ceil(exact)))


@pytest.mark.parametrize("total", [1, 2, 3, 7, 10, 13, 30, 97, 576, 729])
@pytest.mark.parametrize("keep", [0.1, 0.25, 0.3, 0.35, 1 / 3, 0.5, 0.7, 0.9, 0.999, 1.0])
def test_resolve_keep_rounds_a_share_up_at_budgets_that_do_not_divide(keep, total):
    reference = _ceil_share(keep, total) if keep != 1 / 3 else max(1, math.ceil(Fraction(total, 3)))
    assert resolve_keep(keep, total) == reference
    assert type(resolve_keep(keep, total)) is int


def test_resolve_keep_counts_and_empty_totals():
    assert resolve_keep(0.5, 0) == 0
    assert resolve_keep(5, 0) == 0
    assert resolve_keep(0.5, -3) == 0
    assert resolve_keep(1, 1) == 1
    assert resolve_keep(7, 7) == 7
    assert resolve_keep(8, 7) == 7
    assert resolve_keep(6, 7) == 6
    assert resolve_keep(0.001, 7) == 1  # at least one
    assert resolve_keep(0.01, 1000) == 10
    assert resolve_keep(0.011, 1000) == 11


@pytest.mark.parametrize("value", [1, 2, 10**6, 1e-9, 0.5, 1.0])
def test_check_keep_accepts_counts_and_fractions(value):
    check_keep("keep", value)


@pytest.mark.parametrize("value,message", [
    (0, "`keep` as a token count must be >= 1, got 0"),
    (-2, "`keep` as a token count must be >= 1, got -2"),
    (0.0, "`keep` as a fraction must be in (0, 1], got 0.0"),
    (-0.5, "`keep` as a fraction must be in (0, 1], got -0.5"),
    (1.5, "`keep` as a fraction must be in (0, 1], got 1.5"),
    (float("nan"), "`keep` as a fraction must be in (0, 1], got nan"),
    (True, "`keep` must be a token count (int >= 1) or a fraction (float in (0, 1]), got True"),
    (False, "`keep` must be a token count (int >= 1) or a fraction (float in (0, 1]), got False"),
    ("0.5", "`keep` must be a token count (int >= 1) or a fraction (float in (0, 1]), got '0.5'"),
    (None, "`keep` must be a token count (int >= 1) or a fraction (float in (0, 1]), got None"),
])
def test_check_keep_refuses_in_one_line(value, message):
    with pytest.raises(ValueError) as err:
        check_keep("keep", value)
    assert str(err.value) == message


# ----- ranges, layers, choices --------------------------------------------------------------------------------


def test_check_range_bounds_open_and_closed():
    check_range("x", 0.0, 0.0, 1.0)  # closed ends hold their bounds
    check_range("x", 1.0, 0.0, 1.0)
    check_range("x", 1, 0.0, 1.0)  # an int is a number
    check_range("x", -1e300)  # no bounds
    check_range("x", float("inf"), 0.0)
    check_range("n", 0, 0, integer=True)
    for value, kwargs, interval in [
        (0.0, dict(low=0.0, high=1.0, low_open=True), "(0.0, 1.0]"),
        (1.0, dict(low=0.0, high=1.0, high_open=True), "[0.0, 1.0)"),
        (-0.1, dict(low=0.0), "[0.0, inf]"),
        (2, dict(high=1), "[-inf, 1]"),
        (1.5, dict(low=0.0, high=1.0), "[0.0, 1.0]"),
        (-1e-12, dict(low=0.0, high=1.0), "[0.0, 1.0]"),
        (0, dict(low=1, integer=True), "[1, inf]"),
    ]:
        with pytest.raises(ValueError) as err:
            check_range("x", value, **kwargs)
        assert str(err.value) == f"`x` must be in {interval}, got {value!r}"
    check_range("x", 0.5, 0.0, 1.0, low_open=True, high_open=True)


@pytest.mark.parametrize("value,integer,kind", [
    (float("nan"), False, "a number"), ("1", False, "a number"), (True, False, "a number"), (None, False, "a number"),
    (1.0, True, "an int"), (False, True, "an int"), ("3", True, "an int"),
])
def test_check_range_refuses_what_is_not_a_number(value, integer, kind):
    with pytest.raises(ValueError) as err:
        check_range("x", value, 0, 10, integer=integer)
    assert str(err.value) == f"`x` must be {kind}, got {value!r}"


def test_check_increasing_layers():
    assert check_increasing_layers("layers", [1, 3, 7]) == (1, 3, 7)
    assert check_increasing_layers("layers", iter([2])) == (2,)
    assert check_increasing_layers("layers", ()) == ()
    for layers in [(3, 2), (2, 2), (1, 3, 3), (1, 4, 2)]:
        with pytest.raises(ValueError) as err:
            check_increasing_layers("layers", layers)
        assert str(err.value) == f"`layers` must be strictly increasing, got {layers}"
    with pytest.raises(ValueError) as err:
        check_increasing_layers("layers", (0, 2))
    assert str(err.value) == "`layers` must be in [1, inf], got 0"
    with pytest.raises(ValueError) as err:
        check_increasing_layers("layers", (1, 2.0))
    assert str(err.value) == "`layers` must be an int, got 2.0"


def test_check_choice():
    check_choice("mode", "a", ["a", "b"])
    check_choice("mode", 0, (0, 1))  # a falsy choice is a choice
    with pytest.raises(ValueError) as err:
        check_choice("mode", "c", iter(["a", "b"]))
    assert str(err.value) == "`mode` must be one of ('a', 'b'), got 'c'"


# ----- MethodConfig -------------------------------------------------------------------------------------------


def test_common_options_of_a_config(probe):
    config = ProbeConfig(modalities="video")
    assert config.modalities == ("video",)
    assert ProbeConfig(modalities=["image", "video"]).modalities == ("image", "video")
    assert ProbeConfig(modalities=iter(["image"])).modalities == ("image",)
    assert ProbeConfig().modalities is None and ProbeConfig().renumber_positions is False
    assert ProbeConfig(renumber_positions=True).renumber_positions is True
    for bad, message in [
        ((), "`modalities` must name at least one of ('image', 'video') (or be None), got ()"),
        ([], "`modalities` must name at least one of ('image', 'video') (or be None), got ()"),
        (("image", "audio"), "`modalities` must be one of ('image', 'video'), got 'audio'"),
        ("", "`modalities` must be one of ('image', 'video'), got ''"),
    ]:
        with pytest.raises(ValueError) as err:
            ProbeConfig(modalities=bad)
        assert str(err.value) == message
    for bad in (0, 1, None, "yes"):
        with pytest.raises(ValueError) as err:
            ProbeConfig(renumber_positions=bad)
        assert str(err.value) == f"`renumber_positions` must be a bool, got {bad!r}"
    with pytest.raises(ValueError, match=r"^`keep` as a token count must be >= 1, got 0$"):
        ProbeConfig(keep=0)  # validate runs on construction


def test_at_budget_sets_keep_as_a_fraction(probe):
    config = ProbeConfig.at_budget(1)
    assert config.keep == 1.0 and type(config.keep) is float  # the whole share, not one token
    assert ProbeConfig.at_budget(0.3, num_layers=4, layers=(1,)).layers == (1,)
    assert ProbeConfig.at_budget(0.3).keep == 0.3
    for budget, message in [
        (0.0, "`budget` must be in (0.0, 1.0], got 0.0"),
        (0, "`budget` must be in (0.0, 1.0], got 0"),
        (1.01, "`budget` must be in (0.0, 1.0], got 1.01"),
        ("0.5", "`budget` must be a number, got '0.5'"),
    ]:
        with pytest.raises(ValueError) as err:
            ProbeConfig.at_budget(budget)
        assert str(err.value) == message

    @dataclasses.dataclass
    class NoKeep(MethodConfig):
        ratio: float = 0.5

    with pytest.raises(NotImplementedError) as err:
        NoKeep.at_budget(0.5)
    assert str(err.value) == "NoKeep has no `keep` option; it must override at_budget"


def test_to_dict_json_and_save(probe, tmp_path):
    config = ProbeConfig(keep=3, layers=(1, 5), modalities=("image",), names=["a"])
    expected = {"method": "probe_method", "keep": 3, "layers": [1, 5], "rates": [0.5], "names": ["a"],
                "renumber_positions": False, "modalities": ["image"]}
    assert config.to_dict() == expected
    assert next(iter(config.to_dict())) == "method"
    text = config.to_json()
    assert text == json.dumps(expected, indent=2, sort_keys=True)
    path = config.save_pretrained(tmp_path / "a" / "b")  # nested folders are created
    assert path == tmp_path / "a" / "b" / CONFIG_NAME
    assert path.read_text() == text + "\n"
    config.save_pretrained(tmp_path / "a" / "b")  # an existing folder is fine
    loaded = MethodConfig.from_pretrained(tmp_path / "a" / "b")
    assert type(loaded) is ProbeConfig and loaded == config
    assert (loaded.layers, loaded.rates, loaded.modalities) == ((1, 5), (0.5,), ("image",))
    assert loaded.names == ["a"]  # a list field stays a list
    assert ProbeConfig.from_pretrained(path) == config  # the file itself
    with pytest.raises(FileNotFoundError) as err:
        MethodConfig.from_pretrained(tmp_path / "nowhere")
    assert str(err.value) == f"no tokenreduce config at {tmp_path / 'nowhere'}"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        MethodConfig.from_pretrained(tmp_path / "empty")
    assert str(err.value) == f"no tokenreduce config at {tmp_path / 'empty' / CONFIG_NAME}"


def test_from_dict(probe):
    data = {"method": "probe_method", "keep": 2, "layers": [3], "rates": [0.25, 0.5], "modalities": ["video"]}
    before = copy.deepcopy(data)
    config = MethodConfig.from_dict(data)
    assert data == before  # the caller's dict is left alone
    assert config == ProbeConfig(keep=2, layers=(3,), rates=(0.25, 0.5), modalities=("video",))
    assert ProbeConfig.from_dict({"keep": 4}) == ProbeConfig(keep=4)  # a concrete class names its method
    assert ProbeConfig.from_dict({"method": "", "keep": 4}) == ProbeConfig(keep=4)
    for data, error, message in [
        ({"keep": 4}, ValueError, "config dict has no `method` entry"),
        ({"method": "", "keep": 4}, ValueError, "config dict has no `method` entry"),
        ({"method": "nope"}, ValueError, None),
    ]:
        with pytest.raises(error) as err:
            MethodConfig.from_dict(data)
        if message:
            assert str(err.value) == message
    with pytest.raises(ValueError) as err:
        ProbeConfig.from_dict({"method": "pool"})
    assert str(err.value) == "config is for method 'pool', not 'probe_method'"
    registry.register_method("probe_derived", config_cls=DerivedConfig)(ProbeMethod)
    with pytest.raises(TypeError) as err:
        MethodConfig.from_dict({"method": "probe_derived", "derived": 1})  # not an init field
    assert str(err.value).startswith("method 'probe_derived' got unexpected option(s) 'derived'; accepted options: "
                                     "keep, modalities, renumber_positions, or")
    assert build_config("probe_derived").derived == 7


def test_build_config_and_unknown_options(probe):
    assert build_config("probe_method", layers=[1, 2]).layers == (1, 2)
    assert build_config("probe_method", rates=[0.0]).rates == (0.0,)  # default_factory tuple
    assert build_config("probe_method", names=["x"]).names == ["x"]
    assert build_config("probe_method", modalities=["image"]).modalities == ("image",)
    with pytest.raises(TypeError) as err:
        build_config("probe_method", zeta=1, alpha=2)
    assert str(err.value) == (
        "method 'probe_method' got unexpected option(s) 'alpha', 'zeta'; accepted options: keep, layers, "
        f"modalities, names, rates, renumber_positions, or `budget` ({BUDGET_MEANING})"
    )


def test_falsy_options_are_taken_as_given(probe):
    """0, 0.0, False and empty values override the defaults, through keywords and through a config file."""
    config = build_config("probe_method", layers=(), rates=[], names=[], renumber_positions=False)
    assert (config.layers, config.rates, config.names) == ((), (), [])
    loaded = MethodConfig.from_dict(json.loads(config.to_json()))
    assert (loaded.layers, loaded.rates, loaded.names, loaded.renumber_positions) == ((), (), [], False)
    assert config_at_budget("probe_method", 0.5, layers=()).layers == ()


def test_config_at_budget(probe):
    config = config_at_budget("probe_method", 0.25, 4, layers=[3])
    assert config == ProbeConfig(keep=0.25, layers=(3,))
    with pytest.raises(TypeError) as err:
        config_at_budget("probe_method", 0.25, keep=3)
    assert str(err.value) == "`budget` sets `keep` of method 'probe_method'; give `budget` or `keep`, not both"
    with pytest.raises(TypeError, match=r"^method 'probe_method' got unexpected option\(s\) 'k'"):
        config_at_budget("probe_method", 0.25, k=3)

    class Odd(ProbeConfig):
        @classmethod
        def at_budget(cls, budget, num_layers=None, **options):
            assert num_layers == 6  # passed through
            raise TypeError("some other mistake")

    registry._METHODS["probe_method"] = dataclasses.replace(registry._METHODS["probe_method"], config_cls=Odd)
    with pytest.raises(TypeError) as err:
        config_at_budget("probe_method", 0.5, 6)
    assert str(err.value) == "some other mistake"


# ----- registry -----------------------------------------------------------------------------------------------


def test_register_method_records_the_spec(probe):
    assert probe == registry.MethodSpec(
        name="probe_method", config_cls=ProbeConfig, method_cls=ProbeMethod, stages=("projector",),
        description="Probe method: first line of its docstring.", families=None, modalities=("image", "video"),
    )
    assert ProbeConfig.method == "probe_method" and ProbeMethod.name == "probe_method"
    # the same class again is fine (a module imported twice); options given are recorded
    registry.register_method("probe_method", config_cls=ProbeConfig, stages="projector", description="said",
                             families=("llava",), modalities=("video",))(ProbeMethod)
    spec = registry.get_method("probe_method")
    assert (spec.description, spec.families, spec.modalities, spec.stages) == ("said", ("llava",), ("video",), ("projector",))
    registry.register_method("probe_two", config_cls=ProbeConfig, stages=["decode"])(DecodeProbe)
    assert registry.get_method("probe_two").stages == ("decode",)
    # no docstring and no description given: an empty description, not an IndexError
    assert registry.get_method("probe_two").description == ""


@pytest.mark.parametrize("name", ["", "Pool", "1a", "a-b", "a b", "_a", "a\n", "a.b", None, 3])
def test_register_method_refuses_bad_names(probe, name):
    with pytest.raises(ValueError) as err:
        registry.register_method(name, config_cls=ProbeConfig)
    assert str(err.value) == f"method name must match '^[a-z][a-z0-9_]*$', got {name!r}"


@pytest.mark.parametrize("name", ["a", "z9", "a_b_0"])
def test_register_method_accepts_good_names(probe, name):
    registry.register_method(name, config_cls=ProbeConfig)(ProbeMethod)
    assert name in registry.list_methods()


def test_register_method_refuses_bad_stages_and_classes(probe):
    for stages in ((), "encoder", ("projector", "encoder")):
        with pytest.raises(ValueError) as err:
            registry.register_method("probe_x", config_cls=ProbeConfig, stages=stages)
        shown = (stages,) if isinstance(stages, str) else stages
        assert str(err.value) == f"`stages` must be a non-empty subset of {registry.STAGES}, got {shown!r}"
    with pytest.raises(ValueError) as err:
        registry.register_method("probe_method", config_cls=ProbeConfig)(DecodeProbe)
    assert str(err.value) == "method 'probe_method' is already registered by ProbeMethod"
    for cls in (type("NoStage", (), {}), type("EmptyStage", (), {"stages": ()}),
                type("BadStage", (), {"stages": ("projector", "encoder")})):
        with pytest.raises(TypeError) as err:
            registry.register_method("probe_y", config_cls=ProbeConfig)(cls)
        assert str(err.value) == (
            f"method 'probe_y': class {cls.__qualname__} must derive from a stage class of tokenreduce.core.reduction "
            "(VisionMethod, ProjectorMethod, LLMMethod or DecodeMethod)")
        assert "probe_y" not in registry._METHODS
    with pytest.raises(ValueError) as err:
        registry.register_method("probe_z", config_cls=ProbeConfig, stages=("llm",))(ProbeMethod)
    assert str(err.value) == (
        "method 'probe_z': `stages`=('llm',) differs from the stages of its class "
        f"{ProbeMethod.__qualname__}, ('projector',); leave `stages` out (the class says it)")
    assert "probe_z" not in registry._METHODS


def test_lookups(probe):
    with pytest.raises(ValueError) as err:
        registry.get_method("nope")
    assert str(err.value) == f"unknown method 'nope'; known methods: {', '.join(sorted(registry._METHODS))}"
    registry._PLUGIN_ERRORS["b (dist)"] = "ImportError: x"
    registry._PLUGIN_ERRORS["a (dist)"] = "ImportError: y"
    with pytest.raises(ValueError) as err:
        registry.get_method("nope")
    assert str(err.value).endswith("; plugins that failed to load: a (dist), b (dist)")
    names = registry.list_methods()
    assert names == sorted(registry._METHODS) and "probe_method" in names
    assert registry.list_methods("probe_*") == ["probe_method"]
    assert registry.list_methods("probe_*", stage="projector") == ["probe_method"]
    assert registry.list_methods("probe_*", stage="decode") == []
    assert set(registry.list_methods(stage="llm")) == {n for n, s in registry._METHODS.items() if "llm" in s.stages}
    with pytest.raises(ValueError) as err:
        registry.list_methods(stage="encoder")
    assert str(err.value) == f"`stage` must be one of {registry.STAGES}, got 'encoder'"
    specs = registry.method_specs()
    assert [s.name for s in specs] == names and all(s is registry._METHODS[s.name] for s in specs)


# ----- FLOPs ----------------------------------------------------------------------------------------------------


def _layer_flops_by_token(g: Geometry, n: int) -> float:
    """Multiply-adds of one causal layer, token by token (x2 for FLOPs)."""
    madds = 0
    for t in range(n):
        madds += g.hidden * g.heads * g.head_dim  # q
        madds += 2 * g.hidden * g.kv_heads * g.head_dim  # k, v
        madds += g.heads * g.head_dim * g.hidden  # o
        madds += g.heads * (t + 1) * g.head_dim * 2  # scores over t + 1 keys, then the weighted sum
        madds += 3 * g.hidden * g.intermediate  # gate, up, down
    return 2.0 * madds


def test_layer_and_prefill_flops():
    g = Geometry(hidden=12, heads=3, kv_heads=1, head_dim=5, intermediate=20, layers=3)
    for n in (0, 1, 2, 7):
        assert g.layer_flops(n) == _layer_flops_by_token(g, n)
    assert g.prefill_flops([7, 2, 1]) == sum(_layer_flops_by_token(g, n) for n in (7, 2, 1))
    assert g.prefill_flops([]) == 0


def test_geometry_from_config():
    full = SimpleNamespace(num_attention_heads=4, hidden_size=32, head_dim=6, num_key_value_heads=2,
                           intermediate_size=50, num_hidden_layers=3)
    assert Geometry.from_config(full) == Geometry(32, 4, 2, 6, 50, 3)
    bare = SimpleNamespace(num_attention_heads=4, hidden_size=32, intermediate_size=50, num_hidden_layers=3)
    assert Geometry.from_config(bare) == Geometry(32, 4, 4, 8, 50, 3)
    assert type(Geometry.from_config(bare).head_dim) is int
    nones = SimpleNamespace(num_attention_heads=4, hidden_size=32, head_dim=None, num_key_value_heads=None,
                            intermediate_size=50, num_hidden_layers=3)
    assert Geometry.from_config(nones) == Geometry(32, 4, 4, 8, 50, 3)


# ----- statistics -----------------------------------------------------------------------------------------------


def test_elapsed_and_its_shares():
    e = Elapsed(6.0)
    assert float(e) == 6.0 and float(Elapsed()) == 0.0
    assert float(e.share(3)) == 2.0
    assert float(e.share(0)) == 6.0 and float(e.share(1)) == 6.0  # no share below one part
    assert float(e.share(2).share(3)) == 1.0
    e._ms = 12.0  # a share reads its parent when read, not when made
    assert float(e.share(4)) == 3.0
    assert repr(Elapsed(1.23456)) == "Elapsed(1.235 ms)"
    for clone in (copy.deepcopy(e.share(2)), pickle.loads(pickle.dumps(e.share(2)))):
        assert type(clone) is Elapsed and float(clone) == 6.0

    class Event:
        def __init__(self):
            self.synchronized = 0

        def synchronize(self):
            self.synchronized += 1

        def elapsed_time(self, other):
            assert other is end  # the time from this event to the end event
            return 8.0

    start, end = Event(), Event()
    timed = Elapsed(events=(start, end))
    assert float(timed.share(4)) == 2.0 and end.synchronized == 1
    assert float(timed) == 8.0 and end.synchronized == 1  # read once, then kept


def test_lazy_counts():
    mask = torch.tensor([0, 1, 1, 0, 1])
    assert int(LazyCount(mask)) == 3
    assert int(LazyCount(mask, offset=4)) == 7
    assert int(LazyCount(torch.tensor([True, False, True]))) == 2
    row = SampleStats(call=1, row=0, text_count=LazyCount(mask, 1))
    assert row.text_tokens == 4 and row.text_count == 4 and type(row.text_count) is int
    row.text_tokens = torch.tensor(5)
    assert row.text_tokens == 5 and type(row.text_count) is int
    row.text_tokens = 6
    assert row.text_tokens == 6


def _row(layers=None, geometry=None, text=3) -> SampleStats:
    row = SampleStats(call=2, row=1, text_count=text, geometry=geometry)
    row.items = [ItemStats("image", 10, 4, Elapsed(1.5), {"grid": [2, 2]}), ItemStats("video", 6, 3, 0.25)]
    row.layers = dict(layers or {})
    row.llm_elapsed = [Elapsed(2.0), 0.5]
    return row


def test_sample_token_counts_and_time():
    row = _row()
    assert (row.visual_tokens_in, row.visual_tokens_llm_input, row.visual_tokens_out) == (16, 7, 7)
    assert row.items[0].reducer_ms == 1.5 and row.items[1].reducer_ms == 0.25
    assert row.llm_reducer_ms == 2.5 and row.reducer_ms == 1.5 + 0.25 + 2.5
    pruned = _row(layers={3: 2, 1: 5})
    assert pruned.visual_tokens_out == 2  # the deepest layer's count, whatever the insertion order
    assert pruned.visual_tokens_llm_input == 7
    assert _row().tokens_per_layer() == [] and _row().prefill_flops == 0.0 and _row().prefill_flops_full == 0.0
    assert _row().visual_tokens_layer_mean == 7.0
    assert _row(layers={3: 2, 1: 5}).visual_tokens_layer_mean == 2.0  # no geometry: the deepest count


def test_sample_tokens_per_layer_and_flops():
    g = Geometry(hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, layers=5)
    row = _row(layers={1: 5, 3: 2}, geometry=g)
    # layer 0 reads the LLM input (7 visual), layers 1-2 keep 5, layers 3-4 keep 2; 3 text tokens each
    assert row.tokens_per_layer() == [10, 8, 8, 5, 5]
    assert row.visual_tokens_layer_mean == pytest.approx((7 + 5 + 5 + 2 + 2) / 5)
    assert row.prefill_flops == sum(_layer_flops_by_token(g, n) for n in (10, 8, 8, 5, 5))
    assert row.prefill_flops_full == 5 * _layer_flops_by_token(g, 3 + 16)
    plain = _row(geometry=g)
    assert plain.tokens_per_layer() == [10] * 5 and plain.visual_tokens_layer_mean == pytest.approx(7.0)
    at_zero = _row(layers={0: 1}, geometry=g)
    assert at_zero.tokens_per_layer() == [4] * 5


def test_sample_to_dict():
    g = Geometry(hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, layers=2)
    row = _row(layers={1: 5}, geometry=g)
    row.extra = {"trace": [1, 2], "timed": Elapsed(4.0)}
    out = row.to_dict()
    assert out == {
        "call": 2, "row": 1, "visual_tokens_in": 16, "visual_tokens_llm_input": 7, "visual_tokens_out": 5,
        "visual_tokens_layer_mean": 6.0, "reducer_ms": 4.25, "text_tokens": 3,
        "prefill_flops": _layer_flops_by_token(g, 10) + _layer_flops_by_token(g, 8),
        "prefill_flops_full": 2 * _layer_flops_by_token(g, 19),
        "layers": {"1": 5},
        "items": [
            {"modality": "image", "tokens_in": 10, "tokens_out": 4, "reducer_ms": 1.5, "info": {"grid": [2, 2]}},
            {"modality": "video", "tokens_in": 6, "tokens_out": 3, "reducer_ms": 0.25},
        ],
        "extra": {"trace": [1, 2], "timed": 4.0},
    }
    assert type(out["extra"]["timed"]) is float
    json.dumps(out)  # plain data
    assert "extra" not in _row().to_dict()


def test_stats_calls_rows_and_reset():
    stats = Stats()
    assert stats.summary() == {"samples": 0} and repr(stats) == "Stats(no samples)" and stats.last == []
    first = stats.new_call(2)
    assert [(s.call, s.row) for s in first] == [(1, 0), (1, 1)] and stats.calls == 1
    second = stats.new_call(3)
    assert [(s.call, s.row) for s in second] == [(2, 0), (2, 1), (2, 2)]
    assert stats.samples == first + second
    assert stats.last == second and stats.last is not stats._last  # a copy
    stats.samples.append(SampleStats(call=2, row=3))  # rows added behind its back: found by a scan
    assert [s.row for s in stats.last] == [0, 1, 2, 3]
    stats.reset()
    assert (stats.samples, stats.calls, stats.last) == ([], 0, [])
    assert [(s.call, s.row) for s in stats.new_call(1)] == [(1, 0)]
    restored = pickle.loads(pickle.dumps(stats))
    assert [(s.call, s.row) for s in restored.last] == [(1, 0)]
    old = Stats.__new__(Stats)  # a record pickled before `_last` existed
    old.samples, old.calls, old.budget = [SampleStats(call=1, row=0), SampleStats(call=2, row=0)], 2, None
    assert [(s.call, s.row) for s in old.last] == [(2, 0)]


def test_stats_summary_and_repr():
    g = Geometry(hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, layers=2)
    stats = Stats()
    a, b = stats.new_call(2)
    a.items = [ItemStats("image", 10, 4, 1.0)]
    a.text_count, a.geometry = 2, g
    b.items = [ItemStats("image", 30, 30, 3.0)]
    b.layers = {1: 10}
    b.text_count, b.geometry = 4, g
    summary = stats.summary()
    flops = _layer_flops_by_token(g, 6) * 2 + _layer_flops_by_token(g, 34) + _layer_flops_by_token(g, 14)
    full = _layer_flops_by_token(g, 12) * 2 + _layer_flops_by_token(g, 34) * 2
    assert summary == pytest.approx({
        "samples": 2, "visual_tokens_in": 20.0, "visual_tokens_out": 7.0, "keep_ratio": 14 / 40,
        "layer_mean_keep_ratio": (4 + 20) / 40, "reducer_ms": 2.0, "prefill_flops_ratio": flops / full,
    })
    assert set(summary) == {"samples", "visual_tokens_in", "visual_tokens_out", "keep_ratio",
                            "layer_mean_keep_ratio", "reducer_ms", "prefill_flops_ratio"}
    lines = [
        "Stats(samples=2, calls=1, 2 image(s))",
        "  visual tokens in      20.0 -> 7.0 (35.0%) at the deepest layer",
        "  at the LLM input      17.0 (85.0%)",  # (4 + 30) / 2 of (10 + 30) / 2
        "  per LLM layer         layers 0: 17, 1: 7",  # layer 1: (4 + 10) / 2
        "  layer mean            12.0 (60.0%)",
        f"  prefill FLOPs ratio   {flops / full:.3f}",
        "  reducer time          2.00 ms/sample",
    ]
    assert repr(stats) == "\n".join(lines)
    stats.budget = 0.5
    summary = stats.summary()
    assert summary["budget"] == 0.5 and summary["budget_missed"] is True  # 0.6 is 20 % over
    budget = "  budget                {} asked, 60.0% achieved (layer mean): {}"
    assert repr(stats) == "\n".join([*lines[:5], budget.format("50.0%", "MISSED by more than 10%"), *lines[5:]])
    stats.budget = 0.625
    assert stats.summary()["budget_missed"] is False  # 0.6 is 4 % under
    assert repr(stats) == "\n".join([*lines[:5], budget.format("62.5%", "within 10%"), *lines[5:]])
    assert stats.to_dict() == {"summary": stats.summary(), "samples": [a.to_dict(), b.to_dict()],
                               "stages": {"prefill_flops_ratio": flops / full}}


def test_stats_summary_without_visual_tokens_or_geometry():
    stats = Stats()
    (row,) = stats.new_call(1)
    row.text_count = 5
    summary = stats.summary()
    assert summary["keep_ratio"] == 1.0 and summary["layer_mean_keep_ratio"] == 1.0
    assert summary["prefill_flops_ratio"] == 1.0 and summary["visual_tokens_in"] == 0.0


def test_budget_missed_is_relative_to_the_budget():
    assert budget_missed(0.5, 0.5) is False
    assert budget_missed(0.5, 0.5625) is True and budget_missed(0.5, 0.4375) is True  # 12.5 % off
    assert budget_missed(0.5, 0.53125) is False and budget_missed(0.5, 0.46875) is False  # 6.25 % off
    assert budget_missed(0.25, 0.3) is True  # 0.05 is within 10 % of 0.5, not of 0.25
    assert budget_missed(1.0, 0.75, tolerance=0.25) is False  # exactly at the tolerance
    assert budget_missed(1.0, 0.7421875, tolerance=0.25) is True
    assert Stats.BUDGET_TOLERANCE == 0.10


def test_timer_on_the_host():
    for device in (None, torch.device("cpu")):
        with timer(device) as elapsed:
            time.sleep(0.02)
        assert 15.0 <= float(elapsed) < 5000.0
    with pytest.raises(RuntimeError), timer() as failed:
        time.sleep(0.01)
        raise RuntimeError("in the block")
    assert float(failed) >= 5.0  # recorded when the block raises too


# ----- plugins: entry points of a fake installed distribution ----------------------------------------------------

PLUGIN = '''
import dataclasses

from tokenreduce.core.config import MethodConfig
from tokenreduce.core.registry import register_method


@dataclasses.dataclass
class UnitConfig(MethodConfig):
    pass


@register_method("{name}", config_cls=UnitConfig, stages="projector", description="unit plugin")
class UnitMethod:
    stages = ("projector",)

    def __init__(self, config):
        raise AssertionError("a class named by an entry point is not instantiated")
'''


@pytest.fixture
def plugins(monkeypatch, tmp_path):
    """A fake distribution on ``sys.path`` and a registry that has loaded no plugin yet (restored after)."""
    import sys

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(registry, "_PLUGIN_ERRORS", {})
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.syspath_prepend(str(tmp_path))

    def install(entry_points: dict[str, str], modules: dict[str, str]) -> None:
        info = tmp_path / "fake_tr_unit-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-tr-unit\nVersion: 0.1\n")
        lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[tokenreduce.methods]\n{lines}\n")
        for module, source in modules.items():
            (tmp_path / f"{module}.py").write_text(source)

    yield install
    for name in [m for m in sys.modules if m.startswith("fake_tr_unit")]:
        del sys.modules[name]


def test_plugin_modules_and_classes_load_without_being_called(plugins):
    import warnings

    plugins({"by_module": "fake_tr_unit_a", "by_class": "fake_tr_unit_b:UnitMethod"},
            {"fake_tr_unit_a": PLUGIN.format(name="unit_a"), "fake_tr_unit_b": PLUGIN.format(name="unit_b")})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a module or class called as a function would warn
        names = registry.list_methods("unit_*")
    assert names == ["unit_a", "unit_b"] and registry._PLUGIN_ERRORS == {}
    assert registry.get_method("unit_b").description == "unit plugin"


def test_a_failing_plugin_is_recorded_and_warned_in_one_line(plugins):
    plugins({"broken": "fake_tr_unit_c:register"},
            {"fake_tr_unit_c": "def register():\n    raise KeyError('no such thing')\n"})
    with pytest.warns(RuntimeWarning) as caught:
        registry.load_plugins()
    assert registry._PLUGIN_ERRORS == {"broken (fake-tr-unit)": "KeyError: 'no such thing'"}
    assert [str(w.message) for w in caught] == [
        "tokenreduce method plugin broken (fake-tr-unit) = 'fake_tr_unit_c:register' failed to load: "
        "KeyError: 'no such thing'"]
    registry.load_plugins()  # once per process: no second warning
    assert registry._plugins_loaded is True
