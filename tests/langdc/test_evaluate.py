"""The LangDC evaluation end to end on a tiny model: both runner runs, FLOPs with the captioner, the table."""

import json

import pytest

from research.langdc.evaluate import evaluate
from tests.eval_runner.helpers import ShapesTask
from tokenreduce.testing.tiny import tiny_processor


class CaptionedShapes(ShapesTask):
    """The tiny video task with ground-truth segment captions (first segment static, second busy)."""

    def samples(self, split=None, limit=None):
        for s in super().samples(split, limit):
            s.meta["segment_captions"] = [{"caption": "nothing happens ."}, {"caption": "the red square moves right ."}]
            yield s


def test_evaluate_runs_both_grids_and_counts_the_captioner(tmp_path, tiny_setup):
    model, path, _ = tiny_setup("qwen2_vl")
    result = evaluate(lambda: (model, tiny_processor("qwen2_vl")),
                      CaptionedShapes("video", n=3, size=56), captioner=path, base_keep=0.25, name="grid",
                      out_dir=tmp_path, split=None, limit=3, batch_size=3, options={"segment_frames": 1}, model_name="tiny",
                      progress=False)
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["none", "langdc", "pool", "pool"]
    full, langdc, low, high = rows
    assert langdc["captioner_flops"] > 0 and langdc["total_flops"] > 0
    assert langdc["flops_vs_full"] == pytest.approx(langdc["total_flops"] / full["total_flops"])
    assert low["budget"] < high["budget"] and high["tokens"] >= max(low["tokens"], langdc["tokens"])
    content = result["caption_content"]
    assert content["segments"] == 6  # 3 videos x 2 segments, every caption matched to its ground truth
    assert content["mean_tokens_static"] is not None and content["mean_tokens_busy"] is not None
    saved = json.loads((tmp_path / "grid" / "langdc.json").read_text())
    assert saved["checks"] == result["checks"] and "langdc_at_most_50pct_of_full_flops" in saved["checks"]
    assert "Caption tokens per segment vs events" in (tmp_path / "grid" / "langdc.md").read_text()
