"""Prompting, answer parsing, the metric, and batched greedy prediction."""

import pytest
import torch

from tokenreduce.eval import Sample
from tokenreduce.eval.predict import predict
from tokenreduce.eval.synthetic import (
    build_processor,
    encode,
    encode_batch,
    exact_match,
    load_synthetic,
    normalize_answer,
    parse_answer,
    prompt,
    score,
)

VISUAL_TOKENS = {"image": 256, "document": 744, "video": 577}


@pytest.fixture(scope="module")
def processors():
    return {kind: build_processor(kind) for kind in VISUAL_TOKENS}


def test_normalisation_and_metric():
    assert normalize_answer(" Red .") == "red"
    assert normalize_answer("") == ""
    assert parse_answer("left </s> up") == "left"
    assert parse_answer("3, because") == "3"
    assert exact_match("YES", "yes") and not exact_match("no", "yes")
    samples = [Sample(id=str(i), task="t", modality="image", question="q", answer=a, meta={"category": c})
               for i, (a, c) in enumerate([("red", "colour"), ("2", "count"), ("yes", "presence"), ("1", "count")])]
    result = score(samples, ["red", "2", "no", "3"])
    assert result == {"all": 0.5, "colour": 1.0, "count": 0.5, "presence": 0.0}
    with pytest.raises(ValueError, match="predictions"):
        score(samples, ["red"])


@pytest.mark.parametrize("kind", list(VISUAL_TOKENS))
def test_encode_puts_the_question_before_the_visual_tokens(kind, processors):
    processor = processors[kind]
    sample = load_synthetic(kind, "test", 1)[0]
    inputs = encode(sample, processor)
    ids = inputs["input_ids"][0].tolist()
    placeholder = processor.tokenizer.convert_tokens_to_ids("<video>" if kind == "video" else "<image>")
    assert ids.count(placeholder) == VISUAL_TOKENS[kind]
    first = ids.index(placeholder)
    question = processor.tokenizer(sample.question)["input_ids"]
    assert ids[:first] == question  # BOS + question, then the visual tokens, then "answer :"
    assert processor.tokenizer.convert_ids_to_tokens(ids[-2:]) == ["answer", ":"]
    assert prompt(sample).startswith(sample.question)
    pixel_key = "pixel_values_videos" if kind == "video" else "pixel_values"
    assert pixel_key in inputs


def test_encode_batch_pads_on_the_left(processors):
    samples = load_synthetic("image", "test", 5)
    lengths = [len(processors["image"].tokenizer(s.question)["input_ids"]) for s in samples]
    assert len(set(lengths)) > 1
    inputs = encode_batch(samples, processors["image"])
    assert inputs["pixel_values"].shape[0] == 5
    mask = inputs["attention_mask"]
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()
    with pytest.raises(ValueError, match="one modality"):
        encode_batch([samples[0], load_synthetic("video", "test", 1)[0]], processors["image"])


class _ScriptedModel:
    """Stands in for a VLM: ``generate`` returns the prompt, then ``reply`` and padding, like transformers."""

    def __init__(self, tokenizer, reply: list[str]):
        self.tokenizer = tokenizer
        self.reply = reply
        self.calls: list[int] = []

    def generate(self, input_ids, attention_mask=None, max_new_tokens=4, **kwargs):
        self.calls.append(input_ids.shape[0])
        rows = []
        for r in range(input_ids.shape[0]):
            words = [*self.reply, self.tokenizer.eos_token, self.tokenizer.pad_token][:max_new_tokens]
            if r % 2:  # a row that stops early is padded
                words = [self.reply[0], self.tokenizer.eos_token] + [self.tokenizer.pad_token] * (max_new_tokens - 2)
            rows.append(self.tokenizer.convert_tokens_to_ids(words))
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_predict_decodes_only_the_new_tokens_in_order(processors):
    processor = processors["image"]
    samples = load_synthetic("image", "test", 5)
    model = _ScriptedModel(processor.tokenizer, ["red", "circle"])
    out = predict(model, processor, samples, batch_size=2, max_new_tokens=4)
    assert model.calls == [2, 2, 1]
    assert out == ["red circle", "red", "red circle", "red", "red circle"]
    assert [parse_answer(o) for o in out] == ["red"] * 5
