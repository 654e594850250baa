"""from_pretrained loads model + processor from a local directory written by save_pretrained, and wraps."""

import numpy as np
import pytest
import torch
from PIL import Image

import tokenreduce as tr
from tokenreduce.core.api import get_handle
from tokenreduce.testing.tiny import tiny_model, tiny_processor


def _image(h=70, w=90, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_round_trip_through_local_directory(tmp_path, family):
    original = tiny_model(family)
    processor = tiny_processor(family)
    original.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    model, loaded_processor = tr.from_pretrained(tmp_path, "pool", keep=0.25)
    assert get_handle(model).spec.name == "pool"
    assert type(loaded_processor) is type(processor)
    inputs = loaded_processor(images=[_image()], text=["w5 w6 <image> w7 w8"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert tr.stats(model).samples[0].visual_tokens_out < tr.stats(model).samples[0].visual_tokens_in

    tr.unwrap(model)
    with torch.no_grad():
        reference = original.eval()(**inputs).logits
        assert torch.allclose(model(**inputs).logits, reference, atol=1e-5)


def test_method_config_saved_next_to_checkpoint(tmp_path):
    tiny_model("llava").save_pretrained(tmp_path)
    tiny_processor("llava").save_pretrained(tmp_path)
    tr.RandomConfig(keep=0.5, seed=4).save_pretrained(tmp_path)
    model, _ = tr.from_pretrained(tmp_path)
    assert get_handle(model).config == tr.RandomConfig(keep=0.5, seed=4)


def test_missing_method_is_explained(tmp_path):
    tiny_model("llava").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`method` is required"):
        tr.from_pretrained(tmp_path)
