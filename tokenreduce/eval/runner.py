"""The evaluation runner: every model x method x budget over a task's samples, one JSON line per sample.

    from tokenreduce.eval.runner import ModelSpec, run_grid
    summary = run_grid(task, [ModelSpec("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf")],
                       methods=["none", "pool", "fastv"], budgets=[0.25, 0.5], name="vqav2-small", limit=200)

Samples are read once, in batches; each batch goes through every pending (method, budget) cell of the
model, so an interrupted run leaves every cell with (almost) the same samples. ``runs/<name>/records.jsonl``
gets one line per sample as soon as its batch finishes: prediction, score, visual tokens in/out (per
layer for in-LLM methods), reducer time, time to first token, decode ms/token, peak memory, KV-cache
bytes and analytic prefill FLOPs. Re-running the same command resumes: finished (model, method,
budget, sample) keys are skipped, and a key is counted once even if it was written twice. A sample whose
media cannot be read, or whose generation fails, is recorded with its error and the run goes on.

Under ``accelerate launch --multi_gpu --num_processes N`` (or ``torchrun --nproc_per_node N``) rank ``r``
takes samples ``r, r+N, ...`` and writes ``records.rank<r>.jsonl``; rank 0 waits for the others, merges
the files and writes the summary. Without GPUs the processes join a gloo group on the CPU (accelerate's
``--cpu`` flag alone starts a single process, so keep ``--multi_gpu`` there too). A model too large for
one GPU loads with ``device_map="auto"`` in a single process instead.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import tokenreduce as tr
from tokenreduce.adapters import get_adapter
from tokenreduce.core.api import get_handle
from tokenreduce.core.config import MethodConfig
from tokenreduce.core.flops import Geometry
from tokenreduce.core.parts import reuse_loaded_parts
from tokenreduce.core.registry import get_method
from tokenreduce.core.stack import is_stack_name, order_members, split_name, stack_config
from tokenreduce.core.stats import ItemStats, SampleStats
from tokenreduce.eval.measure import (
    BatchTiming,
    StepClock,
    cache_bytes,
    choose_threads,
    kv_bytes_per_token,
    peak_memory,
    reset_peak_memory,
)
from tokenreduce.eval.overlay import fit_for, layout_to_dict
from tokenreduce.eval.records import read_records
from tokenreduce.eval.report import write_reports
from tokenreduce.eval.sample import Sample
from tokenreduce.eval.task import Task, collate
from tokenreduce.sources import check_model_source

BASELINE = "none"
RECORDS = "records.jsonl"


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """A model of the grid: a hub id / local directory, or a ``factory`` returning ``(model, processor)``.

    ``device_map="auto"`` spreads a large model over the visible GPUs (accelerate); otherwise the model
    goes to ``device`` (default: this process's GPU when there is one, else the CPU).
    """

    name: str
    path: str | None = None
    factory: Callable[[], tuple[Any, Any]] | None = None
    dtype: str | None = None
    device: str | None = None
    device_map: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.path is None) == (self.factory is None):
            raise ValueError(f"model {self.name!r}: give exactly one of `path` (hub id or directory) and `factory`")

    def load(self, local_rank: int = 0) -> tuple[Any, Any]:
        """``(model, processor)`` in eval mode, on this process's device, tokenizer padding on the left."""
        if self.dtype is not None and self.dtype != "auto" and not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"model {self.name!r}: `dtype` must be a torch dtype name such as 'bfloat16' or 'auto', "
                             f"got {self.dtype!r}")
        if self.factory is not None:
            model, processor = self.factory()
            if self.dtype and self.dtype != "auto":
                model.to(getattr(torch, self.dtype))
        else:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            check_model_source(self.path, f"model {self.name!r}: path")
            kwargs = dict(self.model_kwargs)
            if self.dtype:
                kwargs["dtype"] = "auto" if self.dtype == "auto" else getattr(torch, self.dtype)
            if self.device_map:
                kwargs["device_map"] = self.device_map
            model = AutoModelForImageTextToText.from_pretrained(self.path, **kwargs)
            processor = AutoProcessor.from_pretrained(self.path)
        if not self.device_map:
            model.to(self.resolve_device(local_rank))
        tokenizer = getattr(processor, "tokenizer", processor)
        tokenizer.padding_side = "left"
        return model.eval(), processor

    def resolve_device(self, local_rank: int = 0) -> torch.device:
        if self.device:
            return torch.device(self.device)
        if torch.cuda.is_available():
            return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
        return torch.device("cpu")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "dtype": self.dtype, "device_map": self.device_map}


# ----------------------------------------------------------------------------------------------------
# Cells: (method, budget)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    method: str
    budget: float | None

    @property
    def label(self) -> str:
        return self.method if self.budget is None else f"{self.method}@{self.budget:g}"


def make_cells(methods: Sequence[str], budgets: Sequence[float]) -> list[Cell]:
    """The grid's cells; ``"none"`` (the unreduced model) appears once, without a budget."""
    if not methods:
        raise ValueError("`methods` is empty; give method names (see tokenreduce.list_methods()) and/or 'none'")
    cells = []
    for m in methods:
        if m == BASELINE:
            cells.append(Cell(BASELINE, None))
            continue
        if is_stack_name(m):  # raises naming an unknown member or two members of one stage
            order_members([get_method(name) for name in split_name(m)])
        else:
            get_method(m)  # raises with the list of known methods
        if not budgets:
            raise ValueError(f"`budgets` is empty; method {m!r} needs at least one budget in (0, 1]")
        for b in budgets:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1:
                raise ValueError(f"`budgets` must hold fractions in (0, 1], got {b!r}")
            cells.append(Cell(m, float(b)))
    return list(dict.fromkeys(cells))


def record_key(model: str, cell: Cell, sample_id: str) -> str:
    budget = "-" if cell.budget is None else f"{cell.budget:g}"
    return f"{model}|{cell.method}|{budget}|{sample_id}"


def cell_methods(method: str) -> list[str]:
    """The methods a cell's method runs: its members for a stack (``"divprune+fastv"``), else itself."""
    return split_name(method) if is_stack_name(method) else [method]


def method_config(cell: Cell, num_layers: int, options: Mapping[str, Any] | None = None):
    """The config of a cell at its budget; a stack's members take ``options`` of their own name (the grid's
    ``method_options`` are per method: ``{"fastv": {...}}`` reaches fastv alone and in every stack)."""
    if is_stack_name(cell.method):
        per_member = {m: dict(options.get(m) or {}) for m in split_name(cell.method)} if options else {}
        return stack_config(cell.method, cell.budget, num_layers, **per_member)
    spec = get_method(cell.method)
    return spec.config_cls.at_budget(cell.budget, num_layers=num_layers, **dict(options or {}))


# ----------------------------------------------------------------------------------------------------
# Records on disk
# ----------------------------------------------------------------------------------------------------


class RecordWriter:
    """Appends one JSON line per record and flushes it to disk at once."""

    def __init__(self, path: Path):
        self.path = path
        self._repair()

    def _repair(self) -> None:
        # An interrupted write can leave a partial last line: end it so the next record starts cleanly.
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                last = f.read(1)
            if last != b"\n":
                with self.path.open("a") as f:
                    f.write("\n")

    def write(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, default=_json_default) + "\n"
        with self.path.open("a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def _json_default(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.tolist()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


# ----------------------------------------------------------------------------------------------------
# Distributed context
# ----------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place among ``world`` evaluation processes (one without accelerate: 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    state: Any = None

    @staticmethod
    def detect() -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return Dist()
        from accelerate import PartialState

        # Without GPUs, accelerate only forms a process group when told it runs on the CPU (gloo backend).
        state = PartialState(cpu=not torch.cuda.is_available())
        return Dist(rank=state.process_index, world=state.num_processes, local_rank=state.local_process_index, state=state)

    def barrier(self) -> None:
        if self.state is not None and self.world > 1:
            self.state.wait_for_everyone()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def shard(samples: Iterable[Sample], rank: int, world: int) -> Iterator[Sample]:
    """Rank ``r`` of ``world`` takes samples ``r, r + world, r + 2 world, ...``."""
    for i, s in enumerate(samples):
        if i % world == rank:
            yield s


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ----------------------------------------------------------------------------------------------------
# One batch through one cell
# ----------------------------------------------------------------------------------------------------


def _to_device(inputs: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    out = {}
    for k, v in inputs.items():
        if torch.is_tensor(v):
            v = v.to(device)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def baseline_stats(model: Any, inputs: Mapping[str, Any]) -> list[SampleStats]:
    """The statistics a wrapped model would report, for the unwrapped model (nothing reduced)."""
    adapter = get_adapter(model)
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    geometry = Geometry.from_config(adapter.text_config)
    rows = []
    for r in range(ids.shape[0]):
        s = SampleStats(call=0, row=r, geometry=geometry)
        visual = 0
        for m in adapter.modalities:
            n = int(((ids[r] == adapter.placeholder_id(m)) & (mask[r] != 0)).sum())
            if n:
                s.items.append(ItemStats(m, n, n, 0.0))
                visual += n
        s.text_tokens = int((mask[r] != 0).sum()) - visual
        rows.append(s)
    return rows


def _new_tokens(sequences: torch.Tensor, prompt_len: int, eos_ids: set[int], pad_id: int | None) -> list[list[int]]:
    """Generated ids per row, cut after the first EOS (kept) and without trailing padding."""
    out = []
    for row in sequences[:, prompt_len:].tolist():
        ids = []
        for t in row:
            ids.append(t)
            if t in eos_ids:
                break
        if not (set(ids[-1:]) & eos_ids) and pad_id is not None:
            while ids and ids[-1] == pad_id and pad_id not in eos_ids:
                ids.pop()
        out.append(ids)
    return out


class _ItemCapture:
    """Grabs the handle's view of the batch (items, layouts, kept sources) at the first LLM call."""

    def __init__(self, model: Any):
        self.model = model
        self.items: list[Any] | None = None
        handle = get_handle(model)
        self.hook = None
        if handle is not None:
            self.hook = handle.adapter.language_model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        handle = get_handle(self.model)
        if self.items is None and handle is not None and handle.current is not None:
            self.items = list(handle.current.items)

    def close(self) -> None:
        if self.hook is not None:
            self.hook.remove()

    def kept_maps(self, rows: int) -> list[dict[str, Any] | None]:
        """Per row: its items' layouts, kept sources / merge assignment, and per-layer kept tokens."""
        handle = get_handle(self.model)
        if self.items is None or handle is None:
            return [None] * rows
        per_row: list[dict[str, Any]] = [{"items": [], "layers": {}} for _ in range(rows)]
        position: dict[int, tuple[int, int]] = {}
        for i, it in enumerate(self.items):
            red = it.reduction
            entry = {
                "modality": it.modality, "layout": layout_to_dict(it.layout),
                "sources": it.sources.detach().cpu().tolist(),
                "assignment": None if red is None or red.assignment is None else red.assignment.detach().cpu().tolist(),
                "info": None if red is None or not red.info else red.info,  # e.g. per-crop budgets
            }
            position[i] = (it.row, len(per_row[it.row]["items"]))
            per_row[it.row]["items"].append(entry)
        stages = getattr(getattr(handle, "llm_stage", None), "stages", None) or []
        for stage in stages:
            for r, tokens in enumerate(stage.visual_tokens[:rows]):
                pairs = [[position[int(i)][1], int(t)] for i, t in tokens.detach().cpu().tolist()]
                per_row[r]["layers"][str(stage.layer)] = pairs
        return per_row


@dataclass
class BatchResult:
    texts: list[str]
    new_tokens: list[int]
    stats: list[SampleStats]
    timing: BatchTiming
    kept: list[dict[str, Any] | None]
    prefill_tokens_per_layer: list[list[int]]


def generate_batch(model: Any, processor: Any, inputs: dict[str, Any], max_new_tokens: int, *,
                   capture_kept: bool = False) -> BatchResult:
    """Greedy ``generate`` of one left-padded batch with timing, memory, KV and token statistics."""
    tokenizer = getattr(processor, "tokenizer", processor)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = _to_device(inputs, device, dtype)
    prompt_len = inputs["input_ids"].shape[1]
    handle = get_handle(model)
    if handle is not None:
        tr.stats(model, reset=True)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.generation_config.pad_token_id
    capture = _ItemCapture(model) if capture_kept else None
    clock = StepClock(device)
    kind = reset_peak_memory(device)
    try:
        with torch.inference_mode():
            clock.start()
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=pad_id, eos_token_id=sorted(eos_ids) or None, streamer=clock,
                                 return_dict_in_generate=True, use_cache=True)
        peak = peak_memory(device)
        kept = capture.kept_maps(inputs["input_ids"].shape[0]) if capture else [None] * inputs["input_ids"].shape[0]
    finally:
        if capture is not None:
            capture.close()
    sequences = out.sequences
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    ids = _new_tokens(sequences, prompt_len, eos_ids, pad_id)
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    rows = tr.stats(model).last if handle is not None else baseline_stats(model, inputs)
    if len(rows) != len(texts):  # text-only batch: nothing was reduced
        rows = baseline_stats(model, inputs)
    timing = BatchTiming(ttft_ms=clock.ttft_ms, step_ms=clock.step_ms, peak_memory_bytes=peak, memory_kind=kind,
                         kv_cache_bytes_batch=cache_bytes(cache))
    per_layer = [s.tokens_per_layer() for s in rows]
    return BatchResult(texts=[t.strip() for t in texts], new_tokens=[len(i) for i in ids], stats=rows, timing=timing,
                       kept=kept, prefill_tokens_per_layer=per_layer)


# ----------------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    """Everything that defines a run (saved as ``run.json``)."""

    name: str
    task: str
    task_options: dict[str, Any]
    models: list[dict[str, Any]]
    methods: list[str]
    budgets: list[float]
    split: str | None
    limit: int | None
    batch_size: int
    max_new_tokens: int
    method_options: dict[str, dict[str, Any]]


class Runner:
    """Runs a grid and writes ``records.jsonl``, ``summary.json``, ``table.md`` and plots under ``out_dir/name``.

    Args:
        task: the :class:`~tokenreduce.eval.task.Task`.
        models: :class:`ModelSpec` list (loaded one at a time).
        methods: registered method names, and ``"none"`` for the unreduced model.
        budgets: fractions of the visual tokens kept, through each method's ``at_budget(b, num_layers=...)``.
        name: run name (the folder under ``out_dir``).
        split, limit: which samples (``limit`` applies before sharding).
        batch_size: samples per ``generate`` call (left padding).
        max_new_tokens: default: the task's.
        warmup: untimed ``generate`` calls per cell before its first timed batch.
        keep_maps: per cell, how many samples also store their kept-token maps (for overlays).
        method_options: extra config options per method, e.g. ``{"fastv": {"query": "text"}}``.
        task_options: how to rebuild the task later (``tokenreduce show``); saved in ``run.json``.
        plots: write the PNG plots at the end.
        progress: show a progress bar on rank 0.
        chunk_samples: samples read and encoded at a time; every cell runs over a chunk's batches under one
            wrap (a method's heavy parts, e.g. LangDC's captioner, load once per cell and chunk, not per
            batch). Larger chunks wrap less often and hold more encoded inputs in memory.
        threads: torch CPU threads for the run: ``"auto"`` (default) the cores not busy with other work, at
            most torch's current count, shared among the processes of a distributed run, said on stderr
            (:func:`~tokenreduce.eval.measure.choose_threads`); an int sets it; None leaves torch's setting.
    """

    def __init__(
        self, task: Task, models: Sequence[ModelSpec], methods: Sequence[str], budgets: Sequence[float] = (0.25,),
        *, name: str, out_dir: str | Path = "runs", split: str | None = None, limit: int | None = None,
        batch_size: int = 4, max_new_tokens: int | None = None, warmup: int = 1, keep_maps: int = 4,
        method_options: Mapping[str, Mapping[str, Any]] | None = None, task_options: Mapping[str, Any] | None = None,
        plots: bool = True, progress: bool = True, dist: Dist | None = None, chunk_samples: int = 64,
        threads: int | str | None = "auto",
    ) -> None:
        if not models:
            raise ValueError("`models` is empty; give at least one ModelSpec")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}")
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise ValueError(f"`limit` must be an int >= 0 or None, got {limit!r}")
        if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
            raise ValueError(f"`max_new_tokens` must be an int >= 1 or None (the task's), got {max_new_tokens!r}")
        if not isinstance(chunk_samples, int) or chunk_samples < 1:
            raise ValueError(f"`chunk_samples` must be an int >= 1, got {chunk_samples!r}")
        if not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"`warmup` must be an int >= 0, got {warmup!r}")
        if not name or "/" in name:
            raise ValueError(f"`name` must be a non-empty folder name without '/', got {name!r}")
        if not (threads is None or threads == "auto" or (isinstance(threads, int) and not isinstance(threads, bool)
                                                         and threads >= 1)):
            raise ValueError(f"`threads` must be 'auto', None or an int >= 1, got {threads!r}")
        self.threads = threads
        self.task, self.models = task, list(models)
        self.cells = make_cells(methods, budgets)
        self.name, self.run_dir = name, Path(out_dir) / name
        self.split, self.limit, self.batch_size = split, limit, batch_size
        self.max_new_tokens = int(task.max_new_tokens if max_new_tokens is None else max_new_tokens)
        self.warmup, self.keep_maps = warmup, keep_maps
        self.method_options = {k: dict(v) for k, v in (method_options or {}).items()}
        unknown = [m for m in self.method_options if m not in {n for c in self.cells for n in cell_methods(c.method)}]
        if unknown:
            raise ValueError(f"`method_options` given for method(s) {unknown} that are not in `methods`")
        self.plots, self.progress = plots, progress
        self.dist = dist or Dist.detect()
        self.spec = RunSpec(
            name=name, task=task.name, task_options=dict(task_options or {}), models=[m.describe() for m in models],
            methods=list(dict.fromkeys(methods)), budgets=[float(b) for b in budgets], split=split, limit=limit,
            batch_size=batch_size, max_new_tokens=self.max_new_tokens, method_options=self.method_options,
        )
        self.skipped: dict[str, str] = {}
        self.chunk_batches = max(1, chunk_samples // batch_size)
        self._configs: dict[str, MethodConfig] = {}  # per model|cell label, checked by a trial wrap once

    # ----- files -------------------------------------------------------------------------------------
    @property
    def records_path(self) -> Path:
        return self.run_dir / (RECORDS if self.dist.world == 1 else f"records.rank{self.dist.rank}.jsonl")

    def _write_spec(self) -> None:
        if not self.dist.is_main:  # rank 0 checks and writes; the others wait for it in `run`
            return
        path = self.run_dir / "run.json"
        spec = dict(self.spec.__dict__)
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("task") != spec["task"]:
                raise ValueError(
                    f"run folder {self.run_dir} holds a run of task {old.get('task')!r}, not {spec['task']!r}; "
                    "choose another `name`"
                )
            # a resumed run may add methods, budgets or models: keep the union
            for key in ("methods", "budgets"):
                spec[key] = list(dict.fromkeys([*old.get(key, []), *spec[key]]))
            known = {m["name"] for m in spec["models"]}
            spec["models"] = spec["models"] + [m for m in old.get("models", []) if m["name"] not in known]
        path.write_text(json.dumps(spec, indent=2, default=_json_default) + "\n")

    # ----- main loop ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run (or resume) the grid; returns the summary (rank 0) or this rank's record count.

        A run that fails before writing any record leaves no folder behind (a folder holding only
        ``run.json`` would look like a run to resume)."""
        self._set_threads()
        created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._write_spec()
            self.dist.barrier()
            done = set(read_records(self.run_dir))
            writer = RecordWriter(self.records_path)
            written = 0
            with reuse_loaded_parts():  # a method's trained parts load once per run, not once per cell and chunk
                for spec in self.models:
                    written += self._run_model(spec, done, writer)
        except BaseException:
            if created and self.dist.is_main and not any(self.run_dir.glob("records*.jsonl")):
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        self.dist.barrier()
        if not self.dist.is_main:
            return {"rank": self.dist.rank, "written": written}
        if self.dist.world > 1:
            merge_rank_files(self.run_dir)
        return write_reports(self.run_dir, self.task, plots=self.plots, skipped=self.skipped)

    def _set_threads(self) -> None:
        if self.threads is None:
            return
        if self.threads != "auto":
            torch.set_num_threads(self.threads)
            return
        chosen, why = choose_threads(torch.get_num_threads())
        chosen = max(1, chosen // max(1, self.dist.world))  # the processes of one run share the cores
        if chosen != torch.get_num_threads():
            torch.set_num_threads(chosen)
        if self.dist.is_main:
            print(f"tokenreduce: run {self.name!r} uses {chosen} torch thread(s) per process: {why}", file=sys.stderr)

    def _pending(self, model_name: str, batch: Sequence[Sample], done: set[str]) -> dict[Cell, list[int]]:
        out = {}
        for cell in self.cells:
            idx = [i for i, s in enumerate(batch) if record_key(model_name, cell, s.id) not in done]
            if idx:
                out[cell] = idx
        return out

    def _progress(self, total: int | None, desc: str):
        if not self.progress or not self.dist.is_main:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, dynamic_ncols=True)

    def _run_model(self, spec: ModelSpec, done: set[str], writer: RecordWriter) -> int:
        samples = shard(self.task.samples(self.split, self.limit), self.dist.rank, self.dist.world)
        model = processor = None
        family = num_layers = None
        warmed: set[Cell] = set()
        kept_counts: dict[Cell, int] = {}
        written = 0
        bar = self._progress(self.limit and math.ceil(self.limit / self.dist.world) * len(self.cells),
                             f"{self.name}: {spec.name}")
        try:
            seen: set[str] = set()
            # A chunk of batches is encoded once; then each cell runs over all of it, so the model is wrapped
            # once per cell and chunk (``_run_cell`` leaves it wrapped for the next batch of the same cell).
            for chunk in batched(batched(samples, self.batch_size), self.chunk_batches):
                work = []
                for batch in chunk:
                    for s in batch:  # records are keyed by sample id: a repeated id would be skipped as done
                        if s.id in seen:
                            raise ValueError(f"task {self.task.name!r} yields sample id {s.id!r} twice; ids must be unique")
                        seen.add(s.id)
                    pending = self._pending(spec.name, batch, done)
                    if bar is not None:
                        bar.update(sum(len(batch) - len(pending.get(c, [])) for c in self.cells))
                    if not pending:
                        continue
                    if model is None:
                        model, processor = spec.load(self.dist.local_rank)
                        family = model.config.model_type
                        num_layers = model.config.get_text_config().num_hidden_layers
                    work.append((batch, pending, *self._encode(batch, processor, family)))
                for cell in self.cells:
                    if bar is not None and any(cell in pending for _, pending, _, _ in work):
                        bar.set_description(f"{self.name}: {spec.name} {cell.label}", refresh=False)
                    for batch, pending, encoded, errors in work:
                        if cell not in pending:
                            continue
                        n = self._run_cell(spec.name, model, processor, num_layers, cell, batch, pending[cell],
                                           encoded, errors, writer, done, warmed, kept_counts)
                        written += n
                        if bar is not None:
                            bar.update(len(pending[cell]))
        finally:
            if bar is not None:
                bar.close()
            if model is not None and get_handle(model) is not None:
                tr.unwrap(model)
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return written

    def _encode(self, batch, processor, family) -> tuple[dict[int, dict], dict[int, BaseException]]:
        encoded, errors = {}, {}
        for i, sample in enumerate(batch):
            try:
                encoded[i] = self.task.encode(sample, processor, family)
            except Exception as exc:  # media errors and anything the processor rejects: one sample fails
                errors[i] = exc
        return encoded, errors

    def _run_cell(self, model_name, model, processor, num_layers, cell, batch, idx, encoded, errors, writer, done,
                  warmed, kept_counts) -> int:
        config = None
        label = f"{model_name}|{cell.label}"
        if label in self.skipped:
            return 0
        if cell.method != BASELINE:
            config = self._configs.get(label)
            if config is None:
                try:  # a budget the method cannot reach, or options the model cannot take: skip the cell
                    options = (self.method_options if is_stack_name(cell.method)
                               else self.method_options.get(cell.method))
                    config = method_config(cell, num_layers, options)
                    self._wrap(model, config)
                except (ValueError, TypeError, NotImplementedError) as exc:
                    self.skipped[label] = f"{type(exc).__name__}: {exc}"
                    warnings.warn(f"skipping {cell.label} on {model_name}: {exc}", stacklevel=2)
                    return 0
                self._configs[label] = config
        base = {"model": model_name, "method": cell.method, "budget": cell.budget, "task": self.task.name,
                "rank": self.dist.rank, "config": None if config is None else config.to_dict()}
        written = 0
        for i in idx:
            if i in errors:
                s = batch[i]
                writer.write({**base, "key": record_key(model_name, cell, s.id), "sample_id": s.id,
                              "answer": s.answer, "fields": self.task.record_fields(s), "prediction": None,
                              "score": None, "error": f"{type(errors[i]).__name__}: {errors[i]}",
                              "error_stage": "encode"})
                done.add(record_key(model_name, cell, s.id))
                written += 1
        runnable = [i for i in idx if i in encoded]
        if not runnable:
            return written
        self._wrap(model, config)
        try:
            if cell not in warmed:
                self._warm_up(model, processor, [encoded[i] for i in runnable[: self.batch_size]])
                warmed.add(cell)
            groups = [runnable]
            while groups:
                group = groups.pop(0)
                try:
                    inputs = collate([encoded[i] for i in group], self._pad_id(processor, model))
                    capture = kept_counts.get(cell, 0) < self.keep_maps and config is not None
                    result = generate_batch(model, processor, inputs, self.max_new_tokens, capture_kept=capture)
                except Exception as exc:
                    if len(group) > 1:  # find the sample(s) that fail: retry one by one
                        groups = [[i] for i in group] + groups
                        continue
                    s = batch[group[0]]
                    writer.write({**base, "key": record_key(model_name, cell, s.id), "sample_id": s.id,
                                  "answer": s.answer, "fields": self.task.record_fields(s), "prediction": None,
                                  "score": None, "error": f"{type(exc).__name__}: {exc}", "error_stage": "generate"})
                    done.add(record_key(model_name, cell, s.id))
                    written += 1
                    continue
                for row, i in enumerate(group):
                    rec = self._record(base, model_name, cell, batch[i], row, result, len(group), model)
                    if result.kept[row] is not None and kept_counts.get(cell, 0) < self.keep_maps:
                        for item in result.kept[row]["items"]:
                            item["fit"] = fit_for(processor, model.config.model_type, item["modality"])
                        rec["kept"] = result.kept[row]
                        kept_counts[cell] = kept_counts.get(cell, 0) + 1
                    writer.write(rec)
                    done.add(rec["key"])
                    written += 1
        except BaseException:
            self._wrap(model, None)
            raise
        return written

    @staticmethod
    def _wrap(model, config: MethodConfig | None) -> None:
        """Leave ``model`` wrapped with exactly ``config`` (unwrapped for None), re-wrapping only on a change."""
        handle = get_handle(model)
        if handle is not None and handle.config is config:
            return
        if handle is not None:
            tr.unwrap(model)
        if config is not None:
            tr.wrap(model, config)

    @staticmethod
    def _pad_id(processor, model) -> int:
        tokenizer = getattr(processor, "tokenizer", processor)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = model.generation_config.pad_token_id
        return int(pad if pad is not None else 0)

    def _warm_up(self, model, processor, inputs_list) -> None:
        for _ in range(self.warmup):
            inputs = collate(inputs_list, self._pad_id(processor, model))
            try:
                generate_batch(model, processor, inputs, min(2, self.max_new_tokens))
            except Exception:  # the timed run reports the error per sample
                return

    def _record(self, base, model_name, cell, sample, row, result: BatchResult, group_size: int, model) -> dict:
        stats = result.stats[row]
        text = result.texts[row]
        prediction = self.task.parse(text, sample)
        score = self.task.score(prediction, sample)
        kv_token = kv_bytes_per_token(model.config.get_text_config(), next(model.parameters()).dtype)
        steps = max(0, result.new_tokens[row] - 1)
        kv = sum(n + steps for n in result.prefill_tokens_per_layer[row]) * kv_token if result.prefill_tokens_per_layer[row] else None
        t = result.timing
        return {
            **base, "key": record_key(model_name, cell, sample.id), "sample_id": sample.id,
            "answer": sample.answer, "fields": self.task.record_fields(sample), "text": text,
            "prediction": prediction, "score": score, "error": None,
            "visual_tokens_in": stats.visual_tokens_in, "visual_tokens_llm_input": stats.visual_tokens_llm_input,
            "visual_tokens_out": stats.visual_tokens_out, "visual_tokens_layer_mean": stats.visual_tokens_layer_mean,
            "layers": {str(k): v for k, v in sorted(stats.layers.items())}, "text_tokens": stats.text_tokens,
            "items": [{"modality": it.modality, "tokens_in": it.tokens_in, "tokens_out": it.tokens_out,
                       **({"info": it.info} if it.info else {})} for it in stats.items],
            "extra": stats.extra,
            "reducer_ms": stats.reducer_ms, "prefill_flops": stats.prefill_flops,
            "prefill_flops_full": stats.prefill_flops_full, "new_tokens": result.new_tokens[row],
            "ttft_ms": t.ttft_ms, "decode_ms_per_token": t.decode_ms_per_token, "batch_size": group_size,
            "peak_memory_bytes": t.peak_memory_bytes, "memory_kind": t.memory_kind,
            "kv_cache_bytes": kv, "kv_cache_bytes_batch": t.kv_cache_bytes_batch,
        }


def merge_rank_files(run_dir: str | Path) -> Path:
    """Merge every ``records*.jsonl`` of a run into ``records.jsonl`` (one line per key); remove rank files."""
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    target = run_dir / RECORDS
    tmp = run_dir / (RECORDS + ".tmp")
    with tmp.open("w") as f:
        for rec in records.values():
            f.write(json.dumps(rec, default=_json_default) + "\n")
    os.replace(tmp, target)
    for path in run_dir.glob("records.rank*.jsonl"):
        path.unlink()
    return target


def run_grid(task: Task, models: Sequence[ModelSpec], methods: Sequence[str], budgets: Sequence[float] = (0.25,),
             **kwargs: Any) -> dict[str, Any]:
    """Build a :class:`Runner` and run it; see its arguments."""
    return Runner(task, models, methods, budgets, **kwargs).run()
