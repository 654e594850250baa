"""The ``tokenreduce`` command as a user runs it (a real process): one-line errors, exit codes, interrupt and
resume, path checks before transformers or datasets see a path."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def tokenreduce(*args: str, cwd: Path, env: dict[str, str] | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m tokenreduce.cli ARGS`` in ``cwd``, never reaching the hub."""
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tokenreduce.cli", *args], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=timeout)


def one_line(result: subprocess.CompletedProcess) -> str:
    """The process's stderr, asserted to be exactly one line without a traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["--methods", "none", "pol"], "unknown method 'pol'; did you mean 'pool'?"),
    (["--methods", "pool", "--method-opt", "pool.kep=3"], "unknown pool option 'kep'; did you mean 'keep'?"),
    (["--methods", "pool", "--method-opt", "pool.keep=3"], "multiple values for keyword argument 'keep'"),
    (["--methods", "pool", "--task", "synthetic-imag"], "unknown task 'synthetic-imag'; did you mean 'synthetic-image'?"),
], ids=["method", "option", "option-clash", "task"])
def test_a_bad_name_fails_in_one_line_before_any_cell_runs(synthetic_models, tmp_path, args, expected):
    model = synthetic_models / "synthetic-llava-image"
    result = tokenreduce("eval", "--task", "synthetic-image", "--model", str(model), "--limit", "1", "--out",
                         str(tmp_path / "runs"), "--quiet", *args, cwd=tmp_path)
    assert result.returncode == 2
    line = one_line(result)
    assert line.startswith("tokenreduce eval: ") and expected in line
    assert not (tmp_path / "runs").exists()  # nothing ran, no run folder left behind


def test_a_run_whose_every_cell_is_skipped_exits_non_zero(synthetic_models, tmp_path):
    model = synthetic_models / "synthetic-llava-image"  # 6 decoder layers: fastv's layer 99 is out of reach
    result = tokenreduce("eval", "--task", "synthetic-image", "--model", f"tiny={model}", "--limit", "1",
                         "--methods", "fastv", "--budgets", "0.5", "--method-opt", "fastv.layer=99", "--out",
                         str(tmp_path), "--name", "skipped", "--quiet", "--no-plots", "--threads", "1", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "nothing evaluated: all 1 cell(s) were skipped" in result.stderr
    assert "`layer` must be in [1, 5]" in result.stdout


def _keys(path: Path) -> set[str]:
    keys = set()
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError, KeyError):  # a line cut short by the interrupt
            keys.add(json.loads(line)["key"])
    return keys


def test_ctrl_c_saves_and_names_the_resume_command_then_a_changed_rerun_is_refused(synthetic_models, tmp_path):
    model = synthetic_models / "synthetic-llava-image"
    args = ["eval", "--task", "synthetic-image", "--model", f"tiny={model}", "--limit", "12", "--methods", "none",
            "pool", "--budgets", "0.5", "--batch-size", "1", "--out", str(tmp_path), "--name", "ctrl-c", "--quiet",
            "--no-plots", "--threads", "1"]
    records = tmp_path / "ctrl-c" / "records.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "tokenreduce.cli", *args], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 240
    while not (records.exists() and len(_keys(records)) >= 2) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    saved = _keys(records)
    assert 2 <= len(saved) < 24 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("tokenreduce")]
    assert len(lines) == 1 and lines[0] == (
        f"tokenreduce eval: interrupted; {len(saved)} record(s) saved in {tmp_path / 'ctrl-c'}; resume with: "
        f"{shlex.join(['tokenreduce', *args])}")

    resume = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert resume[0] == "tokenreduce"
    result = tokenreduce(*resume[1:], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"tokenreduce eval: resuming {tmp_path / 'ctrl-c'}: {len(saved)} record(s) found" in result.stderr
    assert len(_keys(records)) == 24 and saved <= _keys(records)

    changed = [*args[:6], "2", *args[7:]]  # --limit 2: rows would mean n=2 beside n=12
    result = tokenreduce(*changed, cwd=tmp_path)
    assert result.returncode == 2
    assert one_line(result) == (f"tokenreduce eval: {tmp_path / 'ctrl-c'} holds a run with other settings (limit 12 -> 2); "
                                "give another --name, or --overwrite to start it afresh")
    assert len(_keys(records)) == 24  # untouched
    result = tokenreduce(*changed, "--overwrite", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(_keys(records)) == 4 and json.loads((tmp_path / "ctrl-c" / "run.json").read_text())["limit"] == 2


def test_a_missing_local_model_path_is_named_before_transformers_sees_it(synthetic_models, tmp_path):
    code = "import tokenreduce as tr; tr.from_pretrained('assets/models/does-not-exist', 'pool')"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1 and "Repo id" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"FileNotFoundError: model_id_or_dir 'assets/models/does-not-exist': local path "
        f"{tmp_path / 'assets/models/does-not-exist'} does not exist")

    result = tokenreduce("eval", "--task", "synthetic-image", "--model", "./missing", "--methods", "none",
                         "--out", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 2
    assert one_line(result) == f"tokenreduce eval: --model './missing': local path {tmp_path / 'missing'} does not exist"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("env, reason", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, "127.0.0.1 cannot be reached (ConnectionRefusedError)"),
], ids=["offline", "unreachable"])
def test_without_a_network_a_hub_id_fails_at_once_naming_the_local_alternative(synthetic_models, tmp_path, env, reason):
    env = {**env, "HF_HOME": str(tmp_path / "hf-home")}  # an empty cache: nothing was fetched before
    result = tokenreduce("eval", "--task", "synthetic-image", "--model", "llava-hf/llava-1.5-7b-hf", "--methods",
                         "none", "--out", str(tmp_path / "runs"), cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert one_line(result) == (
        f"tokenreduce eval: --model 'llava-hf/llava-1.5-7b-hf' is not in the local Hugging Face cache and the hub "
        f"cannot be used ({reason}); give a local directory holding the model instead "
        "(e.g. `hf download llava-hf/llava-1.5-7b-hf --local-dir DIR` on a connected machine)")

    model = synthetic_models / "synthetic-llava-image"
    result = tokenreduce("eval", "--task", "docvqa", "--model", str(model), "--methods", "none", "--limit", "1",
                         "--out", str(tmp_path / "runs"), cwd=tmp_path, env=env)
    assert result.returncode == 2
    line = one_line(result)
    assert line.startswith("tokenreduce eval: task 'docvqa': dataset ") and f"({reason})" in line
    assert line.endswith("give a local copy with --task-opt path=DIR (a local parquet/jsonl folder or a copy of "
                         "the hub repository)")
    assert not (tmp_path / "runs").exists()


def test_the_hub_check_gives_up_within_seconds(monkeypatch):
    from huggingface_hub import constants

    from tokenreduce.sources import check_model_source

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(OSError, match=r"^model 'org/never-fetched' is not in the local Hugging Face cache"):
        check_model_source("org/never-fetched")
    assert time.monotonic() - start < 10


def test_help_lists_the_tasks_explains_every_option_and_shows_no_rst_markup(tmp_path):
    import argparse

    from tokenreduce.cli import build_parser
    from tokenreduce.eval.tasks import list_tasks

    top = tokenreduce("--help", cwd=tmp_path)
    evaluate = tokenreduce("eval", "--help", cwd=tmp_path, env={"COLUMNS": "1000"})  # argparse wraps no line
    assert top.returncode == evaluate.returncode == 0
    assert "tokenreduce eval --task docvqa" in top.stdout
    assert "``" not in top.stdout and "``" not in evaluate.stdout
    flat = " ".join(evaluate.stdout.split())
    assert all(name in flat for name in list_tasks()) and "synthetic-video" in flat
    assert "--split SPLIT dataset split to evaluate" in flat
    assert "--batch-size BATCH_SIZE samples per generate call" in flat
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in sub.choices.items():
        bare = [a.option_strings or a.dest for a in parser._actions if not a.help]
        assert not bare, f"`tokenreduce {command}` options without help: {bare}"
