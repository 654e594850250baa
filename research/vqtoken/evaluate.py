"""The VQToken table on the synthetic video benchmark: one evaluation-runner run, plus adaptive K.

One :class:`~tokenreduce.eval.runner.Runner` grid on the test split of the synthetic video benchmark, with
the shipped OneVision video model. Every reducing method runs at the same budget:

* ``none``: the full 577 visual tokens;
* ``vqtoken``: the codebook with trained VQ-attention (``--attention``);
* ``vqtoken_codebook``: the codebook only, the paper's ablation;
* ``random``: a seeded random subset;
* ``pool``: per-frame average pooling, which keeps at least one token per frame and so cannot go below
  16 + 1 tokens on 16 frames;
* ``tome_projector``: ToMe's bipartite soft matching on the projected tokens, across the whole video, down
  to the same count (``tome`` proper merges inside the tower and does not support OneVision's pooled
  video grids; per frame it could not go below one token per frame either).

The default budget ``5/577`` (0.87%) gives 5 code tokens per video; ``random`` and ``tome_projector``
keep 5 too.
Afterwards, adaptive-length mode (elbow and silhouette, ``K`` in ``[k_min, k_max]``) runs on the same
samples outside the grid: its token count varies per video, so it has no budget cell. The runner's
``summary.json`` / ``table.md`` report accuracy and TokDense per cell. This script adds ``vqtoken.md`` /
``vqtoken.json`` with accuracy relative to full tokens and the acceptance checks::

    python -m research.vqtoken.evaluate --attention runs/vqattn --limit 1000
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tokenreduce.eval.report import tokdense

DEFAULT_BUDGET = 5 / 577
METHODS = ("none", "vqtoken", "vqtoken_codebook", "random", "pool", "tome_projector")


def adaptive_rows(
    model_factory: Callable[[], tuple[Any, Any]],
    task,
    split: str | None,
    limit: int | None,
    modes: Sequence[dict[str, Any]],
    batch_size: int,
) -> list[dict[str, Any]]:
    """Accuracy, mean code tokens and TokDense of ``vqtoken`` in each of ``modes`` (config options)."""
    import tokenreduce as tr
    from tokenreduce.eval.runner import generate_batch
    from tokenreduce.eval.task import collate

    model, processor = model_factory()
    samples = list(task.samples(split, limit))
    pad = processor.tokenizer.pad_token_id or 0
    rows = []
    for options in modes:
        name = options.pop("label")
        scores, tokens, ks = [], [], []
        tr.wrap(model, "vqtoken", **options)
        try:
            for start in range(0, len(samples), batch_size):
                chunk = samples[start : start + batch_size]
                inputs = collate([task.encode(s, processor, model.config.model_type) for s in chunk], pad)
                result = generate_batch(model, processor, inputs, task.max_new_tokens)
                for s, text, stats in zip(chunk, result.texts, result.stats):
                    scores.append(task.score(task.parse(text, s), s))
                    tokens.append(stats.visual_tokens_llm_input)
                    ks.extend(it.info.get("num_codes", 0) for it in stats.items if it.modality == "video")
        finally:
            tr.unwrap(model)
        accuracy = sum(scores) / max(1, len(scores))
        mean_tokens = sum(tokens) / max(1, len(tokens))
        rows.append(
            {
                "method": name,
                "options": options,
                "primary": accuracy,
                "visual_tokens_llm_input": mean_tokens,
                "tokdense": tokdense(accuracy, mean_tokens),
                "codes_min": min(ks, default=None),
                "codes_max": max(ks, default=None),
                "samples": len(scores),
            }
        )
    return rows


def vqtoken_table(
    summary: dict[str, Any], adaptive: Sequence[dict[str, Any]], budget: float, llm_rank: int = 0
) -> tuple[str, dict]:
    """Markdown table and JSON of accuracy, relative accuracy, tokens and TokDense, with the acceptance
    checks. ``llm_rank``: rank of the LLM adapters the trained module carries (said under the table, since
    then only the ``vqtoken`` row reads an adapted LLM)."""
    cells = {c["method"]: c for c in summary["cells"]}
    full = cells.get("none", {}).get("primary")
    lines = [
        "| method | budget | visual tokens at LLM | share of full tokens | accuracy | vs full | TokDense |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = []
    for method in METHODS:
        if method not in cells:
            continue
        c = cells[method]
        rows.append(
            {
                "method": method,
                "budget": c["budget"],
                "tokens": c["visual_tokens_llm_input"],
                "share": (c["visual_tokens_llm_input"] or 0) / c["visual_tokens_in"]
                if c["visual_tokens_in"]
                else None,
                "accuracy": c["primary"],
                "relative": c["primary"] / full if full else None,
                "tokdense": c["tokdense"],
            }
        )
    for a in adaptive:
        rows.append(
            {
                "method": a["method"],
                "budget": None,
                "tokens": a["visual_tokens_llm_input"],
                "share": None,
                "accuracy": a["primary"],
                "relative": a["primary"] / full if full else None,
                "tokdense": a["tokdense"],
                "codes_range": [a["codes_min"], a["codes_max"]],
            }
        )
    in_tokens = cells.get("none", {}).get("visual_tokens_in")
    for r in rows:
        if r["share"] is None and in_tokens and r["tokens"] is not None:
            r["share"] = r["tokens"] / in_tokens

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    for r in rows:
        lines.append(
            f"| {r['method']} | {f(r['budget'], '.4g')} | {f(r['tokens'], '.2f')} | {f(r['share'], '.2%')} | "
            f"{f(r['accuracy'], '.3f')} | {f(r['relative'], '.1%')} | {f(r['tokdense'], '.3g')} |"
        )
    skipped = summary.get("skipped_cells") or {}
    if skipped:
        lines += ["", "Skipped by the runner:"] + [f"- {k}: {v}" for k, v in sorted(skipped.items())]
    vq = cells.get("vqtoken")
    checks = {}
    if vq and full:
        checks["vqtoken_at_most_1pct_tokens"] = vq["visual_tokens_llm_input"] <= 0.01 * vq["visual_tokens_in"]
        checks["vqtoken_at_least_95pct_of_full"] = vq["primary"] >= 0.95 * full
        for other in ("random", "pool", "tome_projector", "vqtoken_codebook"):
            if other in cells:
                checks[f"vqtoken_ahead_of_{other}"] = vq["primary"] > cells[other]["primary"]
    if llm_rank:
        lines += [
            "",
            f"The `vqtoken` row reads the LLM with the rank-{llm_rank} adapters trained with its "
            "VQ-attention (added while wrapped); every other row reads the unchanged LLM.",
        ]
    lines += [
        "",
        f"Budget {budget:.4g} of the visual tokens per reducing cell. Checks: "
        + ", ".join(f"{k}={v}" for k, v in checks.items()),
    ]
    return "\n".join(lines) + "\n", {"rows": rows, "checks": checks, "full_accuracy": full}


def evaluate(
    model_factory: Callable[[], tuple[Any, Any]],
    task,
    *,
    attention: str | None,
    budget: float = DEFAULT_BUDGET,
    name: str = "vqtoken-synthetic-video",
    out_dir: str | Path = "runs",
    split: str | None = "test",
    limit: int | None = 1000,
    batch_size: int = 16,
    method_options: dict[str, Any] | None = None,
    adaptive: Sequence[dict[str, Any]] = (),
    methods: Sequence[str] = METHODS,
    model_name: str = "model",
    progress: bool = True,
) -> dict[str, Any]:
    """Run the grid and the adaptive modes; write ``vqtoken.md`` / ``vqtoken.json`` next to the runner's
    files."""
    from tokenreduce.eval.runner import ModelSpec, Runner

    options = dict(method_options or {})
    per_method: dict[str, dict[str, Any]] = {}
    if "vqtoken" in methods:
        if attention is None:
            raise ValueError("`attention` is required to evaluate method 'vqtoken' (trained VQ-attention)")
        per_method["vqtoken"] = {**options, "attention": attention}
    if "vqtoken_codebook" in methods:
        per_method["vqtoken_codebook"] = dict(options)
    if "random" in methods:
        per_method["random"] = {"seed": 0}
    runner = Runner(
        task,
        [ModelSpec(model_name, factory=model_factory)],
        list(methods),
        [budget],
        name=name,
        out_dir=out_dir,
        split=split,
        limit=limit,
        batch_size=batch_size,
        method_options=per_method,
        keep_maps=2,
        progress=progress,
    )
    summary = runner.run()
    modes = [dict(m) for m in adaptive]
    for m in modes:
        if m.pop("with_attention", False):
            m["attention"] = attention
        m.setdefault("label", f"vqtoken adaptive {m.get('adaptive', 'elbow')}")
        for k, v in options.items():
            m.setdefault(k, v)
    rows = adaptive_rows(model_factory, task, split, limit, modes, batch_size) if modes else []
    llm_rank = 0
    if "vqtoken" in methods:
        from tokenreduce.plugins.vqtoken.attention import VQAttention

        llm_rank = VQAttention.from_pretrained(attention).config.llm_rank
    table, data = vqtoken_table(summary, rows, budget, llm_rank)
    run_dir = Path(out_dir) / name
    (run_dir / "vqtoken.md").write_text(table)
    (run_dir / "vqtoken.json").write_text(
        json.dumps(
            {
                **data,
                "budget": budget,
                "attention": attention,
                "llm_rank": llm_rank,
                "method_options": options,
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    return {"summary": summary, "table": table, **data}


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - exercised through the CLI
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--attention", required=True, help="trained VQ-attention (directory or hub repo id)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--name", default="vqtoken-synthetic-video")
    parser.add_argument("--out-dir", default="runs")
    parser.add_argument("--anchor", default=None)
    parser.add_argument("--codeword", default=None)
    parser.add_argument("--keep-newline", action="store_true")
    parser.add_argument("--k-min", type=int, default=2)
    parser.add_argument("--k-max", type=int, default=16)
    parser.add_argument("--no-adaptive", action="store_true")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tokenreduce.eval.synthetic import load_model
    from tokenreduce.eval.tasks import get_task

    options: dict[str, Any] = {}
    if args.anchor:
        options["anchor"] = args.anchor
    if args.codeword:
        options["codeword"] = args.codeword
    if args.keep_newline:
        options["keep_newline"] = True
    adaptive = (
        []
        if args.no_adaptive
        else [
            {
                "adaptive": a,
                "k_min": args.k_min,
                "k_max": args.k_max,
                "label": f"vqtoken_codebook adaptive {a}",
            }
            for a in ("elbow", "silhouette")
        ]
    )
    result = evaluate(
        lambda: load_model("video"),
        get_task("synthetic-video", split=args.split),
        attention=args.attention,
        budget=args.budget,
        name=args.name,
        out_dir=args.out_dir,
        split=args.split,
        limit=args.limit,
        batch_size=args.batch_size,
        method_options=options,
        adaptive=adaptive,
        model_name="synthetic-onevision-video",
    )
    print(result["table"])
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
