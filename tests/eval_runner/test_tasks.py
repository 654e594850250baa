"""Benchmark loaders read local fixtures in the real hub schema, and make the right hub calls."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.eval_runner.helpers import FakeLoader, png_bytes, write_jsonl, write_parquet, write_video
from tokenreduce.eval.media import MediaError, load_video
from tokenreduce.eval.tasks import MVBENCH_SUBTASKS, get_task, list_tasks
from tokenreduce.eval.tasks.source import resolve_source


def _records(task, samples, predictions):
    """What the runner hands to ``aggregate``: parsed prediction, score, answer and fields per sample."""
    out = []
    for s, text in zip(samples, predictions):
        pred = task.parse(text, s)
        out.append({"prediction": pred, "score": task.score(pred, s), "answer": s.answer,
                    "fields": task.record_fields(s)})
    return out


def test_registry_lists_the_real_benchmarks():
    for name in ("vqav2", "gqa", "textvqa", "docvqa", "chartqa", "pope", "mme", "nextqa", "mvbench"):
        assert name in list_tasks()
    with pytest.raises(ValueError, match="known tasks"):
        get_task("vqa3")


# ----- image benchmarks from local files ------------------------------------------------------------


def test_vqav2_parquet_with_inline_images_and_a_corrupt_one(tmp_path):
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
               for i, a in enumerate(["2"] * 3 + ["3"] * 7)]
    rows = [
        {"question_id": 11, "question": "How many?", "answers": answers, "multiple_choice_answer": "3",
         "answer_type": "number", "question_type": "how many", "image": {"bytes": png_bytes(), "path": "a.png"}},
        {"question_id": 12, "question": "Is it red?", "answers": [dict(a, answer="yes") for a in answers],
         "multiple_choice_answer": "yes", "answer_type": "yes/no", "question_type": "is",
         "image": {"bytes": b"not an image", "path": "b.png"}},
    ]
    write_parquet(tmp_path / "validation.parquet", rows)
    task = get_task("vqav2", path=str(tmp_path))
    samples = list(task.samples())
    assert [s.id for s in samples] == ["11", "12"]
    good, bad = samples
    assert good.images[0].size == (60, 40) and good.answer == "3"
    assert good.meta["answers"][:3] == ["2", "2", "2"]
    assert "media_error" in bad.meta and not bad.images
    assert task.score("three", good) == pytest.approx(1.0)
    assert task.score("2", good) == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10)
    assert "single word" in task.prompt_text(good)
    agg = task.aggregate(_records(task, [good], ["3"]))
    assert agg["accuracy"] == 1.0 and agg["categories"] == {"number": 1.0}
    assert [s.id for s in task.samples(limit=1)] == ["11"]


def test_textvqa_jsonl_with_relative_paths_and_a_missing_file(tmp_path):
    Image.new("RGB", (30, 20), "blue").save(tmp_path / "img1.jpg")
    rows = [
        {"question_id": 1, "question": "What brand?", "image": "img1.jpg", "answers": ["nokia"] * 10,
         "ocr_tokens": ["NOKIA", "phone"], "image_id": "x"},
        {"question_id": 2, "question": "What text?", "image": "missing.jpg", "answers": ["stop"] * 10,
         "ocr_tokens": [], "image_id": "y"},
    ]
    write_jsonl(tmp_path / "validation.jsonl", rows)
    task = get_task("textvqa", path=str(tmp_path), ocr_in_prompt=True)
    s1, s2 = task.samples()
    assert s1.images[0].size == (30, 20)
    assert "Reference OCR token: NOKIA, phone" in task.prompt_text(s1)
    assert "not found" in s2.meta["media_error"]
    assert task.score("Nokia.", s1) == 1.0


def test_gqa_local_questions_with_image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (16, 16), "red").save(tmp_path / "images" / "n123.jpg")
    write_jsonl(tmp_path / "testdev.jsonl", [
        {"id": "q1", "imageId": "n123", "question": "What colour?", "answer": "red", "fullAnswer": "It is red."},
    ])
    task = get_task("gqa", path=str(tmp_path))
    (s,) = task.samples()
    assert s.images[0].size == (16, 16)
    assert task.score("Red.", s) == 1.0 and task.score("the red", s) == 0.0


def test_docvqa_and_chartqa_metrics_through_tasks(tmp_path):
    doc = tmp_path / "doc"
    write_parquet(doc / "validation.parquet", [
        {"questionId": 7, "question": "Date?", "answers": ["1/2/1990", "Jan 2 1990"], "question_types": ["form"],
         "image": {"bytes": png_bytes(), "path": None}, "docId": 1},
    ])
    task = get_task("docvqa", path=str(doc))
    (s,) = task.samples()
    assert task.primary_metric == "anls"
    assert task.score("jan 2 1990", s) == 1.0
    assert task.score("1/2/1991", s) == pytest.approx(1 - 1 / 8)

    chart = tmp_path / "chart"
    write_jsonl(chart / "test.jsonl", [
        {"question": "Max?", "answer": "45", "type": "human_test", "image": "c.png"},
        {"question": "Share?", "answer": "12%", "type": "augmented_test", "image": "c.png"},
        {"question": "Label?", "answer": "Asia", "type": "augmented_test", "image": "c.png"},
    ])
    Image.new("RGB", (10, 10)).save(chart / "c.png")
    task = get_task("chartqa", path=str(chart))
    samples = list(task.samples())
    assert [s.id for s in samples] == ["0", "1", "2"]
    agg = task.aggregate(_records(task, samples, ["46", "0.2", "asia"]))
    assert agg["human"] == 1.0 and agg["augmented"] == 0.5
    assert agg["relaxed_accuracy"] == pytest.approx(2 / 3)


def test_pope_and_mme_official_summaries(tmp_path):
    Image.new("RGB", (10, 10)).save(tmp_path / "x.png")
    pope = tmp_path / "pope"
    write_jsonl(pope / "test.jsonl", [
        {"question_id": str(i), "question": "Is there a dog?", "answer": a, "image": "../x.png", "category": c}
        for i, (a, c) in enumerate([("yes", "adversarial"), ("no", "adversarial"), ("no", "random"), ("yes", "random")])
    ])
    task = get_task("pope", path=str(pope))
    samples = list(task.samples())
    agg = task.aggregate(_records(task, samples, ["Yes, there is.", "There is not.", "Yes", "No"]))
    assert agg["accuracy"] == 0.5 and agg["yes_ratio"] == 0.5
    assert agg["precision"] == 0.5 and agg["recall"] == 0.5
    assert agg["splits"]["adversarial"]["accuracy"] == 1.0 and agg["splits"]["random"]["accuracy"] == 0.0
    assert task.primary_metric == "f1"

    mme = tmp_path / "mme"
    write_jsonl(mme / "test.jsonl", [
        {"question_id": "existence/1.png", "question": "Is there a cat? Please answer yes or no.", "answer": "Yes",
         "category": "existence", "image": "../x.png"},
        {"question_id": "existence/1.png", "question": "Is there a dog? Please answer yes or no.", "answer": "No",
         "category": "existence", "image": "../x.png"},
        {"question_id": "code_reasoning/2.png", "question": "Prints 3? Please answer yes or no.", "answer": "Yes",
         "category": "code_reasoning", "image": "../x.png"},
        {"question_id": "code_reasoning/2.png", "question": "Prints 4? Please answer yes or no.", "answer": "No",
         "category": "code_reasoning", "image": "../x.png"},
    ])
    task = get_task("mme", path=str(mme))
    samples = list(task.samples())
    assert len({s.id for s in samples}) == 4
    agg = task.aggregate(_records(task, samples, ["Yes", "No", "Yes", "Yes"]))
    assert agg["categories"]["existence"]["score"] == 200.0
    assert agg["categories"]["code_reasoning"]["score"] == 50.0  # acc 50, acc+ 0
    assert agg["perception"] == 200.0 and agg["cognition"] == 50.0 and agg["total"] == 250.0


# ----- video benchmarks -------------------------------------------------------------------------------


def test_load_video_file_npy_and_frame_folder(tmp_path):
    clip = load_video(write_video(tmp_path / "v.mp4", frames=6), num_frames=4)
    assert clip.shape == (4, 32, 32, 3) and clip.dtype == np.uint8
    assert clip[0].mean() < clip[-1].mean()  # frames in order (brightness rises)
    np.save(tmp_path / "empty.npy", np.zeros((0, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(MediaError, match="shape"):
        load_video(tmp_path / "empty.npy")
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 6), (i * 50, 0, 0)).save(frames / f"{i:03d}.jpg")
    assert load_video(frames, num_frames=8).shape == (3, 6, 8, 3)
    with pytest.raises(MediaError, match="not found"):
        load_video(tmp_path / "nope.mp4")


def test_nextqa_multiple_choice_with_videos_and_errors(tmp_path):
    media = tmp_path / "videos"
    write_video(media / "NExTVideo" / "101.mp4", frames=5)
    np.save(media / "202.npy", np.zeros((0, 8, 8, 3), dtype=np.uint8))
    row = {"question": "what does the man do", "a0": "run", "a1": "sit", "a2": "jump", "a3": "eat", "a4": "sleep",
           "answer": 2, "type": "CW"}
    write_jsonl(tmp_path / "data" / "test.jsonl", [
        dict(row, video=101, qid=1), dict(row, video=202, qid=2), dict(row, video=303, qid=3),
    ])
    task = get_task("nextqa", path=str(tmp_path / "data"), media_dir=str(media), num_frames=4)
    good, empty, missing = task.samples()
    assert good.video.shape == (4, 32, 32, 3) and good.answer == "C"
    assert "C. jump" in task.prompt_text(good) and "letter" in task.prompt_text(good)
    assert "shape" in empty.meta["media_error"] and "not found" in missing.meta["media_error"]
    records = _records(task, [good, good, good], ["C", "jump", "no idea"])
    assert [r["prediction"] for r in records] == ["C", "C", None]
    agg = task.aggregate(records)
    assert agg["accuracy"] == pytest.approx(2 / 3) and agg["unparsed"] == 1
    with pytest.raises(ValueError, match="num_frames"):
        get_task("nextqa", path=str(tmp_path / "data"), num_frames=0)


def test_mvbench_interleaves_subtasks_and_averages_them(tmp_path):
    data, media = tmp_path / "data", tmp_path / "media"
    for sub, n in (("action_sequence", 3), ("object_shuffle", 1)):
        rows = [{"video": f"{sub}_{i}.mp4", "question": f"q{i}", "candidates": ["left", "right", "up"],
                 "answer": "right"} for i in range(n)]
        write_jsonl(data / f"{sub}.jsonl", rows)
        for i in range(n):
            write_video(media / sub / f"{sub}_{i}.mp4", frames=3, size=16)
    task = get_task("mvbench", path=str(data), media_dir=str(media), subtasks=["action_sequence", "object_shuffle"])
    samples = list(task.samples())
    assert [s.id for s in samples] == ["action_sequence/0", "object_shuffle/0", "action_sequence/1", "action_sequence/2"]
    assert samples[0].answer == "B" and samples[0].video.shape[0] == 3
    assert task.prompt_text(samples[0]).startswith("Question: q0\nOption:\n(A) left\n(B) right")
    agg = task.aggregate(_records(task, samples, ["(B) right", "A", "B", "B"]))
    assert agg["subtasks"] == {"action_sequence": 1.0, "object_shuffle": 0.0}
    assert agg["accuracy"] == 0.5  # mean over subtasks, not 3/4 over samples
    assert len(MVBENCH_SUBTASKS) == 20
    with pytest.raises(ValueError, match="unknown MVBench subtask"):
        get_task("mvbench", path=str(data), subtasks=["nope"])


# ----- hub ids from configuration ---------------------------------------------------------------------


def test_hub_calls_use_configured_ids_and_revisions():
    loader = FakeLoader({None: [{"question_id": 1, "question": "q", "answers": ["a"] * 10,
                                 "image": {"bytes": png_bytes(), "path": None}}]})
    task = get_task("vqav2", loader=loader, revision="0123abc")
    assert len(list(task.samples())) == 1
    assert loader.calls == [(("lmms-lab-encoder/VQAv2", None), {"split": "validation", "revision": "0123abc"})]

    img = {"bytes": png_bytes(), "path": None}
    loader = FakeLoader({"testdev_balanced_instructions": [{"id": "q", "imageId": "i1", "question": "?", "answer": "x"}],
                         "testdev_balanced_images": [{"id": "i1", "image": img}]})
    (s,) = get_task("gqa", loader=loader).samples()
    assert s.images and "media_error" not in s.meta
    assert [c[0] for c in loader.calls] == [("lmms-lab-encoder/GQA", "testdev_balanced_instructions"),
                                           ("lmms-lab-encoder/GQA", "testdev_balanced_images")]
    assert all(c[1] == {"split": "testdev", "revision": "main"} for c in loader.calls)

    loader = FakeLoader()
    list(get_task("nextqa", loader=loader, media_dir="/nonexistent").samples())
    assert loader.calls == [(("lmms-eval/NExTQA", "MC"), {"split": "test", "revision": "main"})]

    loader = FakeLoader()
    list(get_task("mvbench", loader=loader, media_dir="/nonexistent").samples())
    assert [c[0] for c in loader.calls] == [("lmms-eval/MVBench", s) for s in MVBENCH_SUBTASKS]


def test_hub_videos_need_a_media_dir():
    row = {"question": "q", "a0": "x", "a1": "y", "a2": "z", "a3": "w", "a4": "v", "answer": 0, "video": 5, "qid": 1}
    (s,) = get_task("nextqa", loader=FakeLoader({"MC": [row]})).samples()
    assert "media_dir" in s.meta["media_error"]


def test_sources_are_configurable_not_hard_coded(tmp_path, monkeypatch):
    override = tmp_path / "datasets.json"
    override.write_text(json.dumps({"namespaces": {"image": "my-mirror"},
                                    "tasks": {"docvqa": {"revision": "v2", "split": "test"}}}))
    monkeypatch.setenv("TOKENREDUCE_DATASETS", str(override))
    src = resolve_source("docvqa")
    assert (src.path, src.name, src.split, src.revision) == ("my-mirror/DocVQA", "DocVQA", "test", "v2")
    assert resolve_source("nextqa").path == "lmms-eval/NExTQA"  # video namespace untouched
    assert resolve_source("docvqa", path="org/DocVQA-copy", revision="abc").path == "org/DocVQA-copy"
    with pytest.raises(TypeError, match="unknown data option"):
        resolve_source("docvqa", colour="red")
    with pytest.raises(ValueError, match="no dataset configured"):
        resolve_source("nope")
    monkeypatch.setenv("TOKENREDUCE_DATASETS", str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="TOKENREDUCE_DATASETS"):
        resolve_source("docvqa")
