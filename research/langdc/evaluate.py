"""The LangDC table on the synthetic video benchmark: evaluation-runner runs, FLOPs with the captioner, and
how caption length follows content.

Two :class:`~tokenreduce.eval.runner.Runner` runs on the test split of the synthetic video benchmark with
the shipped OneVision video model:

1. ``none`` (the full 577 visual tokens) and ``langdc`` with the trained captioner, its base branch at
   ``--base-keep`` of the tokens; the soft caption tokens come on top, as many as the captions are long.
2. ``pool`` at the budget of the mean number of LLM visual tokens ``langdc`` fed (run 1's), and at 1.2
   times that: pooling every frame to a whole grid moves in steps (4, 6, 9 tokens of a 6x6 frame), so the
   two rows bracket ``langdc``'s count; the check compares with the larger.

The table gives accuracy (overall and per question category), relative accuracy, LLM visual tokens and
total FLOPs: the LLM prefill (analytic, as every run summary counts it) plus, for ``langdc``, the
captioner's analytic FLOPs recorded per video (``captioner_flops``), against the full-token prefill. It
also gives the captioner's median time against the time to first token it saves, and, per segment of every
test video, the Pearson and Spearman correlations of the caption's token count with the number of events
the generator put there (0 for a static segment), with the mean count on static and on busy segments::

    python -m research.langdc.evaluate --captioner runs/langdc --limit 300

Writes ``langdc.md`` / ``langdc.json`` next to run 1's files.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tokenreduce.plugins.langdc.data import happenings
from tokenreduce.plugins.langdc.training import pearson, spearman

DEFAULT_BASE_KEEP = 0.11


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ok(records: dict[str, dict[str, Any]], method: str) -> list[dict[str, Any]]:
    return [r for r in records.values() if r["method"] == method and r.get("error") is None]


def caption_content(records: Sequence[dict[str, Any]], samples: dict[str, Any]) -> dict[str, Any]:
    """Per segment: caption tokens (from the records' item info) against the events the ground truth puts
    there; correlations and mean tokens on static and busy segments."""
    tokens, events = [], []
    for r in records:
        truth = samples[r["sample_id"]].meta.get("segment_captions") or []
        info = next((it["info"] for it in r.get("items", []) if it.get("modality") == "video" and "info" in it), None)
        if info is None or len(info["caption_tokens"]) != len(truth):
            continue
        tokens += [float(n) for n in info["caption_tokens"]]
        events += [float(happenings(seg["caption"])) for seg in truth]
    static = [n for n, e in zip(tokens, events) if e == 0]
    busy = [n for n, e in zip(tokens, events) if e > 0]
    return {
        "segments": len(tokens),
        "pearson_tokens_vs_events": pearson(tokens, events) if tokens else None,
        "spearman_tokens_vs_events": spearman(tokens, events) if tokens else None,
        "mean_tokens_static": statistics.fmean(static) if static else None,
        "mean_tokens_busy": statistics.fmean(busy) if busy else None,
    }


def langdc_table(summaries: Sequence[dict[str, Any]], records: dict[str, dict[str, Any]],
                 samples: dict[str, Any], vlm_rank: int = 0) -> tuple[str, dict[str, Any]]:
    """Markdown table and JSON of the runs, with the acceptance checks."""
    cells = {c["method"]: c for s in summaries for c in s["cells"]}  # pool: the last (larger) budget
    full = cells.get("none", {}).get("primary")
    flops_full = cells.get("none", {}).get("prefill_flops")
    captioner_flops = statistics.fmean(
        [sum(it["info"].get("captioner_flops", 0.0) for it in r.get("items", []) if "info" in it)
         for r in _ok(records, "langdc")] or [0.0]
    )
    captioner_ms = [it["info"]["captioner_ms"] for r in _ok(records, "langdc") for it in r.get("items", [])
                    if "info" in it and "captioner_ms" in it["info"]]
    categories = sorted({k for c in cells.values() for k in (c.get("metrics") or {}).get("categories", {})})
    lines = [
        "| method | LLM visual tokens | share | accuracy | vs full | "
        + " | ".join(categories) + " | total FLOPs vs full | TTFT ms (median) |",
        "|---|---|---|---|---|" + "---|" * len(categories) + "---|---|",
    ]
    rows = []
    ordered = [c for m in ("none", "langdc", "pool") for c in sorted(
        (c for s in summaries for c in s["cells"] if c["method"] == m), key=lambda c: c["budget"] or 0)]
    for c in ordered:
        method = c["method"]
        extra = captioner_flops if method == "langdc" else 0.0
        total = (c["prefill_flops"] or 0.0) + extra
        row = {
            "method": method, "budget": c["budget"], "tokens": c["visual_tokens_llm_input"],
            "share": c["visual_tokens_llm_input"] / c["visual_tokens_in"] if c["visual_tokens_in"] else None,
            "accuracy": c["primary"], "relative": c["primary"] / full if full else None,
            "by_category": (c.get("metrics") or {}).get("categories", {}),
            "total_flops": total, "flops_vs_full": total / flops_full if flops_full else None,
            "captioner_flops": extra, "ttft_ms": c["ttft_ms_median"], "samples": c["samples"],
        }
        rows.append(row)
        cats = " | ".join(_fmt(row["by_category"].get(k), ".3f") for k in categories)
        lines.append(
            f"| {method} | {_fmt(row['tokens'], '.1f')} | {_fmt(row['share'], '.1%')} | {_fmt(row['accuracy'], '.3f')} | "
            f"{_fmt(row['relative'], '.1%')} | {cats} | {_fmt(row['flops_vs_full'], '.1%')} | {_fmt(row['ttft_ms'], '.1f')} |"
        )
    content = caption_content(_ok(records, "langdc"), samples)
    lines += [
        "",
        f"Captioner: {captioner_flops / 1e6:.2f} MFLOPs per video on average (in the `langdc` total), "
        f"{_fmt(statistics.median(captioner_ms) if captioner_ms else None, '.1f')} ms per video (median).",
        f"Caption tokens per segment vs events in it ({content['segments']} segments): Pearson "
        f"{_fmt(content['pearson_tokens_vs_events'], '.3f')}, Spearman {_fmt(content['spearman_tokens_vs_events'], '.3f')}; "
        f"mean {_fmt(content['mean_tokens_static'], '.2f')} tokens on static segments, "
        f"{_fmt(content['mean_tokens_busy'], '.2f')} on busy ones.",
    ]
    if vlm_rank:
        lines.append(f"The `langdc` row reads the LLM with the rank-{vlm_rank} adapters trained with its captioner "
                     "(added while wrapped); every other row reads the unchanged LLM.")
    by = {r["method"]: r for r in rows}  # pool: its larger budget
    checks: dict[str, bool] = {}
    if "langdc" in by:
        ld = by["langdc"]
        if full:
            checks["langdc_at_least_95pct_of_full"] = ld["accuracy"] >= 0.95 * full
        checks["langdc_at_most_50pct_of_full_flops"] = ld["flops_vs_full"] is not None and ld["flops_vs_full"] <= 0.5
        if "pool" in by:
            checks["langdc_ahead_of_pool_at_as_many_tokens"] = (
                by["pool"]["tokens"] >= ld["tokens"] and ld["accuracy"] > by["pool"]["accuracy"]
            )
        checks["static_segments_fewer_tokens"] = (content["mean_tokens_static"] or 0) < (content["mean_tokens_busy"] or 0)
    lines += ["", "Checks: " + ", ".join(f"{k}={v}" for k, v in checks.items())]
    return "\n".join(lines) + "\n", {"rows": rows, "caption_content": content, "checks": checks,
                                     "full_accuracy": full, "captioner_ms_median":
                                     statistics.median(captioner_ms) if captioner_ms else None}


def evaluate(model_factory: Callable[[], tuple[Any, Any]], task, *, captioner: str,
             base_keep: float = DEFAULT_BASE_KEEP, name: str = "langdc-synthetic-video", out_dir: str | Path = "runs",
             split: str | None = "test", limit: int | None = 300, batch_size: int = 16,
             options: dict[str, Any] | None = None, model_name: str = "model", progress: bool = True) -> dict[str, Any]:
    """Run both grids and write ``langdc.md`` / ``langdc.json`` into run 1's directory. ``options``: further
    ``langdc`` config options (e.g. ``max_caption_tokens``)."""
    from tokenreduce.eval.runner import ModelSpec, Runner, read_records
    from tokenreduce.plugins.langdc.captioner import Captioner

    spec = [ModelSpec(model_name, factory=model_factory)]
    common = dict(out_dir=out_dir, split=split, limit=limit, batch_size=batch_size, keep_maps=2, progress=progress)
    first = Runner(task, spec, ["none", "langdc"], [base_keep], name=name,
                   method_options={"langdc": {**(options or {}), "captioner": captioner}}, **common).run()
    cell = next(c for c in first["cells"] if c["method"] == "langdc")
    pool_budget = cell["visual_tokens_llm_input"] / cell["visual_tokens_in"]
    pool_budgets = [pool_budget, min(1.0, 1.2 * pool_budget)]
    second = Runner(task, spec, ["pool"], pool_budgets, name=f"{name}-pool", **common).run()
    run_dir = Path(out_dir) / name
    records = read_records(run_dir)
    samples = {s.id: s for s in task.samples(split, limit)}
    vlm_rank = Captioner.from_pretrained(captioner).config.vlm_rank
    table, data = langdc_table([first, second], records, samples, vlm_rank)
    (run_dir / "langdc.md").write_text(table)
    (run_dir / "langdc.json").write_text(json.dumps({**data, "captioner": str(captioner), "base_keep": base_keep,
                                                     "pool_budgets": pool_budgets, "vlm_rank": vlm_rank},
                                                    indent=2, default=str) + "\n")
    return {"summaries": [first, second], "table": table, **data}


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - exercised through the CLI
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captioner", required=True, help="trained captioner (directory or hub repo id)")
    parser.add_argument("--base-keep", type=float, default=DEFAULT_BASE_KEEP)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--name", default="langdc-synthetic-video")
    parser.add_argument("--out-dir", default="runs")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tokenreduce.eval.synthetic import load_model
    from tokenreduce.eval.tasks import get_task

    result = evaluate(lambda: load_model("video"), get_task("synthetic-video", split=args.split),
                      captioner=args.captioner, base_keep=args.base_keep, name=args.name, out_dir=args.out_dir,
                      split=args.split, limit=args.limit, batch_size=args.batch_size,
                      model_name="synthetic-onevision-video")
    print(result["table"])
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
