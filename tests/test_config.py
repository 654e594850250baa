"""Configs: validation messages, JSON round trip, registry behaviour."""

import dataclasses

import pytest

import tokenreduce as tr
from tokenreduce.core.config import MethodConfig, build_config, resolve_keep
from tokenreduce.core.registry import get_method, method_specs, register_method


@pytest.mark.parametrize("spec", method_specs(), ids=lambda s: s.name)
def test_every_config_round_trips_through_json(tmp_path, spec):
    config = spec.config_cls()
    path = config.save_pretrained(tmp_path)
    assert path.name == "tokenreduce_config.json"
    loaded = MethodConfig.from_pretrained(tmp_path)
    assert type(loaded) is spec.config_cls
    assert dataclasses.asdict(loaded) == dataclasses.asdict(config)
    assert spec.config_cls.from_pretrained(path) == config


@pytest.mark.parametrize("spec", method_specs(), ids=lambda s: s.name)
def test_every_method_has_a_description_and_budget_config(spec):
    assert spec.description
    if set(spec.stages) & {"vision", "projector", "llm"}:
        assert isinstance(spec.config_cls.at_budget(0.5), spec.config_cls)


def test_config_for_other_method_is_refused(tmp_path):
    tr.RandomConfig(keep=3).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="config is for method 'random', not 'pool'"):
        tr.PoolConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenreduce config"):
        MethodConfig.from_pretrained(tmp_path / "missing")


def test_common_options_validate():
    with pytest.raises(ValueError, match=r"`modalities` must be one of \('image', 'video'\), got 'audio'"):
        build_config("pool", modalities=("audio",))
    with pytest.raises(ValueError, match="`renumber_positions` must be a bool"):
        build_config("pool", renumber_positions="yes")
    assert build_config("pool", modalities="video").modalities == ("video",)
    # empty is not "unset": it is refused rather than silently reducing the method's default modalities
    with pytest.raises(ValueError, match=r"^`modalities` must name at least one of \('image', 'video'\) \(or be None\), got \(\)$"):
        build_config("pool", modalities=())
    assert build_config("pool", renumber_positions=False).renumber_positions is False
    with pytest.raises(ValueError, match=r"`budget` must be in \(0.0, 1.0\]"):
        tr.PoolConfig.at_budget(0.0)


def test_resolve_keep():
    assert resolve_keep(0.25, 576) == 144
    assert resolve_keep(1.0, 10) == 10
    assert resolve_keep(0.01, 10) == 1
    assert resolve_keep(64, 10) == 10
    assert resolve_keep(3, 10) == 3
    assert resolve_keep(0.5, 0) == 0


def test_registry_refuses_bad_names_and_duplicates():
    with pytest.raises(ValueError, match="method name must match"):
        register_method("Bad-Name", config_cls=MethodConfig, stages="projector")
    with pytest.raises(ValueError, match=r"`stages` must be a non-empty subset"):
        register_method("fine", config_cls=MethodConfig, stages="encoder")
    with pytest.raises(ValueError, match="already registered"):
        register_method("pool", config_cls=MethodConfig, stages="projector")(type("Other", (), {}))
    assert get_method("pool").stages == ("projector",)
    assert tr.list_methods("r*") == ["random"]
    assert "pool" in tr.list_methods(stage="projector")
    with pytest.raises(ValueError, match="`stage` must be one of"):
        tr.list_methods(stage="nope")


def test_falsy_values_of_method_options():
    """Options whose accepted range holds 0 / empty take it as given, not as "unset"."""
    from tokenreduce.plugins.atp import ATPConfig

    assert build_config("random", seed=0).seed == 0
    assert build_config("tome", r=0).r == 0
    assert build_config("visionzip", dominant=3, contextual=0.0).contextual == 0.0
    atp = ATPConfig(layers=(2,), keep=(0.5,), spatial_rates=(0.0,), self_weight=0.0, spatial_score_scale=0.0)
    assert (atp.spatial_rates, atp.self_weight, atp.spatial_score_scale) == ((0.0,), 0.0, 0.0)
    with pytest.raises(ValueError, match=r"^`layers` must hold at least one decoder layer \(or be None for the defaults\), got \(\)$"):
        ATPConfig(layers=(), keep=(), spatial_rates=())
