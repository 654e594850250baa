"""The README's first Python example runs as written, on a shipped tiny model, from another folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def first_python_block(markdown: str) -> str:
    match = re.search(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)
    assert match, "the README has no ```python block"
    return match.group(1)


def test_readme_example_is_the_quickstart_file():
    assert first_python_block((ROOT / "README.md").read_text()) == (ROOT / "examples" / "quickstart.py").read_text()


def test_readme_example_runs(tmp_path):
    script = tmp_path / "readme_example.py"
    script.write_text(first_python_block((ROOT / "README.md").read_text()))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Stats("))
    question, stats = lines[start - 1], "\n".join(lines[start:])
    assert re.fullmatch(r".+\? -> \S.* \(expected \S.*\)", question), question
    # `pool` at 25 % of the image model's 16 x 16 patch grid: an 8 x 8 grid.
    assert "samples=1" in stats and "256.0 -> 64.0 (25.0%)" in stats, stats
    assert "prefill FLOPs ratio" in stats and "reducer time" in stats, stats
