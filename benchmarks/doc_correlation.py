"""``doc_correlation`` on the synthetic document benchmark, against the baselines at the same budget.

    PYTHONPATH=. python benchmarks/doc_correlation.py --limit 300 --budget 0.34

One run of the evaluation runner (:class:`tokenreduce.eval.runner.Runner`): the trained tiny
LLaVA-OneVision document model (``tokenreduce.eval.synthetic``, anyres 2x2 crops + thumbnail) without
reduction and with ``doc_correlation``, ``pool``, ``random``, ``visionzip`` and ``divprune`` at
``--budget`` of the visual tokens. Writes ``runs/<name>/{records.jsonl, summary.json, table.md, *.png}``
and kept-token overlays (per-crop budgets labelled) under ``runs/<name>/overlays``, prints the table and
the acceptance check: ``doc_correlation`` at >= 98% of the unreduced accuracy and ahead of every baseline.
A finished run resumes (records are keyed by sample); pass ``--fresh`` to start over.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

BASELINES = ("pool", "random", "visionzip", "divprune")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=300, help="test samples (default 300)")
    parser.add_argument("--budget", type=float, default=0.34, help="fraction of visual tokens kept (default 0.34)")
    parser.add_argument("--methods", nargs="+", default=["doc_correlation", *BASELINES])
    parser.add_argument("--options", default="{}",
                        help='JSON options of doc_correlation, e.g. \'{"shallow_layer": 0}\'')
    parser.add_argument("--name", default="doc-correlation-document")
    parser.add_argument("--out", default="runs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--overlays", type=int, default=3, help="overlay PNGs per cell (default 3)")
    parser.add_argument("--fresh", action="store_true", help="delete an earlier run of the same name first")
    args = parser.parse_args(argv)

    from tokenreduce.cli import render_overlays
    from tokenreduce.eval.runner import ModelSpec, Runner
    from tokenreduce.eval.synthetic import load_model
    from tokenreduce.eval.tasks import get_task

    run_dir = Path(args.out) / args.name
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    task = get_task("synthetic-document")
    options = {"doc_correlation": json.loads(args.options)} if "doc_correlation" in args.methods else {}
    runner = Runner(task, [ModelSpec("synthetic-onevision-document", factory=lambda: load_model("document"))],
                    ["none", *args.methods], [args.budget], name=args.name, out_dir=args.out, limit=args.limit,
                    batch_size=args.batch_size, keep_maps=args.overlays, method_options=options)
    summary = runner.run()
    print((run_dir / "table.md").read_text())
    paths = render_overlays(run_dir, task, per_cell=args.overlays)
    print(f"overlays: {len(paths)} PNG(s) in {run_dir / 'overlays'}")
    return report(summary, args.budget)


def report(summary: dict, budget: float) -> int:
    """Print the acceptance check from the run's summary; 0 when it holds."""
    cells = {(c["method"], c["budget"]): c for c in summary["cells"]}
    full = cells.get(("none", None))
    ours = cells.get(("doc_correlation", budget))
    if full is None or ours is None or full["primary"] is None or ours["primary"] is None:
        print("summary lacks the unreduced cell or doc_correlation's cell")
        return 1

    def describe(c):
        share = c["visual_tokens_out"] / c["visual_tokens_in"] if c["visual_tokens_in"] else float("nan")
        return f"{c['primary']:.3f} ({100 * share:.1f}% of visual tokens)"

    ratio = ours["primary"] / full["primary"] if full["primary"] else float("nan")
    rivals = {m: cells[(m, budget)] for m in BASELINES if (m, budget) in cells}
    ahead = all(ours["primary"] > c["primary"] for c in rivals.values())
    print(f"full: {full['primary']:.3f}; doc_correlation@{budget:g}: {describe(ours)} = {100 * ratio:.1f}% of full")
    for m, c in rivals.items():
        print(f"  {m}@{budget:g}: {describe(c)}")
    print(f"acceptance (>= 98% of full, ahead of {', '.join(rivals)}): {'met' if ratio >= 0.98 and ahead else 'NOT met'}")
    return 0 if ratio >= 0.98 and ahead else 1


if __name__ == "__main__":
    raise SystemExit(main())
