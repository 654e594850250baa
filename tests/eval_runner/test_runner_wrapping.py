"""The runner wraps the model once per cell (per chunk of samples), not once per batch."""

from __future__ import annotations

import pytest

import tokenreduce as tr
from tests.eval_runner.helpers import png_bytes, write_parquet
from tokenreduce.core.api import get_handle
from tokenreduce.eval.runner import ModelSpec, Runner, read_records
from tokenreduce.eval.tasks import get_task


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqav2")
    rows = [{"question_id": i, "question": "w13 w14", "answers": ["w20"] * 10, "answer_type": "other",
             "image": {"bytes": png_bytes((40 * i, 0, 0), (40, 60)), "path": None}} for i in range(6)]
    rows[3]["image"] = {"bytes": b"\x89PNG broken", "path": None}  # an encode error in the middle batch
    write_parquet(root / "validation.parquet", rows)
    return root


def run(tiny_llava, vqa_dir, out, monkeypatch, **options):
    model, processor = tiny_llava
    wraps: list[str] = []
    real_wrap = tr.wrap

    def counting_wrap(m, method, **kw):
        wraps.append(method.method if hasattr(method, "method") else method)
        return real_wrap(m, method, **kw)

    monkeypatch.setattr(tr, "wrap", counting_wrap)
    runner = Runner(get_task("vqav2", path=str(vqa_dir)),
                    [ModelSpec("tiny", factory=lambda: (model, processor), device="cpu")], ["none", "pool", "fastv"],
                    [0.5], name="grid", out_dir=out, batch_size=2, progress=False, warmup=0, plots=False, **options)
    runner.run()
    monkeypatch.setattr(tr, "wrap", real_wrap)
    assert get_handle(model) is None  # unwrapped at the end
    return wraps, read_records(out / "grid")


def test_each_cell_is_wrapped_once_and_records_match_small_chunks(tiny_llava, vqa_dir, tmp_path, monkeypatch):
    wraps, records = run(tiny_llava, vqa_dir, tmp_path / "one", monkeypatch)
    assert sorted(wraps) == ["fastv", "pool"]  # 3 batches, 2 reducing cells: one wrap each
    assert len(records) == 18 and sum(r["error"] is not None for r in records.values()) == 3
    # one batch per chunk: a wrap per cell and batch, and the same records
    wraps_small, small = run(tiny_llava, vqa_dir, tmp_path / "small", monkeypatch, chunk_samples=1)
    assert sorted(wraps_small) == ["fastv"] * 3 + ["pool"] * 3
    assert set(small) == set(records)
    for key, rec in records.items():
        assert (small[key]["error"] is None) == (rec["error"] is None), key
        for field in ("prediction", "score", "visual_tokens_in", "visual_tokens_out", "config"):
            assert small[key].get(field) == rec.get(field), (key, field)


def test_chunk_samples_is_checked(tiny_llava, vqa_dir, tmp_path):
    model, processor = tiny_llava
    with pytest.raises(ValueError, match="`chunk_samples` must be an int >= 1, got 0"):
        Runner(get_task("vqav2", path=str(vqa_dir)), [ModelSpec("tiny", factory=lambda: (model, processor))],
               ["none"], name="grid", out_dir=tmp_path, chunk_samples=0)
