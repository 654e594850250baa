"""The synthetic benchmark as a runner task: samples, the models' own prompt, scoring, media errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenreduce.eval.media import MediaError
from tokenreduce.eval.runner import ModelSpec, Runner, read_records
from tokenreduce.eval.synthetic import MODEL_NAMES, build_processor, load_model, load_synthetic, prompt
from tokenreduce.eval.synthetic import encode as encode_synthetic
from tokenreduce.eval.tasks import get_task, list_tasks
from tokenreduce.eval.tasks.synthetic import SyntheticTask


@pytest.mark.parametrize("kind", ["image", "document", "video"])
def test_samples_in_fixed_order_and_registered(kind):
    task = get_task(f"synthetic-{kind}")
    assert isinstance(task, SyntheticTask) and task.name == f"synthetic-{kind}" and task.split == "test"
    ids = [s.id for s in task.samples(None, 3)]
    assert ids == [s.id for s in load_synthetic(kind, "test", n=3)] == [s.id for s in task.samples("test", 3)]
    assert [s.id for s in task.samples("validation", 2)] == [s.id for s in load_synthetic(kind, "validation", n=2)]
    other = get_task(f"synthetic-{kind}", seed=1)
    assert [s.id for s in other.samples(None, 1)] == [f"{kind}-test-1-000000"]
    assert f"synthetic-{kind}" in list_tasks()


def test_bad_options_raise():
    with pytest.raises(ValueError, match="kind"):
        SyntheticTask("audio")
    with pytest.raises(ValueError, match="split"):
        SyntheticTask("image", split="dev")
    with pytest.raises(ValueError, match="seed"):
        SyntheticTask("image", seed=-1)
    with pytest.raises(ValueError, match="split"):
        next(SyntheticTask("image").samples("dev", 1))


@pytest.mark.parametrize("kind,family", [("image", "llava"), ("document", "llava_onevision"),
                                         ("video", "llava_onevision")])
def test_encode_uses_the_models_own_prompt(kind, family):
    task, processor = SyntheticTask(kind), build_processor(kind)
    sample = next(task.samples(None, 1))
    inputs = task.encode(sample, processor, family)
    expected = encode_synthetic(sample, processor)
    assert set(inputs) == set(expected)
    for key, value in expected.items():
        assert torch.equal(inputs[key], value) if torch.is_tensor(value) else inputs[key] == value
    ids = inputs["input_ids"][0].tolist()
    tokenizer = processor.tokenizer
    words = tokenizer.convert_ids_to_tokens(ids)
    assert " ".join(w for w in words if w not in (tokenizer.bos_token, "<image>", "<video>")) == \
        prompt(sample).replace(" <image>", "").replace(" <video>", "")
    assert words[-2:] == ["answer", ":"] and "<|im_start|>" not in words  # no chat template


def test_parse_score_and_aggregate():
    task = SyntheticTask("image")
    samples = list(task.samples(None, 5))  # one per category
    assert task.parse(" Red . </s>", samples[0]) == "red"
    assert task.score(samples[0].answer, samples[0]) == 1.0 and task.score("nothing", samples[0]) == 0.0
    predictions = [s.answer if i < 3 else "wrong" for i, s in enumerate(samples)]
    records = [{"prediction": p, "score": task.score(task.parse(p, s), s), "fields": task.record_fields(s)}
               for p, s in zip(predictions, samples)]
    assert [r["fields"]["category"] for r in records] == ["colour", "shape", "count", "presence", "position"]
    assert [r["fields"]["objects"] for r in records] == [len(s.meta["objects"]) for s in samples]
    summary = task.aggregate(records)
    assert summary["accuracy"] == pytest.approx(0.6) and summary["scored"] == 5
    assert summary["categories"] == {"colour": 1.0, "count": 1.0, "position": 0.0, "presence": 0.0, "shape": 1.0}


class _Corrupt(SyntheticTask):
    """The first samples of the split, the second one with broken media (as a loader would mark it)."""

    def samples(self, split=None, limit=None):
        for i, s in enumerate(super().samples(split, limit)):
            if i == 1 and self.kind == "video":
                s.video = np.zeros((0, 168, 168, 3), dtype=np.uint8)
            elif i == 1:
                s.meta["media_error"] = "cannot decode 1.png: UnidentifiedImageError"
            yield s


@pytest.mark.parametrize("kind", ["image", "video"])
def test_corrupt_media_is_reported_per_sample(kind, synthetic_models, tmp_path):
    task = _Corrupt(kind)
    with pytest.raises(MediaError):
        task.encode(list(task.samples(None, 2))[1], build_processor(kind), "llava")
    model = load_model(kind, synthetic_models / MODEL_NAMES[kind])
    spec = ModelSpec(MODEL_NAMES[kind], factory=lambda: model, device="cpu")
    summary = Runner(task, [spec], ["none", "pool"], [0.5], name="corrupt", out_dir=tmp_path, limit=3,
                     batch_size=2, keep_maps=0, progress=False, plots=False).run()
    records = read_records(tmp_path / "corrupt")
    assert len(records) == 6
    for rec in records.values():
        broken = rec["sample_id"].endswith("-000001")
        assert (rec["error"] is not None) == broken, rec["error"]
        if broken:
            assert rec["error"].startswith("MediaError") and rec["error_stage"] == "encode" and rec["score"] is None
            assert rec["fields"]["category"]
        else:
            assert rec["new_tokens"] <= task.max_new_tokens and rec["score"] in (0.0, 1.0)
    assert [(c["method"], c["samples"], c["errors"]) for c in summary["cells"]] == [("none", 3, 1), ("pool", 3, 1)]
