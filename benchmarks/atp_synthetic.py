"""Trained ATP against training-free ATP and the other baselines at one average budget, on ``synthetic-image``.

Every method keeps the same share of the visual tokens (default 25%) averaged over the LLM's layers, the
way the runner states budgets (``at_budget(budget, num_layers=...)``): ``none``, ``atp_trained`` (ATP
with trained threshold heads), ``atp`` (training-free thresholds), ``fastv``, ``pdrop``, ``visionzip`` and
``random``. The runner writes its records, ``table.md``, ``summary.json`` and plots to ``--out``; this
script then prints each method's accuracy relative to ``none``, the visual tokens it actually kept, and
whether trained ATP stays within the budget (its heads set their own: measured, not imposed), keeps >= 98%
of the unreduced accuracy and beats every other method. ``atp_kept_by_objects.png`` shows the tokens each
instance kept against how many objects its scene holds (ATP's claim: simple images are pruned harder).

    python benchmarks/atp_synthetic.py --heads runs/atp-heads                     # assets/models/synthetic-llava-image
    python benchmarks/atp_synthetic.py --model runs/img7 --heads runs/atp-heads --n 200 --out runs/atp-synthetic

ATP's stages: the heads' own layers and spatial rates (``atp_heads.json``), used for training-free ATP too,
so both prune at the same places. ATP's defaults (stages at 4/32, 14/32, 24/32 of the depth, spatial rates
0.25 / 0.0625 / 0) cannot average 25% over the shipped 6-layer LLM; the heads trained with
``--layers 1 2 4 --spatial-rates 0.1 0.05 0.0`` can. ``--atp-layers`` / ``--atp-spatial-rates`` set the
stages of training-free ATP when no heads are given. A method that cannot reach the budget is reported as
skipped, never run at another budget. Trained ATP's budget is the heads' (their training target): its
``kept`` column shows what it really kept.

Heads trained together with the LLM (``--llm-lr > 0``: the tuned model is saved next to the heads) add a
second model to the same run, ``<heads dir name>``, on which every method runs again: the table then shows
trained ATP on the LLM it was trained with, the baselines on both LLMs, and ``none`` on both, and the checks
compare trained ATP on the tuned LLM against the ORIGINAL model's unreduced accuracy and against every
baseline's best of the two LLMs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "assets" / "models" / "synthetic-llava-image"
METHODS = ("none", "atp_trained", "atp", "fastv", "pdrop", "visionzip", "random")
KEEP_GOAL = 0.98  # trained ATP's accuracy relative to the unreduced model
BUDGET_SLACK = 0.005  # trained ATP's measured share of visual tokens may exceed the budget by this much


def register_trained_atp() -> None:
    """``atp_trained``: ATP under a second name, so the runner's grid holds it next to training-free ``atp``."""
    from tokenreduce.core.registry import _METHODS, register_method
    from tokenreduce.plugins.atp import ATPConfig, ATPMethod

    if "atp_trained" in _METHODS:
        return

    class TrainedATPConfig(ATPConfig):
        """ATP with trained threshold heads (``heads`` required)."""

        def validate(self) -> None:
            super().validate()
            if self.heads is None:
                raise ValueError("`heads` is required for atp_trained (a directory written by ATP's training)")

    @register_method("atp_trained", config_cls=TrainedATPConfig, stages="llm",
                     description="ATP with trained threshold heads")
    class TrainedATPMethod(ATPMethod):
        pass


def heads_stages(heads: str | Path) -> dict:
    """The layers and spatial rates saved with trained heads."""
    meta = json.loads((Path(heads) / "atp_heads.json").read_text())
    out = {"layers": tuple(meta["layers"])}
    if meta.get("spatial_rates") is not None:
        out["spatial_rates"] = tuple(meta["spatial_rates"])
    return out


def compare(summary: dict, budget: float, base_model: str | None = None,
            trained_model: str | None = None) -> tuple[list[dict], dict]:
    """Per cell: accuracy, relative to ``none`` of ``base_model``, visual tokens kept (layer mean, share); and the
    checks on ``atp_trained`` of ``trained_model`` (default: the run's only model)."""
    cells = {(c["model"], c["method"]): c for c in summary["cells"]}
    models = list(dict.fromkeys(c["model"] for c in summary["cells"]))
    base_model = base_model or models[0]
    trained_model = trained_model or base_model
    base = cells.get((base_model, "none"))
    base_acc = (base or {}).get("primary") or None  # relative accuracy is undefined without it
    rows = []
    for model in models:
        for method in METHODS:
            c = cells.get((model, method))
            if c is None:
                continue
            tokens_in = c.get("visual_tokens_in") or 0
            mean = c.get("visual_tokens_layer_mean")
            rows.append({
                "model": model, "method": method, "budget": c.get("budget"), "accuracy": c["primary"],
                "relative": None if base_acc is None else (c["primary"] or 0.0) / base_acc,
                "visual_tokens_in": tokens_in, "kept_layer_mean": mean,
                "kept_share": mean / tokens_in if mean is not None and tokens_in else None,
                "samples": c["samples"], "errors": c["errors"],
            })
    trained = next((r for r in rows if r["method"] == "atp_trained" and r["model"] == trained_model), None)
    checks = {}
    if trained is not None:
        acc = trained["accuracy"] or 0.0
        # the heads set their own budget (their training target): the comparison holds only if it is kept
        checks["within_budget"] = trained["kept_share"] is not None and trained["kept_share"] <= budget + BUDGET_SLACK
        if base_acc is not None:
            checks["keeps_98_percent_of_none"] = acc >= KEEP_GOAL * base_acc
        for method in dict.fromkeys(r["method"] for r in rows):
            if method not in ("none", "atp_trained"):
                best = max(r["accuracy"] or 0.0 for r in rows if r["method"] == method)
                checks[f"beats_{method}"] = acc > best
    return rows, checks


def plot_kept_by_content(run_dir: Path, methods: tuple[str, ...] = ("atp_trained", "atp")) -> Path | None:
    """``atp_kept_by_objects.png``: per instance, the visual tokens ATP kept (mean over the LLM's layers),
    grouped by how many objects the scene holds, one panel per model: whether busier scenes keep more."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tokenreduce.eval.runner import read_records

    groups: dict[tuple[str, str], dict[int, list[float]]] = {}
    for rec in read_records(run_dir).values():
        objects = (rec.get("fields") or {}).get("objects")
        if rec.get("method") in methods and objects is not None and rec.get("visual_tokens_layer_mean") is not None:
            by_count = groups.setdefault((rec["model"], rec["method"]), {})
            by_count.setdefault(objects, []).append(rec["visual_tokens_layer_mean"])
    if not groups:
        return None
    models = sorted({m for m, _ in groups})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), dpi=110, squeeze=False)
    for ax, model in zip(axes[0], models):
        for i, method in enumerate(methods):
            by_count = groups.get((model, method))
            if not by_count:
                continue
            counts = sorted(by_count)
            ax.boxplot([by_count[c] for c in counts], positions=[c + (i - 0.5) * 0.35 for c in counts], widths=0.3,
                       patch_artist=True, boxprops={"facecolor": f"C{i}", "alpha": 0.5}, manage_ticks=False)
            ax.plot([], [], color=f"C{i}", linewidth=8, alpha=0.5, label=method)
        ax.set_xlabel("objects in the scene")
        ax.set_ylabel("visual tokens kept per instance (mean over LLM layers)")
        ax.set_title(model)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(run_dir) / "atp_kept_by_objects.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def format_rows(rows: list[dict]) -> str:
    head = "| model | method | budget | accuracy | rel. to none | visual tokens kept (layer mean) | kept share | n | errors |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = "-" if r["kept_share"] is None else f"{r['kept_share']:.3f}"
        mean = "-" if r["kept_layer_mean"] is None else f"{r['kept_layer_mean']:.1f} / {r['visual_tokens_in']:.0f}"
        budget = "-" if r["budget"] is None else f"{r['budget']:g}"
        relative = "-" if r["relative"] is None else f"{r['relative']:.3f}"
        lines.append(f"| {r['model']} | {r['method']} | {budget} | {r['accuracy']:.4f} | {relative} | {mean} | {share} | "
                     f"{r['samples']} | {r['errors']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="saved VLM + processor directory")
    parser.add_argument("--heads", default=None, help="trained ATP heads directory (without: no atp_trained)")
    parser.add_argument("--n", type=int, default=300, help="test samples (default 300)")
    parser.add_argument("--budget", type=float, default=0.25, help="visual tokens kept, averaged over the layers")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--atp-layers", type=int, nargs="+", default=[1, 2, 4],
                        help="training-free ATP's stages when no heads are given (default 1 2 4)")
    parser.add_argument("--atp-spatial-rates", type=float, nargs="+", default=[0.1, 0.05, 0.0],
                        help="training-free ATP's spatial rates when no heads are given (default 0.1 0.05 0)")
    parser.add_argument("--atp-threshold-rule", default="mean_std", choices=("mean_std", "quantile"),
                        help="training-free ATP's rule: mean_std (counts vary per instance; tends to keep a little "
                             "less than the budget) or quantile (a fixed share per stage)")
    parser.add_argument("--atp-cross", default="text", choices=("text", "all_text"),
                        help="training-free ATP's cross-modality queries: text (causal, the paper's) or all_text")
    parser.add_argument("--atp-score-layer", default="previous", choices=("previous", "current"),
                        help="training-free ATP's scoring attention: layer K-1's (the paper's) or layer K's own")
    parser.add_argument("--atp-self-weight", type=float, default=0.5,
                        help="training-free ATP's weight of self-modality importance (default 0.5)")
    parser.add_argument("--out", default="runs/atp-synthetic", help="run folder (records, table, plots)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from tokenreduce.eval.runner import ModelSpec, Runner
    from tokenreduce.eval.tasks import get_task

    register_trained_atp()
    methods = list(args.methods)
    stages = {"layers": tuple(args.atp_layers), "spatial_rates": tuple(args.atp_spatial_rates)}
    options: dict[str, dict] = {}
    if args.heads:
        stages = heads_stages(args.heads)
        if "atp_trained" in methods:
            options["atp_trained"] = {**stages, "heads": str(Path(args.heads).resolve())}
    elif "atp_trained" in methods:
        print("no --heads: atp_trained left out")
        methods.remove("atp_trained")
    if "atp" in methods:
        options["atp"] = {**stages, "threshold_rule": args.atp_threshold_rule, "cross": args.atp_cross,
                          "self_weight": args.atp_self_weight, "score_layer": args.atp_score_layer}
    print(f"ATP stages at layers {list(stages['layers'])}, spatial rates "
          f"{list(stages.get('spatial_rates', ()))} (ATP's defaults cannot reach {args.budget:.0%} on a shallow LLM)")

    out = Path(args.out)
    task = get_task("synthetic-image")
    models = [ModelSpec(Path(args.model).name or "model", path=str(args.model))]
    if args.heads and (Path(args.heads) / "config.json").is_file():  # heads trained with the LLM
        models.append(ModelSpec(Path(args.heads).resolve().name, path=str(args.heads)))
        print(f"{args.heads} holds the LLM tuned with the heads: every method runs on both models")
    runner = Runner(task, models, methods, [args.budget], name=out.name, out_dir=out.parent or ".",
                    split="test", limit=args.n, batch_size=args.batch_size, method_options=options,
                    progress=not args.quiet)
    summary = runner.run()
    print((runner.run_dir / "table.md").read_text())
    rows, checks = compare(summary, args.budget, models[0].name, models[-1].name)
    text = format_rows(rows)
    skipped = summary.get("skipped_cells") or {}
    if skipped:
        text += "\nMethods that cannot reach the budget (not run):\n" + "".join(f"- {k}: {v}\n" for k, v in skipped.items())
    if checks:
        text += "\n" + "".join(f"- {k}: {'yes' if v else 'NO'}\n" for k, v in checks.items())
    (runner.run_dir / "atp_comparison.md").write_text(text)
    (runner.run_dir / "atp_comparison.json").write_text(
        json.dumps({"budget": args.budget, "stages": {k: list(v) for k, v in stages.items()}, "rows": rows,
                    "checks": checks, "skipped": skipped}, indent=2) + "\n")
    print(text)
    plot_kept_by_content(runner.run_dir)
    print(f"records, table, plots, atp_kept_by_objects.png and atp_comparison.md in {runner.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
