"""The ``tokenreduce`` command: ``demo``, ``eval``, ``bench``, ``show``.

    tokenreduce demo                                   # every method on the synthetic benchmark's tiny models
    tokenreduce eval --task docvqa --task-opt path=/data/docvqa --model llava-hf/llava-1.5-7b-hf \\
        --methods none pool fastv --budgets 0.25 0.5 --limit 200 --name docvqa-llava
    tokenreduce eval --config grid.yaml                # the same from a YAML / JSON file
    tokenreduce bench --quick                          # prefill / decode timing, full vs reduced
    tokenreduce show runs/docvqa-llava                 # table and kept-token overlays of a finished run

``eval`` runs under ``accelerate launch --multi_gpu --num_processes N -m tokenreduce.cli eval ...`` as well
(also on a CPU-only machine, where the processes use gloo): the samples are sharded over the processes and
rank 0 writes the summary.
"""

from __future__ import annotations

import argparse
import difflib
import json
import shlex
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class UsageError(SystemExit):
    """A bad command line: :func:`main` prints the message as one line on stderr and the process exits with
    code 2 (argparse's code for usage errors), before any model loads or cell runs."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 2


def did_you_mean(what: str, name: str, known: Sequence[str]) -> UsageError:
    """``unknown <what> 'name'; did you mean 'closest'? (known: ...)`` as a :class:`UsageError`."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ";"
    return UsageError(f"unknown {what} {name!r}{hint} known: {', '.join(known)}")


def _set_threads(threads: int | None, command: str | None = None) -> None:
    """Set torch's CPU threads to ``threads``; without it (``command`` given), to what
    :func:`~tokenreduce.eval.measure.choose_threads` finds free, and say so on stderr."""
    import torch

    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    elif command is not None:
        from tokenreduce.eval.measure import choose_threads

        chosen, why = choose_threads(torch.get_num_threads())
        torch.set_num_threads(chosen)
        print(f"tokenreduce {command}: {chosen} torch thread(s): {why}; --threads N to choose", file=sys.stderr)


def quiet_libraries() -> None:
    """Hide the progress bars of transformers ("Loading weights" once per model load), the hub and datasets:
    the command's own bar names the cell running. ``--verbose`` keeps them."""
    import os

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()


def _parse_value(text: str) -> Any:
    """Command-line values: JSON when it parses (numbers, lists, true/false/null), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_pairs(pairs: Sequence[str] | None, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise UsageError(f"{what} must be KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = _parse_value(value)
    return out


# ----------------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    """Run the demo grid(s), print each table and the benchmark checks, render a few overlays."""
    _set_threads(args.threads)
    from tokenreduce.eval.demo import (
        DEMO_BUDGETS,
        MissingModelsError,
        benchmark_checks,
        check_models,
        clear_run,
        demo_runs,
    )
    from tokenreduce.eval.runner import Runner

    try:
        _, missing = check_models(args.models)
        runs = demo_runs(n=args.samples, models=args.models, budgets=args.budgets or DEMO_BUDGETS,
                         check=args.check_samples)
    except (MissingModelsError, ValueError) as exc:
        raise UsageError(f"tokenreduce demo: {exc}") from None
    if missing:
        print("tokenreduce demo: no model for these families, left out:\n" + "\n".join(missing))
    for run in runs:
        methods = args.methods or run.methods
        if not args.resume:
            clear_run(Path(args.out) / run.name, run.task.name)
        runner = Runner(run.task, run.models, methods, run.budgets, name=run.name, out_dir=args.out,
                        limit=run.limit, batch_size=args.batch_size, keep_maps=1, task_options=run.task_options,
                        method_options={m: o for m, o in run.method_options.items() if m in methods},
                        progress=not args.quiet, threads=None)
        with warnings.catch_warnings():  # the table lists the cells a method cannot reach, with the reason
            warnings.filterwarnings("ignore", message="skipping ", category=UserWarning)
            summary = runner.run()
        print(f"\n## {run.name} ({run.task.name}, {len(run.models)} model(s), {run.limit} samples)\n")
        print(_short_table(summary, runner.run_dir))
        if run.excluded and not args.methods:
            print("methods left out:")
            for method, reason in run.excluded.items():
                print(f"- {method}: {reason}")
        checked = summary
        if run.check_limit:
            checker = run.check_runner(args.out, batch_size=args.batch_size, progress=not args.quiet, threads=None)
            checked = checker.run()
            print(f"\nbenchmark checks ({run.check_limit} test samples; {checker.run_dir}):")
        else:
            print(f"\nbenchmark checks (on the {run.limit} samples above):")
        for line in benchmark_checks(checked):
            print(f"  {line}")
        overlays = render_overlays(runner.run_dir, run.task, per_cell=1)
        print(f"plots: {', '.join(summary.get('plots', []))}")
        print(f"overlays: {len(overlays)} PNG(s) in {runner.run_dir / 'overlays'}")
    return 0


# ----------------------------------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------------------------------

EVAL_KEYS = ("name", "task", "task_options", "models", "methods", "budgets", "method_options", "split", "limit",
             "batch_size", "max_new_tokens", "warmup", "keep_maps", "out", "plots")


def load_config(path: str | Path) -> dict[str, Any]:
    """A run configuration from YAML or JSON, checked for unknown keys."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config: no file {path}")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(path.read_text()) or {}
    else:
        data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping at the top level, got {type(data).__name__}")
    unknown = sorted(set(data) - set(EVAL_KEYS))
    if unknown:
        raise UsageError(f"--config {path}: unknown key(s) {unknown}; accepted: {', '.join(EVAL_KEYS)}")
    return data


def model_spec(entry: str | dict[str, Any], defaults: dict[str, Any] | None = None):
    """A :class:`ModelSpec` from ``"path"``, ``"name=path"``, ``"tiny:<family>"`` or a config mapping."""
    from tokenreduce.eval.runner import ModelSpec

    defaults = {k: v for k, v in (defaults or {}).items() if v is not None}
    if isinstance(entry, dict):
        given, entry = entry, dict(entry)
        path = entry.pop("path", None)
        name = entry.pop("name", None) or (path and _model_name(path))
        if path is None:
            raise UsageError(f"model entry {given} has no `path`")
        if str(path).startswith("tiny:"):
            return ModelSpec(name, factory=_tiny_factory(str(path)[5:]), **{**defaults, **entry})
        return ModelSpec(name, path=str(path), **{**defaults, **entry})
    name, _, path = entry.rpartition("=") if "=" in entry else ("", "", entry)
    name = name or _model_name(path)
    if path.startswith("tiny:"):
        return ModelSpec(name, factory=_tiny_factory(path[5:]), **defaults)
    return ModelSpec(name, path=path, **defaults)


def _model_name(path: str) -> str:
    return Path(str(path).rstrip("/")).name.replace(":", "-") or str(path)


def _tiny_factory(family: str):
    from tokenreduce.testing.tiny import FAMILIES

    if family not in ("llava", "qwen2_vl", "qwen2_5_vl"):
        raise UsageError(f"tiny:<family> needs a family with a tiny processor (llava, qwen2_vl, qwen2_5_vl); "
                         f"got {family!r} (families: {', '.join(FAMILIES)})")

    def factory():
        from tokenreduce.testing.tiny import tiny_model, tiny_processor

        return tiny_model(family, num_layers=8), tiny_processor(family)

    return factory


def _eval(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    from tokenreduce.eval.records import read_records
    from tokenreduce.eval.runner import Runner
    from tokenreduce.eval.tasks import get_task

    cfg: dict[str, Any] = load_config(args.config) if args.config else {}
    for key in ("name", "task", "split", "limit", "batch_size", "max_new_tokens", "warmup", "keep_maps", "out"):
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    if args.methods:
        cfg["methods"] = args.methods
    if args.budgets:
        cfg["budgets"] = args.budgets
    if args.no_plots:
        cfg["plots"] = False
    task_options = {**cfg.get("task_options", {}), **_parse_pairs(args.task_opt, "--task-opt")}
    method_options = dict(cfg.get("method_options", {}))
    for key, value in _parse_pairs(args.method_opt, "--method-opt").items():
        method, _, option = key.partition(".")
        if not option:
            raise UsageError(f"--method-opt must be METHOD.OPTION=VALUE, got {key!r}")
        method_options.setdefault(method, {})[option] = value
    defaults = {"dtype": args.dtype, "device": args.device, "device_map": args.device_map}
    models = [model_spec(m, defaults) for m in (args.model or cfg.get("models") or [])]
    missing = [k for k, v in (("--task", cfg.get("task")), ("--model", models), ("--methods", cfg.get("methods"))) if not v]
    if missing:
        raise UsageError(f"tokenreduce eval: missing {', '.join(missing)} (on the command line or in --config)")
    check_names(cfg["task"], cfg["methods"], method_options, cfg.get("budgets") or [0.25])
    from tokenreduce.sources import check_model_source

    for spec in models:
        if spec.path is not None:
            try:
                check_model_source(spec.path, "--model")
            except OSError as exc:
                raise UsageError(f"tokenreduce eval: {exc}") from None
    name = cfg.get("name") or f"{cfg['task']}-{models[0].name}"
    try:  # bad task options and runner arguments: one line before anything loads
        task = get_task(cfg["task"], **task_options)
        runner = Runner(
            task, models, cfg["methods"], cfg.get("budgets") or [0.25], name=name, out_dir=cfg.get("out", "runs"),
            split=cfg.get("split"), limit=cfg.get("limit"), batch_size=cfg.get("batch_size", 4),
            max_new_tokens=cfg.get("max_new_tokens"), warmup=cfg.get("warmup", 1), keep_maps=cfg.get("keep_maps", 4),
            method_options=method_options, task_options=task_options, plots=cfg.get("plots", True),
            progress=not args.quiet, threads=None,  # chosen here, where --threads is known
        )
    except (ValueError, TypeError) as exc:
        raise UsageError(f"tokenreduce eval: {exc}") from None
    source = getattr(task, "source", None)
    if isinstance(getattr(source, "path", None), str) and getattr(task, "loader", None) is None:
        from tokenreduce.sources import check_dataset_source

        try:  # before datasets retries an unreachable hub for most of a minute
            check_dataset_source(source.path, f"task {task.name!r}" if "path" not in task_options else "--task-opt path",
                                 "--task-opt path=DIR (a local parquet/jsonl folder or a copy of the hub repository)")
        except OSError as exc:
            raise UsageError(f"tokenreduce eval: {exc}") from None
    previous = runner.run_dir / "run.json"
    if previous.is_file() and args.overwrite:
        shutil.rmtree(runner.run_dir)
    elif previous.is_file():
        changed = changed_settings(json.loads(previous.read_text()), runner.spec)
        if changed:
            raise UsageError(f"tokenreduce eval: {runner.run_dir} holds a run with other settings "
                             f"({'; '.join(changed)}); give another --name, or --overwrite to start it afresh")
        found = len(read_records(runner.run_dir))
        print(f"tokenreduce eval: resuming {runner.run_dir}: {found} record(s) found, those are not run again",
              file=sys.stderr)
    if args.threads is None:  # once the command line is known good: errors stay one line
        _set_threads(None, "eval")
    try:
        with warnings.catch_warnings():  # the table lists the cells a method cannot reach, with the reason
            warnings.filterwarnings("ignore", message="skipping ", category=UserWarning)
            summary = runner.run()
    except KeyboardInterrupt:
        saved = len(read_records(runner.run_dir))
        argv = [a for a in args.argv if a != "--overwrite"]
        print(f"\ntokenreduce eval: interrupted; {saved} record(s) saved in {runner.run_dir}; resume with: "
              f"{shlex.join(['tokenreduce', *argv])}", file=sys.stderr)
        return 130
    if "cells" in summary:
        print(_short_table(summary, runner.run_dir))
        overlays = []
        if cfg.get("plots", True):  # the records holding kept-token maps (--keep-maps per cell)
            overlays = render_overlays(runner.run_dir, task)
        print(f"records, summary, table and plots in {runner.run_dir}"
              + (f"; {len(overlays)} kept-token overlay(s) in {runner.run_dir / 'overlays'}" if overlays else ""))
    cells = len(models) * len(runner.cells)
    if runner.skipped and len(runner.skipped) == cells:
        print(f"tokenreduce eval: nothing evaluated: all {cells} cell(s) were skipped (reasons above)", file=sys.stderr)
        return 1
    return 0


# What makes the rows of a run: a rerun under the same name that changes one of these would mix rows that
# mean different things in one table. Methods, budgets and models may be added (new rows).
_ROW_SETTINGS = ("task", "task_options", "split", "limit", "max_new_tokens")


def changed_settings(old: dict[str, Any], spec: Any) -> list[str]:
    """``"limit 20 -> 10"`` for each setting of a saved ``run.json`` that ``spec`` (a RunSpec) changes."""
    from tokenreduce.eval.runner import _json_default

    new = json.loads(json.dumps(spec.__dict__, default=_json_default))
    out = [f"{key} {old.get(key)!r} -> {new[key]!r}" for key in _ROW_SETTINGS if old.get(key) != new[key]]
    old_options = old.get("method_options") or {}
    for method, options in new["method_options"].items():  # options of methods the rerun runs
        if method in old.get("methods", ()) and old_options.get(method, {}) != options:
            out.append(f"{method} options {old_options.get(method, {})!r} -> {options!r}")
    for method, options in old_options.items():
        if method in new["methods"] and method not in new["method_options"] and options:
            out.append(f"{method} options {options!r} -> {{}}")
    old_models = {m["name"]: m for m in old.get("models", [])}
    for model in new["models"]:
        if model["name"] in old_models and old_models[model["name"]] != model:
            out.append(f"model {model['name']} {old_models[model['name']]} -> {model}")
    return out


def check_names(task: str, methods: Sequence[str], method_options: dict[str, dict[str, Any]],
                budgets: Sequence[float] = (0.25,)) -> None:
    """Raise a one-line :class:`UsageError` with a "did you mean" for an unknown task, method or method option,
    or for an option that clashes with what the budget sets.

    Checked here, before any model loads, so a typo does not cost a model load nor turn into a skipped cell.
    """
    import dataclasses

    from tokenreduce.core.registry import get_method, list_methods
    from tokenreduce.core.stack import is_stack_name, order_members, split_name, stack_config
    from tokenreduce.eval.tasks import list_tasks

    if task not in list_tasks():
        raise did_you_mean("task", task, list_tasks())
    known = ["none", *list_methods()]
    stacks = [m for m in methods if is_stack_name(m)]
    named: list[str] = []  # every method the grid runs, alone or in a stack
    for entry in methods:
        try:
            members = split_name(entry) if is_stack_name(entry) else [entry]
        except ValueError as exc:
            raise UsageError(f"--methods: {exc}") from None
        if len(members) > 1 and "none" in members:
            raise UsageError(f"--methods {entry}: 'none' (the unreduced model) cannot be part of a stack")
        named.extend(members)
    for method in [*named, *method_options]:
        if method not in known:
            raise did_you_mean("method", method, known)
    for entry in stacks:
        try:
            order_members([get_method(m) for m in split_name(entry)])
        except ValueError as exc:
            raise UsageError(f"--methods {entry}: {exc}") from None
    for method, options in method_options.items():
        if method not in named:
            raise UsageError(f"--method-opt names method {method!r}, which is not in --methods {' '.join(methods)}")
        if method == "none":
            raise UsageError("--method-opt: 'none' (the unreduced model) takes no options")
        fields = [f.name for f in dataclasses.fields(get_method(method).config_cls) if f.init]
        for option in options:
            if option not in fields:
                raise did_you_mean(f"{method} option", option, fields)
        for budget in budgets:
            try:  # an option the budget sets (``pool.keep``) clashes on every model
                get_method(method).config_cls.at_budget(budget, num_layers=None, **options)
            except TypeError as exc:
                raise UsageError(f"--method-opt {method}: {exc}") from None
            except (ValueError, NotImplementedError):  # may depend on the model (its depth): the cell decides
                pass
    for entry in stacks:
        options = {m: method_options[m] for m in split_name(entry) if m in method_options}
        for budget in budgets:
            try:  # the same clash for a method inside a stack (which runs at its share of the budget)
                stack_config(entry, budget, None, **options)
            except TypeError as exc:
                raise UsageError(f"--method-opt {entry}: {exc}") from None
            except (ValueError, NotImplementedError):
                pass


# ----------------------------------------------------------------------------------------------------
# show
# ----------------------------------------------------------------------------------------------------


def render_overlays(run_dir: str | Path, task=None, *, per_cell: int | None = None, sample_ids: Sequence[str] = (),
                    cells: Sequence[str] = (), out_dir: str | Path | None = None, progress: bool = False) -> list[Path]:
    """Write ``overlays/<model>_<method>_<budget>_<sample>_<item>.png`` for records that hold kept maps.

    ``task`` defaults to the one named in the run's ``run.json`` (rebuilt with its saved options).
    ``cells`` filters by ``method`` or ``method@budget``; ``sample_ids`` by sample.
    """
    from tokenreduce.eval.overlay import render_record
    from tokenreduce.eval.runner import read_records

    run_dir = Path(run_dir)
    spec = json.loads((run_dir / "run.json").read_text())
    if task is None:
        from tokenreduce.eval.tasks import get_task

        task = get_task(spec["task"], **spec.get("task_options", {}))
    records = [r for r in read_records(run_dir).values() if r.get("kept")]
    if cells:
        records = [r for r in records if r["method"] in cells or f"{r['method']}@{r['budget']:g}" in cells]
    if sample_ids:
        records = [r for r in records if r["sample_id"] in set(sample_ids)]
    if per_cell is not None:
        counts: dict[tuple, int] = {}
        chosen = []
        for r in records:
            key = (r["model"], r["method"], r["budget"])
            if counts.get(key, 0) < per_cell:
                chosen.append(r)
                counts[key] = counts.get(key, 0) + 1
        records = chosen
    wanted = {r["sample_id"] for r in records}
    samples = {}
    for s in task.samples(spec.get("split"), spec.get("limit")):
        if s.id in wanted:
            samples[s.id] = s
        if len(samples) == len(wanted):
            break
    out = Path(out_dir) if out_dir else run_dir / "overlays"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    iterator = records
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(records, desc="overlays", unit="record", file=sys.stderr)
    for r in iterator:
        sample = samples.get(r["sample_id"])
        if sample is None:
            continue
        for j, image in enumerate(render_record(r, sample)):
            budget = "full" if r["budget"] is None else f"{r['budget']:g}"
            stem = "_".join(_safe(x) for x in (r["model"], r["method"], budget, r["sample_id"], str(j)))
            path = out / f"{stem}.png"
            image.save(path)
            paths.append(path)
    return paths


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in str(text))


def caption_lines(records, cells: Sequence[str] = (), sample_ids: Sequence[str] = ()) -> list[str]:
    """One line per item whose method recorded captions (``info["captions"]``, e.g. langdc): the caption of
    every segment with its frames and token count."""
    lines = []
    for rec in records:
        label = rec["method"] if rec.get("budget") is None else f"{rec['method']}@{rec['budget']:g}"
        if (cells and rec["method"] not in cells and label not in cells) or (sample_ids and rec["sample_id"] not in sample_ids):
            continue
        for i, item in enumerate(rec.get("items") or []):
            info = item.get("info") or {}
            if "captions" not in info:
                continue
            frames = info.get("segments") or [None] * len(info["captions"])
            counts = info.get("caption_tokens") or [None] * len(info["captions"])
            parts = [f"[{f[0]}-{f[1]}: {n} tok] {c!r}" if f else repr(c) for c, f, n in zip(info["captions"], frames, counts)]
            lines.append(f"{rec['model']} {label} {rec['sample_id']} {item['modality']} {i}: " + " | ".join(parts))
    return lines


def _short_table(summary: dict[str, Any], run_dir: Path) -> str:
    from tokenreduce.eval.report import short_table

    return f"{short_table(summary)}\nevery column: {run_dir / 'table.md'} and {run_dir / 'summary.json'}\n"


def cell_label(method: str, budget: float | None) -> str:
    """``method@budget`` (``none`` alone): how ``--cell`` names a cell."""
    return method if budget is None else f"{method}@{budget:g}"


def select_cells(cells: Sequence[dict[str, Any]], wanted: Sequence[str]) -> list[dict[str, Any]]:
    """The summary cells named by ``wanted`` (``method`` or ``method@budget``); all of them when it is empty."""
    if not wanted:
        return list(cells)
    return [c for c in cells if c["method"] in wanted or cell_label(c["method"], c["budget"]) in wanted]


def metrics_table(cells: Sequence[dict[str, Any]]) -> str:
    """Every metric of every cell as a markdown table: a row per cell, a column per metric (nested ones, such as
    per-category scores, flattened to ``categories.<name>``)."""

    def flat(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in metrics.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    rows = [(c, flat(c.get("metrics") or {})) for c in cells]
    keys: list[str] = []
    for _, metrics in rows:
        keys += [k for k in metrics if k not in keys]

    def fmt(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| model | cell | " + " | ".join(keys) + " |", "|---|---|" + "---:|" * len(keys)]
    for cell, metrics in rows:
        lines.append(f"| {cell['model']} | {cell_label(cell['method'], cell['budget'])} | "
                     + " | ".join(fmt(metrics.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _show(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    if not (run_dir / "run.json").is_file():
        raise UsageError(f"{run_dir} is not a run folder (no run.json); runs live under runs/<name>")
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file() or args.refresh:
        from tokenreduce.eval.report import write_reports
        from tokenreduce.eval.tasks import get_task

        spec = json.loads((run_dir / "run.json").read_text())
        write_reports(run_dir, get_task(spec["task"], **spec.get("task_options", {})), plots=True)
    summary = json.loads(summary_path.read_text())
    known = sorted({c["method"] for c in summary["cells"]} | {cell_label(c["method"], c["budget"]) for c in summary["cells"]})
    for wanted in args.cell or ():
        if not select_cells(summary["cells"], [wanted]):
            raise did_you_mean("cell", wanted, known)
    shown = {**summary, "cells": select_cells(summary["cells"], args.cell or ())}
    skipped = (summary.get("skipped_cells") or {}).items()  # keyed "model|method@budget"
    shown["skipped_cells"] = {k: v for k, v in skipped if not args.cell or k.split("|")[-1] in args.cell
                              or k.split("|")[-1].split("@")[0] in args.cell}
    print(_short_table(shown, run_dir))
    if args.stats:
        print(metrics_table(shown["cells"]))
        from tokenreduce.eval.runner import read_records

        for line in caption_lines(read_records(run_dir).values(), args.cell or (), args.sample or ()):
            print(line)
    if args.overlays:
        paths = render_overlays(run_dir, per_cell=args.per_cell, sample_ids=args.sample or (), cells=args.cell or (),
                                out_dir=args.out, progress=True)
        print(f"{len(paths)} overlay(s) written to {Path(args.out) if args.out else run_dir / 'overlays'}")
    from tokenreduce.eval.runner import read_records

    traced = [r for r in read_records(run_dir).values() if "ares" in (r.get("extra") or {})]
    if traced:  # runs of the decode-stage method: entropy over the generated tokens, HWE marked
        from tokenreduce.plugins.ares import save_entropy_plots

        out = Path(args.out) if args.out else run_dir / "entropy"
        paths = save_entropy_plots(traced if args.per_cell is None else traced[: args.per_cell], out)
        print(f"{len(paths)} entropy plot(s) written to {out}")
    return 0


# ----------------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------------


def _bench(args: argparse.Namespace) -> int:
    _set_threads(args.threads, "bench")
    from tokenreduce.eval import bench

    return bench.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenreduce", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    from tokenreduce.eval.demo import CHECK_SAMPLES, DEMO_BUDGETS, DEMO_SAMPLES

    demo = sub.add_parser("demo", help="evaluate every method on the synthetic benchmark's shipped tiny models")
    demo.add_argument("--samples", type=int, default=DEMO_SAMPLES,
                      help=f"test samples per benchmark family (default {DEMO_SAMPLES})")
    demo.add_argument("--methods", nargs="+", default=None,
                      help="methods (default: 'none' and every method that applies to the family's model)")
    demo.add_argument("--budgets", nargs="+", type=float, default=None,
                      help=f"budgets (default: {' '.join(f'{b:g}' for b in DEMO_BUDGETS)})")
    demo.add_argument("--models", default=None,
                      help="folder holding the three synthetic model directories (default: "
                           "$TOKENREDUCE_SYNTHETIC_MODELS, else assets/models)")
    demo.add_argument("--check-samples", type=int, default=None,
                      help="test samples on which the benchmark's two properties are checked (full-token "
                           "accuracy, random@10%%); default: "
                           + ", ".join(f"{n} {kind}" for kind, n in CHECK_SAMPLES.items())
                           + "; 0: on the grid's samples")
    demo.add_argument("--batch-size", type=int, default=4, help="samples per generate call (default 4)")
    demo.add_argument("--out", default="runs", help="folder of the runs (default runs/: runs/demo-<family>)")
    demo.add_argument("--resume", action="store_true",
                      help="keep the records of a previous demo run (default: start afresh)")
    demo.add_argument("--threads", type=int, default=1,
                      help="torch CPU threads (default 1: tiny models are fastest single-threaded on busy machines)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--verbose", action="store_true",
                      help="also the libraries' progress bars (transformers' weight loading, downloads)")
    demo.set_defaults(func=_demo)

    from tokenreduce.eval.tasks import list_tasks

    ev = sub.add_parser("eval", help="run a model x method x budget grid on a task")
    ev.add_argument("--config", help="YAML or JSON file with the run's settings (command-line flags override it)")
    ev.add_argument("--task", help=f"task name: {', '.join(list_tasks())}")
    ev.add_argument("--task-opt", action="append", metavar="KEY=VALUE",
                    help="task / data option, e.g. path=/data/docvqa, revision=<sha>, media_dir=..., num_frames=16")
    ev.add_argument("--model", action="append", metavar="[NAME=]PATH",
                    help="hub id, local directory or tiny:<family>; repeat for several models")
    ev.add_argument("--methods", nargs="+",
                    help="method names, stacks of one method per stage joined by '+' (divprune+fastv), and/or 'none' "
                         "(the unreduced model)")
    ev.add_argument("--budgets", nargs="+", type=float, help="fractions of visual tokens kept (default 0.25)")
    ev.add_argument("--method-opt", action="append", metavar="METHOD.OPTION=VALUE",
                    help="extra method option, e.g. fastv.query=text (fastv alone and in every stack)")
    ev.add_argument("--name", help="run name: results go to <out>/<name> (default <task>-<model>)")
    ev.add_argument("--out", default=None, help="folder of the runs (default runs/)")
    ev.add_argument("--split", default=None,
                    help="dataset split to evaluate, e.g. validation or test (default: the task's own)")
    ev.add_argument("--limit", type=int, default=None, help="first N samples only")
    ev.add_argument("--batch-size", type=int, default=None, help="samples per generate call (default 4)")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="generated tokens per answer (default: the task's)")
    ev.add_argument("--warmup", type=int, default=None, help="untimed generate calls per cell (default 1)")
    ev.add_argument("--keep-maps", type=int, default=None, help="samples per cell that store kept-token maps (default 4)")
    ev.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 or auto")
    ev.add_argument("--device", default=None, help="e.g. cuda:0 or cpu (default: this process's GPU, else CPU)")
    ev.add_argument("--device-map", default=None, help="'auto' to spread a large model over the GPUs")
    ev.add_argument("--no-plots", action="store_true", help="do not write the PNG plots and kept-token overlays")
    ev.add_argument("--overwrite", action="store_true",
                    help="start afresh when <out>/<name> holds a run with other settings (default: refuse; "
                         "with the same settings, a rerun resumes)")
    ev.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: the cores not busy with other work, at most torch's default)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.add_argument("--verbose", action="store_true",
                    help="also the libraries' progress bars (transformers' weight loading, downloads)")
    ev.set_defaults(func=_eval)

    from tokenreduce.eval import bench as bench_module

    bench = sub.add_parser("bench", help="prefill / decode / KV timing of reduced vs full visual tokens")
    bench_module.build_parser(bench)
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    bench.set_defaults(func=_bench)

    show = sub.add_parser("show", help="table, stats and kept-token overlays of a finished run")
    show.add_argument("run", help="the run folder, e.g. runs/demo-image")
    show.add_argument("--overlays", action="store_true", help="render kept-token overlays (PNG)")
    show.add_argument("--stats", action="store_true",
                      help="also print every metric of each cell (per-category scores too) and recorded captions")
    show.add_argument("--cell", action="append", help="only this method or method@budget (repeatable)")
    show.add_argument("--sample", action="append", help="only this sample id (repeatable)")
    show.add_argument("--per-cell", type=int, default=None, help="at most N overlays per cell")
    show.add_argument("--out", default=None, help="overlay folder (default <run>/overlays)")
    show.add_argument("--refresh", action="store_true", help="recompute summary, table and plots from the records")
    show.set_defaults(func=_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the command that resumes an interrupted run
    if not getattr(args, "verbose", False):
        quiet_libraries()
    try:
        return args.func(args)
    except UsageError as exc:
        message = str(exc)
        print(message if message.startswith("tokenreduce") else f"tokenreduce {args.command}: {message}",
              file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
