"""Checks on where a model comes from, made before transformers sees the string.

Transformers reads a missing local folder as a malformed hub id ("Repo id must be in the form ..."), and
without a network it retries a hub id for most of a minute before a long traceback. These checks answer
in one line, at once: a local path that does not exist is named as such, and a hub id that is neither in
the local cache nor reachable names the local alternative.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse


def looks_local(source: str) -> bool:
    """Whether ``source`` is meant as a local path rather than a hub id (``org/name`` or ``name``)."""
    return (source.startswith(("/", "./", "../", "~", ".\\")) or source in (".", "..") or "\\" in source
            or source.count("/") > 1 or os.path.exists(source))


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (offline mode set, or no connection within ``timeout`` s), else None."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as exc:
        return f"{url.hostname} cannot be reached ({type(exc).__name__})"
    return None


def check_model_source(source: str | os.PathLike, what: str = "model") -> None:
    """Raise a one-line error if ``source`` cannot be loaded: a local path that does not exist
    (:class:`FileNotFoundError`), or a hub id that is not in the local cache while the hub cannot be
    reached (:class:`OSError`)."""
    text = str(source)
    if looks_local(text):
        path = Path(text).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{what} {text!r}: local path {path.resolve()} does not exist")
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(text, "config.json")
    except ValueError:  # not a valid repo id either
        raise FileNotFoundError(f"{what} {text!r}: neither a local path that exists nor a hub id") from None
    if isinstance(cached, str):
        return
    reason = hub_unreachable()
    if reason:
        raise OSError(f"{what} {text!r} is not in the local Hugging Face cache and the hub cannot be used "
                      f"({reason}); give a local directory holding the model instead "
                      f"(e.g. `hf download {text} --local-dir DIR` on a connected machine)")


def dataset_cached(repo_id: str) -> bool:
    """Whether a hub dataset has been fetched before (the hub file cache or the datasets cache)."""
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}"
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    return hub.is_dir() or (datasets_cache / repo_id.replace("/", "___")).is_dir()


def check_dataset_source(source: str, what: str, local_hint: str) -> None:
    """Like :func:`check_model_source` for a dataset; ``local_hint`` says how to give a local copy
    (the CLI's ``--task-opt path=DIR``)."""
    if looks_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{what} {source!r}: local path {path.resolve()} does not exist")
        return
    if dataset_cached(source):
        return
    reason = hub_unreachable()
    if reason:
        raise OSError(f"{what}: dataset {source!r} is not in the local cache and the hub cannot be used ({reason}); "
                      f"give a local copy with {local_hint}")
