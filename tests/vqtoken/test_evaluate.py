"""The evaluation script end to end on a tiny model: one runner grid, adaptive modes, the VQToken table."""

import json

import torch

from research.vqtoken.evaluate import evaluate
from tests.eval_runner.helpers import ShapesTask
from tokenreduce.adapters import get_adapter
from tokenreduce.core.lowrank import llm_linear_layers
from tokenreduce.plugins.vqtoken import VQAttention, VQAttentionConfig


def _factory():
    from tokenreduce.testing.tiny import tiny_model, tiny_processor

    return tiny_model("qwen2_vl"), tiny_processor("qwen2_vl")


def test_evaluate_runs_the_grid_and_writes_the_table(tmp_path):
    model, _ = _factory()
    adapted = llm_linear_layers(get_adapter(model).language_model, ("q_proj",))
    module = VQAttention(
        VQAttentionConfig(dim=64, hidden=16, bins=(2, 2, 2), llm_rank=2, llm_modules=adapted)
    )
    with torch.no_grad():
        module.out.weight.normal_(0, 0.2)
    module.save_pretrained(tmp_path / "attn")
    result = evaluate(
        _factory,
        ShapesTask("video", n=2, size=56),
        attention=str(tmp_path / "attn"),
        budget=0.5,
        name="grid",
        out_dir=tmp_path,
        split=None,
        limit=2,
        batch_size=2,
        methods=("none", "vqtoken", "vqtoken_codebook", "random", "tome", "tome_projector"),
        model_name="tiny-qwen",
        adaptive=[{"adaptive": "silhouette", "k_min": 2, "k_max": 3}],
        progress=False,
    )
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {
        "none", "vqtoken", "vqtoken_codebook", "random", "tome_projector", "vqtoken adaptive silhouette"
    }
    assert rows["tome_projector"]["tokens"] == rows["random"]["tokens"] == 4.0
    assert rows["none"]["tokens"] == 8.0 and rows["vqtoken"]["tokens"] <= 4.0  # 2 x 2 x 2 merged patches
    assert 2.0 <= rows["vqtoken adaptive silhouette"]["tokens"] <= 3.0
    for r in rows.values():
        assert r["tokdense"] is None or abs(r["tokdense"] - 100 * r["accuracy"] / r["tokens"]) < 1e-9
    assert "tome" in (tmp_path / "grid" / "vqtoken.md").read_text()  # skipped: not supported on this family
    saved = json.loads((tmp_path / "grid" / "vqtoken.json").read_text())
    assert saved["full_accuracy"] == rows["none"]["accuracy"]
    assert saved["llm_rank"] == 2 and "rank-2 adapters" in result["table"]  # said under the table
    assert bool(saved["checks"]) == bool(saved["full_accuracy"])  # checks need a non-zero full accuracy
    summary = json.loads((tmp_path / "grid" / "summary.json").read_text())
    assert all("tokdense" in c for c in summary["cells"])
