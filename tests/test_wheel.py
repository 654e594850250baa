"""The wheel runs its own demo: built from this checkout, installed into a bare folder, run elsewhere.

The wheel is built with the environment's hatchling (no build isolation: nothing is downloaded),
installed with ``pip install --no-deps --target`` into a temporary folder, and ``tokenreduce demo`` runs
from another temporary folder with only that folder on ``PYTHONPATH``: the repository is not on the path,
so the shipped tiny models and trained modules must come from the package data (``tokenreduce/_assets``).
The demo runs 2 samples per family at one budget: about 25 s of CPU, 70 s of wall time on 2 shared cores
(180 s inside the whole suite), hence ``slow``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    pytest.importorskip("hatchling", reason="building the wheel needs hatchling: pip install -e '.[dev]'")
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = dist.glob("tokenreduce-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    shipped = {p.relative_to(ROOT / "assets").as_posix() for p in (ROOT / "assets").rglob("*") if p.is_file()}
    assert shipped and {f"tokenreduce/_assets/{p}" for p in shipped} <= set(names)
    # Research code, tests and benchmarks stay out of the wheel.
    assert not [n for n in names if n.split("/")[0] in {"research", "tests", "benchmarks", "scripts"}]
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        check=True, capture_output=True, text=True,
    )
    return target


def _env(target: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "TOKENREDUCE_SYNTHETIC_MODELS"}}
    env["PYTHONPATH"] = str(target)
    return env


def test_installed_package_finds_its_assets_outside_the_checkout(installed, tmp_path):
    code = "import tokenreduce, tokenreduce.assets as a; print(tokenreduce.__file__); print(a.assets_dir())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(installed),
                         check=True, capture_output=True, text=True).stdout.split()
    assert Path(out[0]).is_relative_to(installed)
    assert Path(out[1]) == installed / "tokenreduce" / "_assets"


@pytest.mark.slow
def test_installed_wheel_runs_the_demo(installed, tmp_path):
    script = installed / "bin" / "tokenreduce"
    command = [sys.executable, str(script)] if script.is_file() else [sys.executable, "-m", "tokenreduce.cli"]
    result = subprocess.run(
        [*command, "demo", "--samples", "2", "--check-samples", "0", "--budgets", "0.25", "--quiet", "--out", "runs"],
        cwd=tmp_path, env=_env(installed), capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    sections = {}
    for name in ("synthetic-llava-image", "synthetic-onevision-document", "synthetic-onevision-video"):
        sections[name] = out.split(f"**{name}**", 1)[1].split("\n\n##", 1)[0]
        assert "| none | full |" in sections[name] and "| pool | 25% |" in sections[name]
    # LangDC's shipped captioner is found next to the packaged video model and runs (its caption tokens come on
    # top of the base budget, so the table may flag the cell's budget as missed).
    assert "| langdc | 25% |" in sections["synthetic-onevision-video"]
    for family in ("image", "document", "video"):
        assert (tmp_path / "runs" / f"demo-{family}" / "table.md").is_file()
