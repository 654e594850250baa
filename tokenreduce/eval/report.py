"""Summaries of a run: ``summary.json``, ``table.md`` and the accuracy / prefill-time vs visual-token plots.

One summary row per (model, method, budget): the task's official metrics over the samples that ran
(errors are counted, not scored), agreement with the unreduced model's answers when ``none`` ran, mean
visual tokens (at the LLM input, at the deepest layer, averaged over layers), mean analytic prefill
FLOPs and their ratio to the unreduced prefill, and MEDIAN reducer time, time to first token and decode
time per token (timings are noisy; the median resists the outliers), the largest peak memory and the
mean KV-cache bytes. ``tokdense`` is VQToken's token density: the primary metric in percent (metrics are
fractions in [0, 1]) per visual token fed to the LLM, e.g. 57.72 % / 13.08 tokens = 4.41.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenreduce.core.registry import list_methods
from tokenreduce.core.stats import budget_missed
from tokenreduce.eval.records import read_records
from tokenreduce.eval.task import Task

BASELINE = "none"


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _median(values) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def tokdense(primary: float | None, tokens: float | None) -> float | None:
    """Token density (VQToken, NeurIPS'25): ``100 * primary / tokens`` with ``tokens`` the mean visual
    tokens at the LLM input; None when either is missing or no token is fed."""
    if primary is None or not tokens:
        return None
    return 100.0 * primary / tokens


def cell_key(rec: Mapping[str, Any]) -> tuple[str, str, float | None]:
    return rec["model"], rec["method"], rec.get("budget")


def summarize(records: Sequence[Mapping[str, Any]], task: Task, skipped: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The run's summary from its records (any order, any number of resumed sessions)."""
    cells: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        cells[cell_key(r)].append(r)
    baseline_pred = {
        (r["model"], r["sample_id"]): r.get("prediction") for r in records
        if r["method"] == BASELINE and r.get("error") is None
    }
    rows = []
    # Per model: the unreduced model first, then by budget, methods in name order within a budget.
    for (model, method, budget), recs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1] != BASELINE,
                                                                                  kv[0][2] or 0, kv[0][1])):
        ok = [r for r in recs if r.get("error") is None]
        errors = [r for r in recs if r.get("error") is not None]
        metrics = task.aggregate(ok) if ok else {}
        agree = [r.get("prediction") == baseline_pred[(model, r["sample_id"])] for r in ok
                 if (model, r["sample_id"]) in baseline_pred]
        flops = _mean(r.get("prefill_flops") for r in ok)
        flops_full = _mean(r.get("prefill_flops_full") for r in ok)
        llm_input = _mean(r.get("visual_tokens_llm_input") for r in ok)
        tokens_in = _mean(r.get("visual_tokens_in") for r in ok)
        layer_mean = _mean(r.get("visual_tokens_layer_mean") for r in ok)
        share = layer_mean / tokens_in if layer_mean is not None and tokens_in else None
        rows.append({
            "model": model, "method": method, "budget": budget, "samples": len(recs), "errors": len(errors),
            "error_examples": sorted({str(r["error"])[:200] for r in errors})[:3],
            "metrics": metrics, "primary": metrics.get(task.primary_metric),
            "agreement_with_none": sum(agree) / len(agree) if agree else None,
            "visual_tokens_in": _mean(r.get("visual_tokens_in") for r in ok),
            "visual_tokens_llm_input": llm_input,
            "tokdense": tokdense(metrics.get(task.primary_metric), llm_input),
            "visual_tokens_out": _mean(r.get("visual_tokens_out") for r in ok),
            "visual_tokens_layer_mean": layer_mean,
            "layer_mean_share": share,
            "budget_missed": None if budget is None or share is None else budget_missed(budget, share),
            "prefill_flops": flops, "prefill_flops_full": flops_full,
            "prefill_flops_ratio": flops / flops_full if flops and flops_full else None,
            "reducer_ms_median": _median(r.get("reducer_ms") for r in ok),
            "ttft_ms_median": _median(r.get("ttft_ms") for r in ok),
            "decode_ms_per_token_median": _median(r.get("decode_ms_per_token") for r in ok),
            "peak_memory_bytes_max": max((r["peak_memory_bytes"] for r in ok if r.get("peak_memory_bytes")), default=None),
            "memory_kind": next((r.get("memory_kind") for r in ok if r.get("memory_kind")), None),
            "kv_cache_bytes_mean": _mean(r.get("kv_cache_bytes") for r in ok),
            "batch_size_median": _median(r.get("batch_size") for r in ok),
            **primary_interval(ok, task),
        })
    _add_comparisons(rows)
    return {"task": task.name, "primary_metric": task.primary_metric, "cells": rows,
            "skipped_cells": dict(skipped or {}),
            "notes": ("timings are medians over samples; with batch_size > 1 a sample's time to first token and "
                      "decode time are its batch's; errors are excluded from the metrics and counted in `errors`")}


CI_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 1000


def wilson_interval(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``successes / n`` (95 % by default): unlike the normal
    approximation it stays inside [0, 1] and is not empty at 0 or n successes."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # p inside despite rounding


def primary_interval(records: Sequence[Mapping[str, Any]], task: Task) -> dict[str, Any]:
    """A 95 % interval of the task's primary metric over ``records`` (scored, error-free).

    Wilson's interval when the primary metric is the mean of 0/1 per-sample scores (exact-match accuracy);
    otherwise (ANLS, F1, MME's total, ...) a percentile bootstrap: the task's own aggregate over
    ``BOOTSTRAP_RESAMPLES`` resamples of the records with replacement, seeded, so a summary is reproducible.
    """
    out: dict[str, Any] = {"primary_ci_low": None, "primary_ci_high": None, "primary_ci_method": None}
    scored = [r for r in records if r.get("score") is not None]
    if not scored:
        return out
    scores = [float(r["score"]) for r in scored]
    primary = task.aggregate(scored).get(task.primary_metric)
    if primary is None:
        return out
    if all(s in (0.0, 1.0) for s in scores) and math.isclose(primary, sum(scores) / len(scores), abs_tol=1e-12):
        low, high = wilson_interval(sum(scores), len(scores))
        return {"primary_ci_low": low, "primary_ci_high": high, "primary_ci_method": "wilson"}

    rng = random.Random(0)
    values = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        value = task.aggregate([scored[rng.randrange(len(scored))] for _ in scored]).get(task.primary_metric)
        if value is not None:
            values.append(float(value))
    if not values:
        return out
    values.sort()
    tail = (1 - CI_LEVEL) / 2
    low = values[min(len(values) - 1, int(tail * len(values)))]
    high = values[min(len(values) - 1, int((1 - tail) * len(values)))]
    return {"primary_ci_low": low, "primary_ci_high": high, "primary_ci_method": "bootstrap"}


def _add_comparisons(rows: list[dict[str, Any]]) -> None:
    """Each row's change of the primary metric from the unreduced model (``delta_vs_none``) and its measured
    prefill speedup (``prefill_speedup``: the unreduced model's median time to first token over the row's,
    a ratio of medians), against the ``none`` row of the same model; None without one."""
    full = {r["model"]: r for r in rows if r["method"] == BASELINE}
    for r in rows:
        base = full.get(r["model"])
        r["delta_vs_none"] = (r["primary"] - base["primary"] if base and r["primary"] is not None
                              and base["primary"] is not None else None)
        r["prefill_speedup"] = (base["ttft_ms_median"] / r["ttft_ms_median"] if base and r["ttft_ms_median"]
                                and base["ttft_ms_median"] else None)


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _budget_cell(cell: Mapping[str, Any]) -> str:
    """The cell's budget, flagged with the achieved layer-mean share when it misses by more than 10 %."""
    text = _fmt(cell["budget"], "g")
    if cell.get("budget_missed"):
        text += f" MISSED ({100 * cell['layer_mean_share']:.1f}% over layers)"
    return text


def short_table(summary: Mapping[str, Any]) -> str:
    """The table a reader starts from: nine columns, one row per cell, per model (its name in bold above),
    the unreduced model first and then by budget; the cells skipped, with the reason, below.

    ``tokens`` is the visual tokens per sample averaged over the LLM's layers (what budgets are stated in)
    with its share of the tokens in; MISSED flags a share off the budget by more than 10 %.
    """
    metric = summary["primary_metric"]
    methods = {c.get("primary_ci_method") for c in summary["cells"]} - {None}
    how = "Wilson" if methods == {"wilson"} else "bootstrap" if methods == {"bootstrap"} else "Wilson / bootstrap"
    head = (f"| method | budget | tokens (layer mean) | FLOPs ratio | {metric} [95% CI, {how}] | vs full | "
            "prefill speedup | n | errors |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    by_model: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for c in summary["cells"]:
        by_model[c["model"]].append(c)
    lines: list[str] = []
    for model, cells in by_model.items():
        lines += ([""] if lines else []) + [f"**{model}**", ""]
        lines += [head, rule]
        for c in cells:
            tokens = _fmt(c.get("visual_tokens_layer_mean"), ".1f")
            if c.get("layer_mean_share") is not None:
                tokens += f" ({100 * c['layer_mean_share']:.0f}%)"
            if c.get("budget_missed"):
                tokens += " MISSED"
            accuracy = _fmt(c.get("primary"), ".3f")
            if c.get("primary_ci_low") is not None:
                accuracy += f" [{c['primary_ci_low']:.3f}, {c['primary_ci_high']:.3f}]"
            budget = "full" if c["budget"] is None else f"{100 * c['budget']:g}%"
            speedup = c.get("prefill_speedup")
            lines.append(
                f"| {c['method']} | {budget} | {tokens} | {_fmt(c.get('prefill_flops_ratio'), '.2f')} | {accuracy} | "
                f"{_fmt(c.get('delta_vs_none'), '+.3f')} | {_fmt(speedup, '.2f') + ('x' if speedup else '')} | "
                f"{c['samples']} | {c['errors']} |"
            )
    skipped = summary.get("skipped_cells") or {}
    if skipped:
        lines += ["", "Skipped cells:"] + [f"- {k}: {v}" for k, v in sorted(skipped.items())]
    return "\n".join(lines) + "\n"


def markdown_table(summary: Mapping[str, Any]) -> str:
    """``table.md``: :func:`short_table`, then every column of every cell (metric, agreement with the
    unreduced model, tokens at each point, FLOPs, times, memory)."""
    return short_table(summary) + "\n## All columns\n\n" + full_table(summary)


def _interval(cell: Mapping[str, Any]) -> str:
    if cell.get("primary_ci_low") is None:
        return "-"
    return f"[{cell['primary_ci_low']:.3f}, {cell['primary_ci_high']:.3f}] {cell['primary_ci_method']}"


def full_table(summary: Mapping[str, Any]) -> str:
    """One row per cell, primary metric first, then tokens, FLOPs, time, memory."""
    metric = summary["primary_metric"]
    head = (f"| model | method | budget | {metric} | 95% CI | vs full | agree w/ none | visual tokens in | LLM input | "
            "TokDense | out (deepest) | layer mean | FLOPs ratio | TTFT ms (med) | prefill speedup | "
            "decode ms/tok (med) | reducer ms (med) | peak MiB | KV MiB | n | errors |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for c in summary["cells"]:
        lines.append(
            f"| {c['model']} | {c['method']} | {_budget_cell(c)} | {_fmt(c['primary'], '.4g')} | {_interval(c)} | "
            f"{_fmt(c.get('delta_vs_none'), '+.3f')} | {_fmt(c['agreement_with_none'], '.3f')} | {_fmt(c['visual_tokens_in'], '.1f')} | "
            f"{_fmt(c.get('visual_tokens_llm_input'), '.1f')} | {_fmt(c.get('tokdense'), '.3g')} | "
            f"{_fmt(c['visual_tokens_out'], '.1f')} | {_fmt(c['visual_tokens_layer_mean'], '.1f')} | "
            f"{_fmt(c['prefill_flops_ratio'], '.3f')} | {_fmt(c['ttft_ms_median'], '.1f')} | "
            f"{_fmt(c.get('prefill_speedup'), '.2f')} | "
            f"{_fmt(c['decode_ms_per_token_median'], '.2f')} | {_fmt(c['reducer_ms_median'], '.2f')} | "
            f"{_fmt(c['peak_memory_bytes_max'] and c['peak_memory_bytes_max'] / 2**20, '.0f')} | "
            f"{_fmt(c['kv_cache_bytes_mean'] and c['kv_cache_bytes_mean'] / 2**20, '.3f')} | {c['samples']} | {c['errors']} |"
        )
    return "\n".join(lines) + "\n"


# Strong, distinguishable colours (matplotlib's tab10) and markers; a method's pair follows from its position
# in the registry, so it is the same in every plot of every run. The star is the unreduced model's.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
MARKERS = ("o", "s", "D", "^", "v", "<", ">", "p", "h")


def method_style(method: str) -> dict[str, Any]:
    """Colour, marker and line style of ``method`` in every plot: from its index among the registered
    methods (sorted names); a name outside the registry (a composite such as ``divprune+fastv``) takes a
    stable index after them. ``none`` is a black star."""
    if method == BASELINE:
        return {"color": "black", "marker": "*", "linestyle": "none"}
    names = list_methods()
    if method in names:
        i = names.index(method)
    else:
        i = len(names) + zlib.crc32(method.encode()) % 64
    # colour i % 10 and marker i % 9: distinct pairs for the first 90 indices; dashed lines past ten methods
    return {"color": COLOURS[i % len(COLOURS)], "marker": MARKERS[i % len(MARKERS)],
            "linestyle": "-" if i % 20 < 10 else "--"}


def plot_summary(summary: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """``accuracy_vs_tokens[_<model>].png`` and ``prefill_vs_tokens[_<model>].png``: one line per method.

    The x axis is the visual tokens averaged over the LLM's layers (what in-LLM budgets are stated in, and
    what the prefill cost follows); the unreduced model is a black star drawn above the lines, the legend
    sits outside the axes; accuracy points carry their 95 % interval. Markers are hollow so that methods
    with the same points (``vqtoken`` and ``vqtoken_codebook`` without VQ-attention) both stay visible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    by_model: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for c in summary["cells"]:
        by_model[c["model"]].append(c)
    paths = []
    suffix_needed = len(by_model) > 1
    for model, cells in by_model.items():
        suffix = f"_{_safe(model)}" if suffix_needed else ""
        for y_key, y_label, stem in (
            ("primary", f"{summary['task']} {summary['primary_metric']} (95% interval)", "accuracy_vs_tokens"),
            ("ttft_ms_median", "prefill time: median time to first token (ms)", "prefill_vs_tokens"),
        ):
            fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
            methods: dict[str, list[tuple[float, float, float | None, float | None]]] = defaultdict(list)
            for c in cells:
                x, y = c.get("visual_tokens_layer_mean"), c.get(y_key)
                if x is None or y is None:
                    continue
                low, high = (c.get("primary_ci_low"), c.get("primary_ci_high")) if y_key == "primary" else (None, None)
                methods[c["method"]].append((x, y, low, high))
            # the unreduced model last: drawn above the lines
            for method in sorted(m for m in methods if m != BASELINE) + ([BASELINE] if BASELINE in methods else []):
                pts = sorted(methods[method])
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                style = method_style(method)
                full = method == BASELINE
                if all(p[2] is not None for p in pts):
                    # a percentile bootstrap interval need not contain the point estimate: no negative bar
                    yerr = [[max(0.0, y - p[2]) for y, p in zip(ys, pts)], [max(0.0, p[3] - y) for y, p in zip(ys, pts)]]
                    ax.errorbar(xs, ys, yerr=yerr, fmt="none", ecolor=style["color"], elinewidth=1, capsize=3,
                                alpha=0.8 if full else 0.5, zorder=9 if full else 2)
                ax.plot(xs, ys, label="none (full)" if full else method, color=style["color"],
                        marker=style["marker"], linestyle=style["linestyle"], markersize=15 if full else 7,
                        markerfacecolor=style["color"] if full else "none", markeredgewidth=1.5,
                        zorder=10 if full else 3)
            ax.set_xlabel("visual tokens per sample (mean over LLM layers)")
            ax.set_ylabel(y_label)
            ax.set_title(f"{summary['task']} - {model}")
            ax.grid(True, alpha=0.3)
            if methods:
                ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
            fig.tight_layout()
            path = out_dir / f"{stem}{suffix}.png"
            fig.savefig(path)
            plt.close(fig)
            paths.append(path)
    return paths


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def write_reports(run_dir: str | Path, task: Task, plots: bool = True,
                  skipped: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read the run's records; write ``summary.json``, ``table.md`` and (``plots``) the PNGs; return the summary."""
    run_dir = Path(run_dir)
    records = list(read_records(run_dir).values())
    summary = summarize(records, task, skipped)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (run_dir / "table.md").write_text(markdown_table(summary))
    if plots:
        summary["plots"] = [str(p) for p in plot_summary(summary, run_dir)]
    return summary
