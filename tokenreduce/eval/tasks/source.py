"""Where a benchmark's rows come from: a hub dataset (id, config, split, revision) or a local directory.

Hub ids are not written in code. ``sources.json`` (next to this file) holds each task's repository
name, config, split and revision, and the namespace per kind (image/text sets moved to
``lmms-lab-encoder/*``, video sets to ``lmms-eval/*`` in 2026). A JSON or YAML file named by
``$TOKENREDUCE_DATASETS`` overrides any of it (deep-merged), and per-run options override that
(``path=``, ``revision=``, ``split=``, ``name=``, ``media_dir=``, ``namespace=``).

A local ``path`` is a ``.parquet`` / ``.jsonl`` file or a directory holding ``<split>.parquet`` /
``<split>.jsonl`` (also ``<name>/<split>.*`` or ``<name>.*``) in the hub schema, or a copy of the hub
repository itself (sharded ``<split>-00000-of-0000N.parquet`` files, read by ``datasets``); media cells
are inline ``{"bytes", "path"}`` structs or paths relative to the data file (or ``media_dir``).

With ``streaming=True`` (the tasks ask for it when a ``limit`` is given) a hub dataset or a hub-layout
folder is streamed, so only the rows taken are read, instead of downloading and preparing the whole
split first; local files are always read batch by batch. Image cells come undecoded (``{"bytes",
"path"}``): the task decodes each sample's own image when it builds the sample.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

SOURCES_FILE = Path(__file__).with_name("sources.json")
ENV_OVERRIDE = "TOKENREDUCE_DATASETS"
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
SOURCE_OPTIONS = ("path", "name", "split", "revision", "media_dir", "namespace", "repo", "images_name",
                  "images_split", "kind")


@dataclass(frozen=True)
class DataSource:
    """Resolved location of one task's rows."""

    task: str
    path: str
    split: str
    name: str | None = None
    revision: str | None = None
    media_dir: str | None = None
    images_name: str | None = None
    images_split: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def is_local(self) -> bool:
        return Path(self.path).expanduser().exists()

    def with_(self, **changes: Any) -> DataSource:
        return replace(self, **changes)


def _read_config_file(path: Path) -> dict:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@cache
def _defaults_cached(env_value: str | None) -> dict:
    config = json.loads(SOURCES_FILE.read_text())
    if env_value:
        path = Path(env_value).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"${ENV_OVERRIDE}={env_value!r} names no file")
        config = _merge(config, _read_config_file(path))
    return config


def source_config() -> dict:
    """The dataset table: ``sources.json`` merged with ``$TOKENREDUCE_DATASETS`` when set."""
    return _defaults_cached(os.environ.get(ENV_OVERRIDE))


def resolve_source(task: str, **overrides: Any) -> DataSource:
    """The data source of ``task`` after configuration and ``overrides`` (None values are ignored)."""
    config = source_config()
    tasks = config.get("tasks", {})
    if task not in tasks:
        raise ValueError(f"no dataset configured for task {task!r}; configured: {', '.join(sorted(tasks))}")
    unknown = sorted(set(overrides) - set(SOURCE_OPTIONS))
    if unknown:
        raise TypeError(f"unknown data option(s) {unknown} for task {task!r}; accepted: {', '.join(SOURCE_OPTIONS)}")
    entry = _merge(tasks[task], {k: v for k, v in overrides.items() if v is not None})
    path = entry.get("path")
    if not path:
        namespace = entry.get("namespace") or config.get("namespaces", {}).get(entry.get("kind", "image"))
        if not namespace or not entry.get("repo"):
            raise ValueError(f"task {task!r} has neither `path` nor `namespace` + `repo` configured")
        path = f"{namespace}/{entry['repo']}"
    return DataSource(
        task=task, path=str(path), split=str(entry.get("split") or "test"), name=entry.get("name"),
        revision=entry.get("revision"), media_dir=entry.get("media_dir"), images_name=entry.get("images_name"),
        images_split=entry.get("images_split"),
    )


Loader = Callable[..., Any]


def _default_loader(*args: Any, **kwargs: Any) -> Any:
    import datasets

    return datasets.load_dataset(*args, **kwargs)


def iter_rows(source: DataSource, loader: Loader | None = None, *, name: str | None = None,
              split: str | None = None, streaming: bool = False) -> Iterator[dict[str, Any]]:
    """Rows of ``source`` as dicts; ``name`` / ``split`` override the source's (e.g. a second config).

    Local files are read directly, batch by batch; hub ids and hub-layout folders go through
    ``loader(path, name, split=, revision=)`` (``datasets.load_dataset`` unless another loader is
    injected), with ``streaming=True`` added when asked, so that taking the first rows reads only those.
    """
    name = source.name if name is None else name
    split = source.split if split is None else split
    kwargs: dict[str, Any] = {"split": split}
    if source.is_local:
        path = Path(source.path).expanduser()
        try:
            data_file = local_file(path, split, name)
        except FileNotFoundError:
            if not _is_hub_layout(path):
                raise
            data_file = None
        if data_file is not None:
            yield from _iter_file(data_file)
            return
        target = str(path)
    else:
        target = source.path
        kwargs["revision"] = source.revision
    if streaming:
        kwargs["streaming"] = True
    dataset = _undecoded((loader or _default_loader)(target, name, **kwargs))
    for row in dataset:
        yield dict(row)


def _is_hub_layout(path: Path) -> bool:
    return path.is_dir() and any(path.rglob("*.parquet"))


def _undecoded(dataset: Any) -> Any:
    """The dataset with image cells left as ``{"bytes", "path"}``: each is decoded when its sample is built."""
    if hasattr(dataset, "decode") and hasattr(dataset, "n_shards"):  # a streamed datasets.IterableDataset
        return dataset.decode(False)
    features = getattr(dataset, "features", None) or {}
    for column, feature in features.items():
        if type(feature).__name__ == "Image" and getattr(feature, "decode", False):
            dataset = dataset.cast_column(column, type(feature)(decode=False))
    return dataset


def base_dir(source: DataSource, split: str | None = None, name: str | None = None) -> Path | None:
    """Directory media paths are relative to: ``media_dir`` if set, else the local data file's folder."""
    if source.media_dir:
        return Path(source.media_dir).expanduser()
    if source.is_local:
        path = Path(source.path).expanduser()
        try:
            return local_file(path, split or source.split, source.name if name is None else name).parent
        except FileNotFoundError:
            if _is_hub_layout(path):
                return path
            raise
    return None


def local_file(path: Path, split: str, name: str | None) -> Path:
    """The data file of ``split`` (and config ``name``) under a local ``path``."""
    if path.is_file():
        return path
    stems = [split] + ([f"{name}/{split}", name, f"{name}-{split}", f"{name}_{split}"] if name else [])
    for stem in stems:
        for suffix in DATA_SUFFIXES:
            candidate = path / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    files = [p for p in sorted(path.iterdir()) if p.suffix in DATA_SUFFIXES]
    if len(files) == 1 and name is None:
        return files[0]
    wanted = ", ".join(f"{s}{x}" for s in stems for x in (".parquet", ".jsonl"))
    raise FileNotFoundError(f"no data file for split {split!r}{f' (config {name!r})' if name else ''} in {path}; "
                            f"expected one of: {wanted}")


def _iter_file(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
            yield from batch.to_pylist()
    elif path.suffix == ".jsonl":
        with path.open() as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
    else:
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            data = data.get("data", data.get("rows", []))
        yield from data
