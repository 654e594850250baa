"""With a limit, only the rows taken are read and only their images decoded (hub, hub-layout folder, GQA)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.eval_runner.helpers import png_bytes
from tokenreduce.eval.tasks import get_task
from tokenreduce.eval.tasks import source as source_module


class CountingLoader:
    """A ``load_dataset`` stand-in whose datasets are generators counting the rows pulled from them."""

    def __init__(self, rows_by_name: dict):
        self.rows_by_name = rows_by_name
        self.calls: list[tuple[tuple, dict]] = []
        self.pulled: dict = {}

    def __call__(self, path, name=None, **kwargs):
        self.calls.append(((path, name), kwargs))
        self.pulled[name] = 0

        def rows():
            for row in self.rows_by_name[name]:
                self.pulled[name] += 1
                yield row

        return rows()


@pytest.fixture
def image_opens(monkeypatch) -> list:
    """Every PIL decode (ours or a dataset library's) is recorded."""
    opened: list = []
    real_open = Image.open

    def counting_open(*args, **kwargs):
        opened.append(args[0])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    return opened


def vqa_rows(n: int) -> list[dict]:
    return [{"question_id": i, "question": "q", "answers": ["a"] * 10,
             "image": {"bytes": png_bytes((i % 256, 0, 0), size=(8, 8)), "path": None}} for i in range(n)]


def test_hub_dataset_is_streamed_with_a_limit(image_opens):
    loader = CountingLoader({None: vqa_rows(500)})
    samples = list(get_task("vqav2", loader=loader).samples(limit=7))
    assert len(samples) == 7 and all(s.images for s in samples)
    assert loader.calls[0][1]["streaming"] is True
    assert loader.pulled[None] == 7 and len(image_opens) == 7

    loader = CountingLoader({None: vqa_rows(20)})
    assert len(list(get_task("vqav2", loader=loader).samples())) == 20
    assert "streaming" not in loader.calls[0][1]  # a whole split is prepared (and cached) as before


def test_gqa_reads_the_image_table_only_as_far_as_needed(image_opens):
    images = [{"id": f"img{i}", "image": {"bytes": png_bytes(), "path": None}} for i in range(300)]
    questions = [{"id": f"q{i}", "imageId": f"img{i // 2}", "question": "?", "answer": "x"} for i in range(600)]
    loader = CountingLoader({"testdev_balanced_instructions": questions, "testdev_balanced_images": images})
    samples = list(get_task("gqa", loader=loader).samples(limit=6))
    assert [s.meta["image_id"] for s in samples] == ["img0", "img0", "img1", "img1", "img2", "img2"]
    assert all(s.images and "media_error" not in s.meta for s in samples)
    assert loader.pulled == {"testdev_balanced_instructions": 6, "testdev_balanced_images": 3}
    assert len(image_opens) == 6  # one decode per sample, none for the table
    assert all(kwargs.get("streaming") is True for _, kwargs in loader.calls)


def test_gqa_missing_image_is_a_sample_error():
    loader = CountingLoader({"testdev_balanced_instructions": [{"id": "q", "imageId": "nope", "question": "?",
                                                                "answer": "x"}],
                             "testdev_balanced_images": [{"id": "img0", "image": {"bytes": png_bytes(), "path": None}}]})
    (sample,) = get_task("gqa", loader=loader).samples(limit=1)
    assert not sample.images and "media_error" in sample.meta


def write_hub_copy(root: Path, shards: int = 2, rows_per_shard: int = 200, row_group: int = 16) -> Path:
    """A folder laid out like a hub dataset repository: sharded parquet with datasets' Image feature."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"question_id": datasets.Value("int64"), "question": datasets.Value("string"),
                                  "answers": datasets.List(datasets.Value("string")), "image": datasets.Image()})
    (root / "data").mkdir(parents=True)
    for shard in range(shards):
        rows = vqa_rows(rows_per_shard)
        for row in rows:
            row["question_id"] += shard * rows_per_shard
        ds = datasets.Dataset.from_list(rows, features=features)
        ds.to_parquet(str(root / "data" / f"validation-{shard:05d}-of-{shards:05d}.parquet"), batch_size=row_group)
    return root


def test_local_hub_layout_folder_is_streamed(tmp_path, monkeypatch, image_opens):
    datasets = pytest.importorskip("datasets")
    from datasets.packaged_modules.parquet import parquet as parquet_builder

    datasets.disable_progress_bars()
    root = write_hub_copy(tmp_path / "VQAv2")
    image_opens.clear()

    def local_only(path, *args, **kwargs):
        assert Path(path).is_dir(), f"a test asked the hub for {path}"
        return datasets.load_dataset(path, *args, **kwargs)

    monkeypatch.setattr(source_module, "_default_loader", local_only)
    rows_read: list[int] = []
    real_tables = parquet_builder.Parquet._generate_tables

    def counting_tables(self, *args, **kwargs):
        for key, table in real_tables(self, *args, **kwargs):
            rows_read.append(table.num_rows)
            yield key, table

    monkeypatch.setattr(parquet_builder.Parquet, "_generate_tables", counting_tables)
    samples = list(get_task("vqav2", path=str(root)).samples(limit=5))
    assert [s.id for s in samples] == ["0", "1", "2", "3", "4"]
    assert all(s.images and "media_error" not in s.meta for s in samples)
    assert sum(rows_read) <= 16  # one row group of the 400 rows
    assert len(image_opens) == 5
