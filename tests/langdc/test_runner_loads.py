"""The evaluation runner builds LangDC's captioner once per run, not once per cell and chunk."""

from tests.eval_runner.helpers import ShapesTask
from tokenreduce.eval.runner import ModelSpec, Runner
from tokenreduce.plugins.langdc.captioner import Captioner
from tokenreduce.testing.tiny import tiny_processor


def test_a_run_loads_the_captioner_once(tmp_path, tiny_setup, monkeypatch):
    model, path, _ = tiny_setup("qwen2_vl")
    loads = []
    load = Captioner._load.__func__
    monkeypatch.setattr(Captioner, "_load", classmethod(lambda cls, *a: loads.append(a) or load(cls, *a)))
    spec = ModelSpec("tiny", factory=lambda: (model, tiny_processor("qwen2_vl")), device="cpu")
    # 4 videos in chunks of 2 samples and two langdc cells: 4 wraps with a captioner, one load.
    runner = Runner(ShapesTask("video", n=4, size=56), [spec], ["none", "langdc"], [0.25, 0.5], name="grid",
                    out_dir=tmp_path, batch_size=1, chunk_samples=2, progress=False, plots=False,
                    method_options={"langdc": {"captioner": path, "segment_frames": 1}})
    summary = runner.run()
    assert len(loads) == 1
    rows = [c for c in summary["cells"] if c["method"] == "langdc"]
    assert len(rows) == 2 and all(c["samples"] == 4 and c["errors"] == 0 for c in rows)
    assert Captioner.from_pretrained(path) is not Captioner.from_pretrained(path)  # outside a run: fresh loads
    assert len(loads) == 3
