"""Per-crop budgets reach the runner's records and the overlays."""

import numpy as np
import torch

from tokenreduce.eval.overlay import crop_labels, layout_from_dict, render_record, token_boxes
from tokenreduce.eval.runner import ModelSpec, Runner, read_records


def test_runner_records_crop_budgets_and_overlay_labels_each_crop(tmp_path):
    import transformers as T
    from PIL import Image

    from tokenreduce.eval.sample import Sample
    from tokenreduce.eval.task import FunctionTask
    from tokenreduce.testing.tiny import tiny_model, tiny_tokenizer

    model = tiny_model("llava_next", num_layers=2)
    image_processor = T.LlavaNextImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                                image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]],
                                                do_center_crop=False)
    processor = T.LlavaNextProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(), patch_size=14,
                                     vision_feature_select_strategy="default", num_additional_image_tokens=1)
    rng = np.random.default_rng(0)
    page = np.full((28, 56, 3), 230, dtype=np.uint8)  # left half flat, right half glyphs
    glyphs = rng.random((28, 28)) < 0.35
    page[:, 28:][glyphs] = 0
    sample = Sample(id="0", task="pages", modality="image", question="w5 w6", answer="w7",
                    images=[Image.fromarray(page)])
    task = FunctionTask("pages", load=lambda split, limit: iter([sample]), score=lambda p, s: float(p == s.answer))
    Runner(task, [ModelSpec("tiny-next", factory=lambda: (model, processor), device="cpu")],
           ["doc_correlation"], [0.5], name="budgets", out_dir=tmp_path, progress=False, plots=False, warmup=0,
           keep_maps=1, method_options={"doc_correlation": {"shallow_layer": 0}}).run()
    (record,) = read_records(tmp_path / "budgets").values()
    item = record["kept"]["items"][0]
    crops = {c["crop"]: c for c in item["info"]["crops"]}
    assert [c["kind"] for c in crops.values()] == ["base", "crop", "crop"]
    assert crops[1]["budget"] == 1 and crops[2]["budget"] > 1  # flat left crop: the minimum
    layout = layout_from_dict(item["layout"])
    boxes = token_boxes(layout, (28, 56), "stretch")
    canvas = layout.segment_slices()[1]
    masked = np.where(np.isin(np.arange(layout.num_tokens), np.arange(canvas.start, canvas.stop))[:, None], boxes,
                      np.nan)
    labels = crop_labels(item["info"], masked)
    assert [text for _, text, _ in labels] == [f"c1 {crops[1]['kept']}/{crops[1]['tokens']}",
                                               f"c2 {crops[2]['kept']}/{crops[2]['tokens']}"]
    (left, _, _), (right, _, _) = labels
    assert left == (0.0, 0.0, 28.0, 28.0) and right == (28.0, 0.0, 56.0, 28.0)
    (picture,) = render_record(record, sample, side=64)
    assert picture.size[0] == 128 and torch.tensor(np.asarray(picture)).float().std() > 0
