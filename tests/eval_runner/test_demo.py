"""What ``tokenreduce demo`` runs: one synthetic family per run, the methods that apply to its model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tokenreduce.core.api import get_handle
from tokenreduce.core.config import MethodConfig
from tokenreduce.core.registry import _METHODS, MethodSpec, method_specs
from tokenreduce.eval.demo import (
    CHECK_SAMPLES,
    DEMO_BUDGETS,
    MissingModelsError,
    benchmark_checks,
    check_models,
    clear_run,
    demo_runs,
    select_methods,
)
from tokenreduce.eval.synthetic import MODEL_NAMES, load_model
from tokenreduce.plugins.baselines.random import RandomMethod


@pytest.fixture(scope="module")
def runs(synthetic_models):
    return {r.name: r for r in demo_runs(n=2, models=synthetic_models)}


def test_one_run_per_family_on_its_model(runs, synthetic_models, tmp_path):
    assert list(runs) == ["demo-image", "demo-document", "demo-video"]
    for kind, run in zip(("image", "document", "video"), runs.values()):
        assert run.task.name == f"synthetic-{kind}" and run.task.split == "test"
        assert [m.name for m in run.models] == [MODEL_NAMES[kind]]
        assert run.budgets == DEMO_BUDGETS == (0.1, 0.25, 0.5) and run.limit == 2
        model, _ = run.models[0].load()
        assert model.config.model_type == ("llava" if kind == "image" else "llava_onevision")
        # the two properties are checked on more samples than the grid's, the same model and task
        assert run.check_limit == CHECK_SAMPLES[kind] >= 100
        checker = run.check_runner(tmp_path)
        assert checker.run_dir == tmp_path / run.name / "check" and checker.limit == run.check_limit
        assert [(c.method, c.budget) for c in checker.cells] == [("none", None), ("random", 0.1)]
        assert checker.models == run.models and checker.task is run.task
    assert all(r.check_limit == 0 for r in demo_runs(n=1, models=synthetic_models, check=0))
    with pytest.raises(ValueError, match="`check` must be an int >= 0 or None"):
        demo_runs(n=1, models=synthetic_models, check=-1)


def test_methods_per_family(runs):
    image, document, video = (runs[f"demo-{k}"] for k in ("image", "document", "video"))
    for run in runs.values():
        assert run.methods[0] == "none" and "ares" not in run.methods
        assert run.excluded["ares"].startswith("decode-stage only")
        assert {"random", "pool", "fastv", "pdrop", "divprune", "visionzip", "prumerge"} <= set(run.methods)
    assert "tome" in image.methods  # LLaVA's CLIP tower; not on OneVision
    assert "tome" not in document.methods and "llava_onevision" in document.excluded["tome"]
    assert "doc_correlation" in image.methods and "doc_correlation" in document.methods
    assert "doc_correlation" not in video.methods and "not video" in video.excluded["doc_correlation"]
    assert "vqtoken" in video.methods and "vqtoken" not in image.methods and "not image" in image.excluded["vqtoken"]
    for run in runs.values():  # every registered method is either chosen or left out with a reason
        assert set(run.methods[1:]) | set(run.excluded) == {s.name for s in method_specs()}
        assert not set(run.methods) & set(run.excluded)


@dataclass
class _NeedsWeightsConfig(MethodConfig):
    keep: float = 0.5
    weights: str | None = None

    def validate(self) -> None:
        if self.weights is None:
            raise ValueError("`weights` is required: the directory of the trained scorer")


def test_a_method_needing_unshipped_weights_is_left_out(synthetic_models, monkeypatch):
    spec = MethodSpec("needs_weights", _NeedsWeightsConfig, RandomMethod, ("projector",), "test method")
    monkeypatch.setitem(_METHODS, "needs_weights", spec)
    model, _ = load_model("image", synthetic_models / MODEL_NAMES["image"])
    methods, excluded = select_methods(model, "image")
    assert "needs_weights" not in methods and "`weights` is required" in excluded["needs_weights"]
    assert "random" in methods and get_handle(model) is None  # left unwrapped


def test_missing_models_name_the_directory_and_the_training_command(tmp_path, monkeypatch):
    from tokenreduce.cli import main

    with pytest.raises(MissingModelsError) as info:
        check_models(tmp_path)
    message = str(info.value)
    for kind, name in MODEL_NAMES.items():
        assert str(tmp_path / name) in message
        assert f"python -m research.synthetic.train {kind}" in message
    monkeypatch.setenv("TOKENREDUCE_SYNTHETIC_MODELS", str(tmp_path))
    with pytest.raises(SystemExit, match="synthetic-onevision-video"):
        main(["demo", "--quiet"])


def test_benchmark_checks():
    cells = [{"model": "m", "method": "none", "budget": None, "primary": 0.95, "samples": 40},
             {"model": "m", "method": "random", "budget": 0.1, "primary": 0.60},
             {"model": "n", "method": "none", "budget": None, "primary": 0.5},
             {"model": "n", "method": "random", "budget": 0.1, "primary": 0.45}]
    lines = benchmark_checks({"cells": cells})
    assert lines[0] == "PASS  m: full-token accuracy 95.0% (goal >= 90%, +/- 3.4 at 40 samples)"
    assert lines[1].startswith("PASS  m: random@0.1 loses 35.0 points")
    assert lines[2].startswith("FAIL  n: full-token accuracy 50.0%") and lines[3].startswith("FAIL  n: random@0.1")
    assert benchmark_checks({"cells": cells[:1]})[1].startswith("n/a")


def test_clear_run_removes_only_a_run_of_the_task(tmp_path):
    run = tmp_path / "demo-image"
    run.mkdir()
    (run / "run.json").write_text('{"task": "synthetic-image"}')
    clear_run(run, "synthetic-video")
    assert run.exists()
    clear_run(run, "synthetic-image")
    assert not run.exists()
    (tmp_path / "other").mkdir()
    clear_run(tmp_path / "other", "synthetic-image")
    assert (tmp_path / "other").exists()


def test_families_without_a_model_are_left_out(tmp_path, synthetic_models):
    import shutil

    for kind in ("image", "document"):
        shutil.copytree(synthetic_models / MODEL_NAMES[kind], tmp_path / MODEL_NAMES[kind])
    present, missing = check_models(tmp_path)
    assert sorted(present) == ["document", "image"]
    assert len(missing) == 1 and "python -m research.synthetic.train video" in missing[0]
    assert [run.name for run in demo_runs(n=1, models=tmp_path)] == ["demo-image", "demo-document"]


def test_shipped_trained_weights_are_found_beside_the_models(tmp_path):
    from pathlib import Path

    from tokenreduce.eval.demo import trained_options

    assets = Path(__file__).resolve().parents[2] / "assets"
    video = assets / "models" / MODEL_NAMES["video"]
    assert trained_options(video) == {"langdc": {"captioner": str(assets / "langdc" / MODEL_NAMES["video"])}}
    assert trained_options(assets / "models" / MODEL_NAMES["image"]) == {}
    assert trained_options(tmp_path / "models" / MODEL_NAMES["video"]) == {}
