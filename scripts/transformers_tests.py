"""Put transformers' own shared model tests (``tests/test_modeling_common.py`` and its top-level siblings)
of the installed transformers version into a folder, for ``tests/transformers_suite``.

They come from the version's source distribution on the package index (the wheel has no tests), are
never copied into this repository, and are imported as the package ``hf_tests`` under ``DEST``. The
distribution holds the top-level test files only: the two modules ``test_modeling_common.py`` imports from
its subfolders (``exporters/test_export.py``, ``generation/test_utils.py``) get stand-in mixins without
tests (the generate paths are the project's own tests). Offline, it says why and leaves ``DEST`` without
the suite: those tests then skip with that reason.

Usage: ``python scripts/transformers_tests.py DEST``
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

STAND_INS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    \"\"\"Stand-in: the export tests are not in the sdist.\"\"\"\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    \"\"\"Stand-in: the generate tests are not in the sdist.\"\"\"\n",
}


def fetch(dest: Path) -> int:
    version = importlib.metadata.version("transformers")
    stamp = dest / "VERSION"
    if stamp.exists() and stamp.read_text().strip() == version:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
               f"transformers=={version}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("transformers-*.tar.gz"))
        if done.returncode or not archives:
            print(f"transformers {version} source distribution not downloaded ({done.stderr.strip()[-300:]}); "
                  "tests/transformers_suite will skip", file=sys.stderr)
            return 0
        package = dest / "hf_tests"
        shutil.rmtree(package, ignore_errors=True)
        package.mkdir(parents=True)
        prefix = f"transformers-{version}/tests/"
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                name = member.name[len(prefix):] if member.name.startswith(prefix) else ""
                if member.isfile() and name.endswith(".py") and "/" not in name:
                    (package / name).write_bytes(tar.extractfile(member).read())
    (package / "__init__.py").touch()
    for path, text in STAND_INS.items():
        (package / path).parent.mkdir(exist_ok=True)
        (package / path).parent.joinpath("__init__.py").touch()
        (package / path).write_text(text)
    stamp.write_text(version + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[-1])
    sys.exit(fetch(Path(sys.argv[1])))
