"""ATP head training on real task data: answer batches, a training step, the command line end to end."""

import json

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.api import get_handle
from tokenreduce.eval.sample import Sample
from tokenreduce.eval.synthetic import build_processor, iter_synthetic
from tokenreduce.eval.synthetic import encode as encode_synthetic
from tokenreduce.eval.synthetic.models import build_model
from tokenreduce.eval.task import FunctionTask
from tokenreduce.eval.tasks import get_task
from tokenreduce.eval.training_data import IGNORE_INDEX, answer_batches
from tokenreduce.plugins.atp import ATPConfig
from tokenreduce.plugins.atp.training import main, train_heads

STAGES = ["--layers", "1", "2", "4", "--spatial-rates", "0.1", "0.05", "0.0"]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic-llava-image")
    build_model("image").save_pretrained(path)
    build_processor("image").save_pretrained(path)
    return path


def _check_labels(batch, samples, tokenizer, task, processor, family):
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert labels.shape == ids.shape
    for row, sample in enumerate(samples):
        supervised = labels[row] != IGNORE_INDEX
        assert torch.equal(labels[row][supervised], ids[row][supervised])
        assert tokenizer.decode(labels[row][supervised]) == f"{sample.answer} {tokenizer.eos_token}"
        n = int(supervised.sum())
        assert bool(supervised[-n:].all()), "the answer and EOS end the row (left padding)"
        # what precedes the answer is exactly what the runner feeds the model
        prompt = task.encode(sample, processor, family)["input_ids"][0]
        torch.testing.assert_close(ids[row][mask[row].bool()][:-n], prompt)
        assert not bool(mask[row][: ids.shape[1] - mask[row].sum()].any())


def test_answer_batches_supervise_answer_and_eos_and_train_a_step(saved_model):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(saved_model, attn_implementation="eager")
    processor = AutoProcessor.from_pretrained(saved_model)
    task = get_task("synthetic-image")
    batches = answer_batches(task, processor, "llava", split="train", limit=5, batch_size=3, start=7)
    assert [len(b["input_ids"]) for b in batches] == [3, 2]
    assert batches[0]["pixel_values"].shape[0] == 3
    samples = list(iter_synthetic("image", "train", 7, 12))
    for i, batch in enumerate(batches):
        _check_labels(batch, samples[3 * i: 3 * i + 3], processor.tokenizer, task, processor, "llava")

    config = ATPConfig.at_budget(0.25, num_layers=6, layers=(1, 2, 4), spatial_rates=(0.1, 0.05, 0.0))
    heads, log = train_heads(model, batches[:1], config, steps=1, target=0.25, log_every=1)
    assert heads.layers == [1, 2, 4] and heads.spatial_rates == (0.1, 0.05, 0.0)
    assert log[0]["step"] == 0 and all(torch.isfinite(torch.tensor(v)) for v in log[0].values())
    assert any(bool(p.abs().sum() > 0) for m in heads.mlps for p in m[-1].parameters()), "the heads moved"
    assert all(not p.requires_grad for p in model.parameters())


def test_answer_batches_of_videos():
    processor = build_processor("video")
    task = get_task("synthetic-video")
    batches = answer_batches(task, processor, "llava_onevision", limit=2, batch_size=2)
    assert "pixel_values_videos" in batches[0] and batches[0]["pixel_values_videos"].shape[0] == 2
    _check_labels(batches[0], list(iter_synthetic("video", "train", 0, 2)), processor.tokenizer, task, processor,
                  "llava_onevision")


def test_samples_with_bad_media_are_skipped_and_counted():
    good = list(iter_synthetic("image", "train", 0, 3))
    broken = Sample(id="broken", task="t", modality="image", question="what colour is it ?", answer="red",
                    meta={"media_error": "unreadable file"})
    task = FunctionTask("mixed", lambda split, limit: [good[0], broken, *good[1:]][:limit],
                        score=lambda p, s: 1.0, encode=lambda s, p, f: encode_synthetic(s, p))
    with pytest.warns(UserWarning, match=r"skipped 1 of 4 mixed samples .*broken: unreadable file"):
        batches = answer_batches(task, build_processor("image"), "llava", limit=4, batch_size=8)
    assert len(batches[0]["input_ids"]) == 3
    with pytest.raises(ValueError, match="`batch_size` must be an int >= 1"):
        answer_batches(task, build_processor("image"), "llava", batch_size=0)


def test_main_trains_heads_that_wrap_loads(saved_model, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = tmp_path / "heads"
    assert main(["--model", str(saved_model), "--out", str(out), "--steps", "2", "--samples", "4",
                 "--batch-size", "2", "--log-every", "1", *STAGES]) == 0
    printed = capsys.readouterr().out
    assert "'step': 1" in printed and f"heads saved to {out}" in printed
    record = json.loads((out / "atp_training.json").read_text())
    assert [row["step"] for row in record["log"]] == [0, 1] and record["config"]["layers"] == [1, 2, 4]
    model = AutoModelForImageTextToText.from_pretrained(saved_model).eval()
    processor = AutoProcessor.from_pretrained(saved_model)
    inputs = encode_synthetic(next(iter_synthetic("image", "test", 0, 1)), processor)
    tr.wrap(model, "atp", heads=str(out))  # the heads' own layers and spatial rates
    try:
        method = get_handle(model).method
        assert method.layers == [1, 2, 4] and method.spatial_rates == (0.1, 0.05, 0.0)
        with torch.no_grad():
            model(**inputs)
        assert tr.stats(model).summary()["layer_mean_keep_ratio"] <= 1.0
    finally:
        tr.unwrap(model)


def test_main_reports_a_budget_the_default_stages_cannot_reach(saved_model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model", str(saved_model), "--out", str(tmp_path / "h"), "--steps", "1", "--target", "0.1"])
    assert "cannot reach 10%" in capsys.readouterr().err  # layer 1 alone sees every token: 1/6 > 10%
