"""What ``tokenreduce demo`` evaluates: ONE place that names the demo's tasks, models, methods and budgets.

One run per synthetic benchmark family (:mod:`tokenreduce.eval.synthetic`), each on its shipped tiny
model (``assets/models/<name>``, or the folder named by ``$TOKENREDUCE_SYNTHETIC_MODELS``):

* ``image`` on ``synthetic-llava-image`` (LLaVA-1.5 architecture);
* ``document`` on ``synthetic-onevision-document`` and ``video`` on ``synthetic-onevision-video``
  (LLaVA-OneVision architecture).

Each run takes every registered method that can reduce the model's visual tokens for the family's
modality (see :func:`select_methods`), at budgets 10 %, 25 % and 50 %, plus the unreduced model. After
the table, two properties of the benchmark are checked (printed, not asserted) on a second, larger run of
the unreduced model and ``random`` at 10 % (``CHECK_SAMPLES``): the full-token accuracy is high, and
keeping a random 10 % of the visual tokens costs many points, so a good selection has room to show.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenreduce as tr
from tokenreduce.adapters import family_name, get_adapter
from tokenreduce.core.registry import method_specs
from tokenreduce.eval.runner import BASELINE, Cell, ModelSpec, Runner, method_config
from tokenreduce.eval.synthetic import KINDS, MODEL_NAMES, load_model, model_dir
from tokenreduce.eval.tasks.synthetic import SyntheticTask

DEMO_BUDGETS = (0.1, 0.25, 0.5)
# Samples per family: a multiple of every family's category count (5 or 4), so categories stay balanced;
# the three grids and their check runs take about 3 minutes on 2 idle CPU cores.
DEMO_SAMPLES = 40
# The benchmark's two properties, printed after each table, measured on this many test samples per family
# (the counts the shipped-model test asserts on): the grid's few dozen cannot tell 90 % apart (the first 40
# document samples score 80 %, the first 300 score 90.7 %).
CHECK_SAMPLES = {"image": 500, "document": 300, "video": 300}
FULL_ACCURACY_GOAL = 0.90
RANDOM_BUDGET = 0.1
RANDOM_DROP_GOAL = 15.0  # accuracy points lost by `random` at RANDOM_BUDGET
# The modality of each family's samples (documents are images).
MODALITIES = {"image": "image", "document": "image", "video": "video"}
# What a config must fail with for its method to be left out (a missing required option, e.g. the path
# of trained weights that are not shipped, or a model / budget the method cannot take).
CONFIG_ERRORS = (ValueError, TypeError, NotImplementedError, OSError)


class MissingModelsError(FileNotFoundError):
    """The shipped synthetic models are not where the demo looks for them."""


@dataclass
class DemoRun:
    """One run of the demo: a task, its model, the grid, the methods left out (with the reason) and the size
    of the run that checks the benchmark's two properties."""

    name: str
    task: SyntheticTask
    models: list[ModelSpec]
    methods: tuple[str, ...]
    budgets: tuple[float, ...] = DEMO_BUDGETS
    limit: int = DEMO_SAMPLES
    task_options: dict[str, Any] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # for methods it may run
    check_limit: int = 0  # samples of the check run (`none` and `random` at RANDOM_BUDGET); 0: none

    def check_runner(self, out_dir: str | Path, **options: Any) -> Runner:
        """The run that checks the benchmark's two properties, in ``<out_dir>/<name>/check``."""
        return Runner(self.task, self.models, (BASELINE, "random"), (RANDOM_BUDGET,), name="check",
                      out_dir=Path(out_dir) / self.name, limit=self.check_limit, keep_maps=0,
                      task_options=self.task_options, **options)


def trained_options(model_path: str | Path) -> dict[str, dict[str, Any]]:
    """Options pointing methods that need trained weights at the ones shipped for the model in
    ``model_path``: a LangDC captioner in ``<models folder>/../langdc/<model name>``."""
    model_path = Path(model_path)
    captioner = model_path.parent.parent / "langdc" / model_path.name
    return {"langdc": {"captioner": str(captioner)}} if (captioner / "langdc_captioner.json").is_file() else {}


def check_models(root: str | Path | None = None) -> tuple[dict[str, Path], list[str]]:
    """The model directory of each family that has one, and a line per missing family naming the command
    that trains it; raises :class:`MissingModelsError` when no family has a model."""
    dirs = {kind: model_dir(kind, root) for kind in KINDS}
    missing = [kind for kind, path in dirs.items() if not (path / "config.json").is_file()]
    lines = [f"  {dirs[k]}  (train it with `python -m research.synthetic.train {k}`)" for k in missing]
    if len(missing) == len(KINDS):
        raise MissingModelsError(
            "the demo needs the synthetic benchmark's tiny models; missing:\n" + "\n".join(lines)
            + "\nor point $TOKENREDUCE_SYNTHETIC_MODELS (or `tokenreduce demo --models DIR`) at a folder holding "
            f"{', '.join(MODEL_NAMES[k] for k in KINDS)}"
        )
    return {k: v for k, v in dirs.items() if k not in missing}, lines


def select_methods(model: Any, modality: str, budgets: Sequence[float] = DEMO_BUDGETS,
                   options: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[tuple[str, ...], dict[str, str]]:
    """``("none", *methods)`` that reduce ``model``'s visual tokens of ``modality``, and why the others are out.

    A method is in when its ``families`` (None: every family) include the model's adapter, its
    ``modalities`` include ``modality``, it acts before decoding (a decode-stage-only method such as
    ``ares`` keeps every visual token), and its config builds through ``at_budget`` and wraps the model
    for at least one of ``budgets``, with its ``options`` if any (a method needing a path to trained
    weights that are not shipped fails there). The model is left unwrapped.
    """
    family = get_adapter(model).name
    num_layers = model.config.get_text_config().num_hidden_layers
    chosen: list[str] = []
    excluded: dict[str, str] = {}
    for spec in method_specs():
        if set(spec.stages) <= {"decode"}:
            excluded[spec.name] = "decode-stage only: keeps every visual token"
            continue
        if spec.families is not None and family not in {family_name(f) for f in spec.families}:
            excluded[spec.name] = f"supports families {', '.join(spec.families)}, not {family}"
            continue
        if modality not in spec.modalities:
            excluded[spec.name] = f"acts on {', '.join(spec.modalities)}, not {modality}"
            continue
        errors = []
        for budget in budgets:
            try:
                config = method_config(Cell(spec.name, float(budget)), num_layers, (options or {}).get(spec.name))
                tr.unwrap(tr.wrap(model, config))
            except CONFIG_ERRORS as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            else:
                break
        if len(errors) == len(budgets):
            excluded[spec.name] = errors[0]
        else:
            chosen.append(spec.name)
    return (BASELINE, *chosen), excluded


def demo_runs(n: int = DEMO_SAMPLES, models: str | Path | None = None,
              budgets: Sequence[float] = DEMO_BUDGETS, check: int | None = None) -> list[DemoRun]:
    """The demo's runs, one per synthetic family, with ``n`` test samples each.

    ``models`` is the folder holding the three model directories (default: ``$TOKENREDUCE_SYNTHETIC_MODELS``,
    else ``assets/models``); families without a model are left out (:func:`check_models`). The methods of a run come
    from :func:`select_methods` on its loaded model (loaded once, shared with the runner). ``check``: samples
    of each family's check run (default ``CHECK_SAMPLES``; 0: none, the checks read the grid).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be an int >= 1, got {n!r}")
    if check is not None and (isinstance(check, bool) or not isinstance(check, int) or check < 0):
        raise ValueError(f"`check` must be an int >= 0 or None, got {check!r}")
    dirs, _missing = check_models(models)
    runs = []
    for kind in dirs:
        model, processor = load_model(kind, dirs[kind])
        options = trained_options(dirs[kind])
        methods, excluded = select_methods(model, MODALITIES[kind], budgets, options)
        task = SyntheticTask(kind, split="test", seed=0)
        spec = ModelSpec(MODEL_NAMES[kind], factory=lambda loaded=(model, processor): loaded)
        runs.append(DemoRun(f"demo-{kind}", task, [spec], methods, tuple(budgets), n,
                            {"split": task.split, "seed": task.seed}, excluded, options,
                            CHECK_SAMPLES[kind] if check is None else check))
    return runs


def clear_run(run_dir: str | Path, task_name: str) -> None:
    """Remove a previous demo run of ``task_name`` in ``run_dir`` (its records would be reused otherwise,
    even after the models changed). A folder that is not such a run is left alone."""
    import json

    run_dir = Path(run_dir)
    spec = run_dir / "run.json"
    if not spec.is_file():
        return
    try:
        task = json.loads(spec.read_text()).get("task")
    except (OSError, json.JSONDecodeError):
        return
    if task == task_name:
        shutil.rmtree(run_dir)


def benchmark_checks(summary: Mapping[str, Any]) -> list[str]:
    """PASS / FAIL lines for the benchmark's two properties, per model of a run's summary.

    Full-token accuracy >= 90 %, and ``random`` at 10 % of the visual tokens losing >= 15 points;
    then a MISS line for every cell whose layer-mean share of the visual tokens is off its budget by more than
    10 %.
    """
    by_model: dict[str, dict[tuple[str, float | None], float | None]] = {}
    samples: dict[str, int] = {}
    for c in summary.get("cells", []):
        by_model.setdefault(c["model"], {})[(c["method"], c["budget"])] = c.get("primary")
        if c["method"] == BASELINE:
            samples[c["model"]] = int(c.get("samples") or 0)
    lines, misses = [], []
    for c in summary.get("cells", []):
        if c.get("budget_missed"):
            misses.append(f"MISS  {c['model']}: {c['method']}@{c['budget']:g} averages "
                         f"{100 * c['layer_mean_share']:.1f}% of the visual tokens over the layers "
                         f"(budget {100 * c['budget']:g}%, off by more than 10%)")
    for model, cells in by_model.items():
        full = cells.get((BASELINE, None))
        if full is None:
            lines.append(f"n/a   {model}: full-token accuracy (the `none` cell did not run)")
        else:
            verdict = "PASS" if full >= FULL_ACCURACY_GOAL else "FAIL"
            n = samples.get(model, 0)
            # A few dozen samples leave several points of sampling error; say how many.
            error = f", +/- {100 * math.sqrt(full * (1 - full) / n):.1f} at {n} samples" if n else ""
            lines.append(f"{verdict}  {model}: full-token accuracy {100 * full:.1f}% "
                         f"(goal >= {100 * FULL_ACCURACY_GOAL:.0f}%{error})")
        reduced = cells.get(("random", RANDOM_BUDGET))
        if full is None or reduced is None:
            lines.append(f"n/a   {model}: points lost by random@{RANDOM_BUDGET:g} (the cell did not run)")
        else:
            drop = 100 * (full - reduced)
            verdict = "PASS" if drop >= RANDOM_DROP_GOAL else "FAIL"
            lines.append(f"{verdict}  {model}: random@{RANDOM_BUDGET:g} loses {drop:.1f} points "
                         f"({100 * full:.1f}% -> {100 * reduced:.1f}%; goal >= {RANDOM_DROP_GOAL:g})")
    return lines + misses
