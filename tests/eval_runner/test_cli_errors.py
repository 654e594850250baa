"""The ``tokenreduce`` command as a user runs it (a real process): one-line errors, exit codes, interrupt and
resume, path checks before transformers or datasets see a path."""

from __future__ import annotations

import os
import subprocess
import sys
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
