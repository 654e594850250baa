"""Where the shipped tiny models and trained modules are: in the installed package or in the checkout.

The wheel carries the repository's ``assets/`` folder as ``tokenreduce/_assets`` (package data), so an
installed ``tokenreduce demo`` needs no download; a checkout (and an editable install) reads ``assets/``
at the repository root.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def assets_dir() -> Path:
    """``tokenreduce/_assets`` when the package was installed from the wheel, else the checkout's ``assets/``.

    The checkout's folder is returned even when it does not exist, so that a missing model is reported
    with its expected path.
    """
    packaged = _PACKAGE / "_assets"
    return packaged if packaged.is_dir() else _PACKAGE.parent / "assets"
