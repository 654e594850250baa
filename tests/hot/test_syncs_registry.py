"""Host-device sync points a wrapped forward adds, for every registered reducing method and family.

Counted on the CPU with :class:`tokenreduce.testing.syncs.SyncCounter` (the ops that block the host on a
GPU), wrapped minus unwrapped on the same batch: in one prefill ``forward`` and in one decode step of
``generate`` (``max_new_tokens=2`` minus ``1``). Methods with a fixed budget know every size from shapes and
config, so they add none; methods whose kept count depends on the data add at most one per reduction stage
(the read that sizes what follows). What still adds syncs today is listed in ``KNOWN`` with the reason;
those cases are strict xfails, so fixing one turns its xfail into a failure to remove from the list.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.registry import get_method, method_specs
from tokenreduce.testing.syncs import SyncCounter
from tokenreduce.testing.tiny import FAMILIES, VIDEO_FAMILIES, default_rows, tiny_batch, tiny_model

LAYERS = 8
FIXED = ("random", "pool", "divprune", "cdpruner", "tome_projector", "visionzip", "vispruner", "fastv", "pdrop",
         "dart", "evs", "doc_correlation", "vqtoken")
ADAPTIVE = ("atp", "prumerge", "prumerge_plus")
ANYRES = ("llava_next", "llava_next_video", "llava_onevision")
# Still over budget: (method or "*", families) -> reason.
KNOWN = {
    ("vqtoken", FAMILIES): "k-means and hashing read the codebook on the host",
}
CASES = [
    (m, f) for m in (*FIXED, *ADAPTIVE) for f in FAMILIES
    if (get_method(m).families is None or f in get_method(m).families)
    and ("image" in get_method(m).modalities or f in VIDEO_FAMILIES)
]


def _known(method: str, family: str) -> str | None:
    for (m, families), reason in KNOWN.items():
        if m in ("*", method) and family in families:
            return reason
    return None


@functools.cache
def _model(family: str):
    return tiny_model(family, num_layers=LAYERS)


def _batch(family: str, video: bool, rows: int = 1) -> dict:
    return tiny_batch(_model(family), default_rows(family, n=rows, video=video))


def _syncs(fn) -> int:
    with SyncCounter(trace=False) as counter, torch.no_grad():
        fn()
    return counter.count


def _counts(model, batch) -> tuple[int, int]:
    """Sync points of one prefill forward and of one decode step."""
    prefill = _syncs(lambda: model(**batch))
    one = _syncs(lambda: model.generate(**batch, max_new_tokens=1, do_sample=False))
    two = _syncs(lambda: model.generate(**batch, max_new_tokens=2, do_sample=False))
    return prefill, two - one


def _own_prefill(model, batch) -> int:
    """Sync points issued by tokenreduce's own code in one prefill. The wrapped call can spare the model
    some of its own reads (Qwen's position ids, when the handle passes them), which would hide as many of
    the wrapper's in the difference of totals: what the wrapper issues itself counts too."""
    with SyncCounter(trace=True) as counter, torch.no_grad():
        model(**batch)
    return sum(e.where.startswith("tokenreduce" + os.sep) for e in counter.events)


@functools.cache
def _unwrapped(family: str, video: bool, rows: int = 1) -> tuple[int, int]:
    return _counts(_model(family), _batch(family, video, rows))


def _stages(method: str, config) -> int:
    if method == "atp":
        return len(config.layers)
    return 1


def test_every_reducing_method_is_classified():
    reducing = {s.name for s in method_specs() if set(s.stages) & {"projector", "vision", "llm"}}
    # tome reduces inside the tower (its counts come from the schedule), langdc adds caption tokens from a
    # captioner, vqtoken_codebook is vqtoken's codebook-only variant: not in the table.
    assert reducing - set(FIXED) - set(ADAPTIVE) == {"tome", "langdc", "vqtoken_codebook"}


@pytest.mark.parametrize("method, family", CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_added_sync_points(method, family, request):
    reason = _known(method, family)
    if reason is not None:
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))
    model = _model(family)
    video = "image" not in get_method(method).modalities
    batch = _batch(family, video)
    config = get_method(method).config_cls.at_budget(0.25, num_layers=LAYERS)
    base_prefill, base_decode = _unwrapped(family, video)
    tr.wrap(model, config)
    try:
        prefill, decode = _counts(model, batch)
        own = _own_prefill(model, batch)
    finally:
        tr.unwrap(model)
    allowed = 0 if method in FIXED else _stages(method, config)
    added = max(prefill - base_prefill, own)
    assert decode - base_decode == 0, f"{method} adds {decode - base_decode} sync points per decode step"
    assert added <= allowed, f"{method} adds {added} sync points per prefill on {family} (allowed {allowed})"


@pytest.mark.parametrize("method", ["pool", "fastv"])
def test_batched_call_reads_the_device_once(method):
    """Several rows: one read (item rows and text counts) sizes the rebuilt rows."""
    model = _model("llava")
    batch = _batch("llava", False, rows=3)
    base_prefill, _ = _unwrapped("llava", False, 3)
    tr.wrap(model, get_method(method).config_cls.at_budget(0.25, num_layers=LAYERS))
    try:
        prefill = _syncs(lambda: model(**batch))
    finally:
        tr.unwrap(model)
    assert prefill - base_prefill <= 1


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_a_modality_left_out_of_the_call_costs_no_read(family):
    """Image-only calls on families that also take videos: the absent modality is not read for stray
    placeholders (the layouts' one read of the sizes replaces the model's own reads)."""
    model = _model(family)
    batch = _batch(family, video=False)
    plain, _ = _unwrapped(family, False)
    tr.wrap(model, "pool", keep=0.25)
    try:
        prefill, _ = _counts(model, batch)
    finally:
        tr.unwrap(model)
    assert prefill - plain <= 0
