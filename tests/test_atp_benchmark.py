"""benchmarks/atp_synthetic.py's comparison: relative to the original model, trained ATP on the tuned one."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "atp_synthetic.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("atp_synthetic", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cell(model, method, acc, kept=64.0, budget=0.25):
    return {"model": model, "method": method, "budget": None if method == "none" else budget, "primary": acc,
            "visual_tokens_in": 256, "visual_tokens_layer_mean": 256.0 if method == "none" else kept,
            "samples": 100, "errors": 0}


def test_one_model(bench):
    summary = {"cells": [_cell("m", "none", 0.9), _cell("m", "atp_trained", 0.89), _cell("m", "fastv", 0.7)]}
    rows, checks = bench.compare(summary, 0.25)
    assert [r["method"] for r in rows] == ["none", "atp_trained", "fastv"]
    assert rows[1]["relative"] == pytest.approx(0.89 / 0.9)
    assert checks == {"within_budget": True, "keeps_98_percent_of_none": True, "beats_fastv": True}


def test_tuned_model_is_compared_with_the_original_and_the_best_baseline(bench):
    summary = {"cells": [
        _cell("orig", "none", 0.9), _cell("orig", "fastv", 0.7), _cell("orig", "atp_trained", 0.6),
        _cell("tuned", "none", 0.95), _cell("tuned", "fastv", 0.88), _cell("tuned", "atp_trained", 0.885, kept=70.0),
    ]}
    rows, checks = bench.compare(summary, 0.25, "orig", "tuned")
    assert {(r["model"], r["method"]) for r in rows} == {(m, k) for m in ("orig", "tuned")
                                                          for k in ("none", "fastv", "atp_trained")}
    tuned = next(r for r in rows if r["model"] == "tuned" and r["method"] == "atp_trained")
    assert tuned["relative"] == pytest.approx(0.885 / 0.9)  # against the ORIGINAL unreduced model
    assert checks["keeps_98_percent_of_none"] and checks["beats_fastv"]
    assert not checks["within_budget"]  # 70 / 256 > 0.25 + slack
    summary["cells"][4]["primary"] = 0.9  # fastv on the tuned LLM beats trained ATP
    assert not bench.compare(summary, 0.25, "orig", "tuned")[1]["beats_fastv"]


def test_kept_by_objects_plot(bench, tmp_path):
    import json

    from PIL import Image

    lines = []
    for i in range(12):
        for method in ("atp", "atp_trained", "fastv"):
            lines.append({"key": f"{method}-{i}", "model": "m", "method": method, "fields": {"objects": 2 + i % 3},
                          "visual_tokens_layer_mean": 40.0 + 5 * (i % 3)})
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    path = bench.plot_kept_by_content(tmp_path)
    assert path is not None and Image.open(path).size[0] > 400
    (tmp_path / "records.jsonl").write_text(json.dumps({"key": "x", "model": "m", "method": "fastv"}) + "\n")
    assert bench.plot_kept_by_content(tmp_path) is None  # no ATP records: no plot
