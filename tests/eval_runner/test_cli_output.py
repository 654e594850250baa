"""What ``tokenreduce eval`` / ``show`` print and write, run as a user runs them (a real process) on the shipped
tiny image model: the nine-column table sorted by budget with one number format per column, every column in
``table.md`` and ``summary.json``, the files the docs promise, progress bars naming the cell, quiet library
bars, the thread count said, ``show --cell`` and ``--stats``. Numbers are recomputed from ``records.jsonl``,
never hard-coded (the shipped models are retrained from time to time)."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tokenreduce.eval.measure import choose_threads
from tokenreduce.eval.report import wilson_interval

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "assets" / "models" / "synthetic-llava-image"
METHODS = ("none", "pool", "fastv")
BUDGETS = ("0.5", "0.25")
LIMIT = 4


def tokenreduce(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "tokenreduce.cli", *args], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One eval run with progress bars on and no --threads (so the command picks and says them)."""
    out = tmp_path_factory.mktemp("cli-output")
    result = tokenreduce("eval", "--task", "synthetic-image", "--model", f"tiny={MODEL}", "--methods", *METHODS,
                         "--budgets", *BUDGETS, "--limit", str(LIMIT), "--batch-size", "2", "--keep-maps", "1",
                         "--warmup", "0", "--out", str(out), "--name", "grid", cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = out / "grid"
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    return result, run_dir, records


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the first markdown table in ``text``, as stripped cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_the_printed_table_has_nine_columns_sorted_by_budget_one_format_each(run):
    result, _, _ = run
    out = result.stdout
    header = next(line for line in out.splitlines() if line.startswith("| method |"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "method", "budget", "tokens (layer mean)", "FLOPs ratio", "accuracy [95% CI, Wilson]", "vs full",
        "prefill speedup", "n", "errors"]
    rows = table_rows(out)
    assert rows[0][0] == "none" and len(rows) == 1 + (len(METHODS) - 1) * len(BUDGETS)
    budgets = [r[1] for r in rows]
    assert budgets == ["full", *sorted(budgets[1:], key=lambda b: float(b.rstrip("%")))]  # by budget
    formats = [r"[a-z_]+", r"full|\d+%", r"\d+\.\d \(\d+%\)( MISSED)?", r"\d\.\d\d",
               r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", r"[+-]\d\.\d{3}", r"\d+\.\d\dx", r"\d+", r"\d+"]
    for row in rows:
        for cell, pattern in zip(row, formats, strict=True):
            assert re.fullmatch(pattern, cell), (cell, pattern, row)
    assert "**tiny**" in out and "every column:" in out


def test_intervals_changes_and_speedups_follow_the_records(run):
    """Recomputed here from the records: Wilson's interval of the exact-match scores, the change from the
    full model's accuracy, and the ratio of the median times to first token."""
    _, run_dir, records = run
    summary = json.loads((run_dir / "summary.json").read_text())
    cells: dict[tuple, list[dict]] = {}
    for r in records:
        cells.setdefault((r["method"], r["budget"]), []).append(r)
    full = cells[("none", None)]
    full_accuracy = sum(r["score"] for r in full) / len(full)
    full_ttft = statistics.median(r["ttft_ms"] for r in full)
    for cell in summary["cells"]:
        recs = cells[(cell["method"], cell["budget"])]
        scores = [r["score"] for r in recs]
        assert cell["primary_ci_method"] == "wilson"
        assert (cell["primary_ci_low"], cell["primary_ci_high"]) == pytest.approx(wilson_interval(sum(scores), len(scores)))
        assert cell["primary_ci_low"] <= cell["primary"] <= cell["primary_ci_high"]
        assert cell["delta_vs_none"] == pytest.approx(sum(scores) / len(scores) - full_accuracy)
        assert cell["prefill_speedup"] == pytest.approx(full_ttft / statistics.median(r["ttft_ms"] for r in recs))


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), Statistics in Medicine 17:857, table I: 81/263 -> 0.2553 to 0.3662; 15/148 -> 0.0624 to 0.1605
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)


def test_every_column_is_in_table_md_and_summary_json(run):
    result, run_dir, _ = run
    table = (run_dir / "table.md").read_text()
    short, _, full = table.partition("\n## All columns\n")
    assert table_rows(short) == table_rows(result.stdout)  # the printed table heads table.md
    head = next(line for line in full.splitlines() if line.startswith("| model |"))
    for column in ("accuracy", "95% CI", "vs full", "agree w/ none", "visual tokens in", "LLM input", "TokDense",
                   "out (deepest)", "layer mean", "FLOPs ratio", "TTFT ms (med)", "prefill speedup",
                   "decode ms/tok (med)", "reducer ms (med)", "peak MiB", "KV MiB", "n", "errors"):
        assert f"| {column} |" in head, column
    cell = json.loads((run_dir / "summary.json").read_text())["cells"][0]
    for key in ("primary", "primary_ci_low", "primary_ci_high", "primary_ci_method", "delta_vs_none",
                "prefill_speedup", "agreement_with_none", "visual_tokens_in", "visual_tokens_llm_input", "tokdense",
                "visual_tokens_out", "visual_tokens_layer_mean", "prefill_flops_ratio", "ttft_ms_median",
                "decode_ms_per_token_median", "reducer_ms_median", "peak_memory_bytes_max", "kv_cache_bytes_mean",
                "samples", "errors"):
        assert key in cell, key


def test_eval_writes_what_the_docs_say(run):
    """docs/evaluation.md: records.jsonl, summary.json, table.md, plots (accuracy and prefill time vs visual
    tokens) and kept-token overlays (one per reduced cell with --keep-maps 1)."""
    result, run_dir, records = run
    assert len(records) == LIMIT * (1 + (len(METHODS) - 1) * len(BUDGETS))
    for name in ("records.jsonl", "summary.json", "table.md", "accuracy_vs_tokens.png", "prefill_vs_tokens.png"):
        assert (run_dir / name).stat().st_size > 0, name
    overlays = sorted(p.name for p in (run_dir / "overlays").glob("*.png"))
    reduced = {(r["method"], r["budget"]) for r in records if r["method"] != "none"}
    assert len(overlays) == len(reduced) and all(p.startswith(("tiny_pool_", "tiny_fastv_")) for p in overlays)
    assert f"{len(overlays)} kept-token overlay(s) in {run_dir / 'overlays'}" in result.stdout
    doc = (ROOT / "docs" / "evaluation.md").read_text()
    assert "`runs/<name>/records.jsonl`" in doc and "writes `summary.json`, `table.md`, plots" in doc
    assert "and kept-token overlays" in doc


def test_progress_names_the_cell_libraries_stay_quiet_threads_are_said(run):
    result, _, _ = run
    err = result.stderr
    # the bar's description: "<run>: <model> <method>@<budget>" while a cell runs
    assert re.search(r"grid: tiny (pool|fastv)@0\.(5|25)", err), err[-2000:]
    assert "Loading weights" not in err
    assert re.search(r"tokenreduce eval: \d+ torch thread\(s\): \d+ core\(s\), load \d+\.\d, \d+ free; "
                     r"--threads N to choose", err), err[-2000:]


def test_choose_threads_leaves_busy_cores_alone():
    assert choose_threads(2, cores=2, load=1.6) == (1, "2 core(s), load 1.6, 1 free")
    assert choose_threads(2, cores=2, load=11.3)[0] == 1  # never 0
    assert choose_threads(16, cores=16, load=3.4)[0] == 13
    assert choose_threads(4, cores=16, load=0.0)[0] == 4  # never more than torch's own default


def test_show_cell_prints_only_that_cell_and_stats_is_a_table(run):
    _, run_dir, _ = run
    result = tokenreduce("show", str(run_dir), "--cell", "fastv", "--stats", cwd=run_dir)
    assert result.returncode == 0, result.stderr
    assert {r[0] for r in table_rows(result.stdout)} == {"fastv"}
    assert len(table_rows(result.stdout)) == len(BUDGETS)
    stats = result.stdout.split("| model | cell |", 1)[1]
    assert "{" not in stats and "| tiny | fastv@0.5 |" in stats and "| tiny | pool" not in stats
    assert "categories." in stats  # per-category scores flattened into columns
    result = tokenreduce("show", str(run_dir), "--cell", "fastv@0.5", cwd=run_dir)
    assert [r[:2] for r in table_rows(result.stdout)] == [["fastv", "50%"]]
    result = tokenreduce("show", str(run_dir), "--cell", "fastw", cwd=run_dir)
    assert result.returncode == 2 and "unknown cell 'fastw'; did you mean 'fastv'?" in result.stderr


def test_a_run_that_fails_before_any_record_leaves_no_folder(tmp_path):
    """A model folder transformers cannot load: the run fails, and no folder holding only run.json stays."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llava", "vision_config": {"model_type": "nope"}}))
    result = tokenreduce("eval", "--task", "synthetic-image", "--model", str(broken), "--methods", "none",
                         "--limit", "1", "--out", str(tmp_path / "runs"), "--name", "failed", "--quiet",
                         "--threads", "1", cwd=tmp_path)
    assert result.returncode != 0
    assert not (tmp_path / "runs" / "failed").exists()


def test_demo_writes_what_the_readme_says(tmp_path):
    """README, Demo: per family runs/demo-<family>/ holds records, summary.json, table.md, the accuracy and
    prefill-time plots and kept-token overlays; the checks' run goes to check/; the cells a method cannot
    reach are listed under the table; a family without a model is left out with the command that trains it;
    --resume keeps a previous run (without it the folder is replaced)."""
    models = tmp_path / "models"
    models.mkdir()
    (models / MODEL.name).symlink_to(MODEL, target_is_directory=True)  # the image family only
    args = ["demo", "--models", str(models), "--samples", "2", "--methods", "none", "random", "fastv", "--budgets",
            "0.1", "--quiet", "--out", "runs"]
    result = tokenreduce(*args, "--check-samples", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out, run = result.stdout, tmp_path / "runs" / "demo-image"
    assert "python -m research.synthetic.train document" in out and "python -m research.synthetic.train video" in out
    for name in ("records.jsonl", "summary.json", "table.md", "accuracy_vs_tokens.png", "prefill_vs_tokens.png"):
        assert (run / name).stat().st_size > 0, name
    assert sorted(p.name.split("_")[1] for p in (run / "overlays").glob("*.png")) == ["random"]  # fastv@0.1 skipped
    assert (run / "check" / "records.jsonl").is_file() and (run / "check" / "table.md").is_file()
    table = out.split("## demo-image", 1)[1]
    assert [r[:2] for r in table_rows(table)] == [["none", "full"], ["random", "10%"]]
    assert "Skipped cells:" in table and "fastv@0.1" in table.split("Skipped cells:", 1)[1]
    assert "benchmark checks (2 test samples" in out
    assert re.search(r"(PASS|FAIL)  synthetic-llava-image: full-token accuracy", out)

    (run / "marker").write_text("kept by --resume")
    result = tokenreduce(*args, "--check-samples", "0", "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "marker").is_file() and "benchmark checks (on the 2 samples above)" in result.stdout


def test_every_method_has_its_own_colour_and_marker_everywhere():
    from tokenreduce.core.registry import list_methods
    from tokenreduce.eval.report import method_style

    names = list_methods()
    styles = {m: method_style(m) for m in names}
    assert len({(s["color"], s["marker"]) for s in styles.values()}) == len(names)  # no two alike
    assert method_style("none") == {"color": "black", "marker": "*", "linestyle": "none"}
    assert all(s["color"] != "black" and s["marker"] != "*" for s in styles.values())
    # derived from the registry, not from the run: the same whatever else a run holds
    assert method_style("pool") == styles["pool"] and method_style("divprune+fastv") == method_style("divprune+fastv")


def test_the_runner_picks_threads_and_says_so(tmp_path, capsys):
    import torch

    from tokenreduce.eval.runner import ModelSpec, Runner
    from tokenreduce.eval.tasks import get_task

    task = get_task("synthetic-image")
    spec = ModelSpec("m", path=str(MODEL))
    with pytest.raises(ValueError, match=r"`threads` must be 'auto', None or an int >= 1, got 0"):
        Runner(task, [spec], ["none"], name="t", out_dir=tmp_path, threads=0)
    previous = torch.get_num_threads()
    try:
        runner = Runner(task, [spec], ["none"], name="t", out_dir=tmp_path, threads="auto", progress=False)
        runner._set_threads()
        expected = choose_threads(previous)[0]
        assert torch.get_num_threads() <= max(1, expected)
        assert re.search(r"run 't' uses \d+ torch thread\(s\) per process: \d+ core\(s\), load", capsys.readouterr().err)
        Runner(task, [spec], ["none"], name="t", out_dir=tmp_path, threads=1)._set_threads()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)


def test_a_metric_other_than_exact_match_gets_a_bootstrap_interval():
    """ANLS-like fractional scores: a percentile bootstrap of the task's own aggregate, reproducible, about as
    wide as the normal approximation's 2 x 1.96 standard errors."""
    from tokenreduce.eval.report import primary_interval
    from tokenreduce.eval.task import Task

    scores = [(i % 7) / 6 for i in range(120)]
    records = [{"score": s, "fields": {}} for s in scores]
    first, again = primary_interval(records, Task()), primary_interval(records, Task())
    assert first == again and first["primary_ci_method"] == "bootstrap"
    mean = sum(scores) / len(scores)
    se = statistics.pstdev(scores) / len(scores) ** 0.5
    assert first["primary_ci_low"] < mean < first["primary_ci_high"]
    assert first["primary_ci_high"] - first["primary_ci_low"] == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert primary_interval([{"score": None}], Task())["primary_ci_method"] is None  # nothing scored
