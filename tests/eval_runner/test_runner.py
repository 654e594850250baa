"""The runner on a tiny LLaVA: records, errors, resume, batching, KV bytes, summaries, plots."""

from __future__ import annotations

import json

import pytest
import torch

import tokenreduce as tr
from tests.eval_runner.helpers import png_bytes, write_parquet
from tokenreduce.eval.runner import ModelSpec, Runner, make_cells, read_records
from tokenreduce.eval.task import collate
from tokenreduce.eval.tasks import get_task

METHODS = ["none", "pool", "fastv"]


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    """Four VQAv2 rows in the hub schema: three images of different sizes and one corrupt image."""
    root = tmp_path_factory.mktemp("vqav2")
    rows = []
    for i, (colour, size) in enumerate([((200, 0, 0), (40, 60)), ((0, 200, 0), (64, 64)),
                                        ((0, 0, 200), (70, 30)), (None, None)]):
        image = {"bytes": png_bytes(colour, size) if colour else b"\x89PNG broken", "path": f"{i}.png"}
        rows.append({"question_id": i, "question": f"w{10 + i} w11 w12" if i % 2 else "w13 w14",
                     "answers": [f"w{20 + i}"] * 10, "multiple_choice_answer": f"w{20 + i}",
                     "answer_type": "other", "image": image})
    write_parquet(root / "validation.parquet", rows)
    return root


def _spec(tiny_llava):
    model, processor = tiny_llava
    return ModelSpec("tiny-llava", factory=lambda: (model, processor), device="cpu")


def _runner(tiny_llava, vqa_dir, out, **kw):
    task = get_task("vqav2", path=str(vqa_dir))
    options = dict(name="grid", out_dir=out, batch_size=2, progress=False, warmup=1, keep_maps=1,
                   task_options={"path": str(vqa_dir)})
    options.update(kw)
    methods = options.pop("methods", METHODS)
    return Runner(task, [_spec(tiny_llava)], methods, [0.5], **options)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_grid_records_errors_summary_and_plots(tiny_llava, vqa_dir, tmp_path):
    runner = _runner(tiny_llava, vqa_dir, tmp_path)
    summary = runner.run()
    records = _lines(tmp_path / "grid" / "records.jsonl")
    assert len(records) == 12 and len({r["key"] for r in records}) == 12
    errors = [r for r in records if r["error"]]
    assert len(errors) == 3 and {r["sample_id"] for r in errors} == {"3"}
    assert all(r["error_stage"] == "encode" and "decode" in r["error"] for r in errors)
    ok = {(r["method"], r["sample_id"]): r for r in records if not r["error"]}
    for (method, _), r in ok.items():
        assert r["visual_tokens_in"] == 16  # 56 px / 14 -> 4 x 4 patch grid
        assert r["ttft_ms"] > 0 and r["new_tokens"] >= 1 and r["kv_cache_bytes"] > 0
        assert r["peak_memory_bytes"] > 0 and r["memory_kind"].startswith("cpu")
        assert r["batch_size"] in (1, 2)
        if method == "none":
            assert r["visual_tokens_out"] == 16 and r["prefill_flops"] == r["prefill_flops_full"]
            assert r["config"] is None
        else:
            assert r["prefill_flops"] < r["prefill_flops_full"]
            assert r["config"]["method"] == method
    assert ok[("pool", "0")]["visual_tokens_out"] == 9  # pooled 3 x 3 grid at a 50% budget
    assert ok[("fastv", "0")]["layers"] and ok[("fastv", "0")]["visual_tokens_llm_input"] == 16
    kept = [r for r in records if r.get("kept")]
    assert {r["method"] for r in kept} == {"pool", "fastv"}  # one map per reduced cell (keep_maps=1)
    fastv_map = next(r["kept"] for r in kept if r["method"] == "fastv")
    assert fastv_map["layers"] and fastv_map["items"][0]["fit"] == "center_crop"
    # The summary: one row per cell, errors counted, the agreement with the unreduced model, plots.
    cells = {c["method"]: c for c in summary["cells"]}
    assert set(cells) == set(METHODS)
    assert all(c["samples"] == 4 and c["errors"] == 1 for c in cells.values())
    assert cells["none"]["agreement_with_none"] == 1.0
    assert cells["pool"]["visual_tokens_out"] == 9.0 and cells["pool"]["prefill_flops_ratio"] < 1
    assert "accuracy" in cells["none"]["metrics"]
    table = (tmp_path / "grid" / "table.md").read_text()
    assert table.count("| tiny-llava |") == 3
    for png in ("accuracy_vs_tokens.png", "prefill_vs_tokens.png"):
        assert (tmp_path / "grid" / png).stat().st_size > 1000
    assert json.loads((tmp_path / "grid" / "summary.json").read_text())["task"] == "vqav2"


def test_resume_skips_finished_keys_and_counts_none_twice(tiny_llava, vqa_dir, tmp_path):
    _runner(tiny_llava, vqa_dir, tmp_path).run()
    path = tmp_path / "grid" / "records.jsonl"
    first = {r["key"]: r for r in _lines(path)}
    lines = path.read_text().splitlines(keepends=True)
    # Interrupted: five records made it to disk, the sixth only half.
    path.write_text("".join(lines[:5]) + lines[5][: len(lines[5]) // 2])
    calls = []
    model = tiny_llava[0]
    original = model.generate
    model.generate = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    try:
        _runner(tiny_llava, vqa_dir, tmp_path, warmup=0).run()
    finally:
        del model.generate
    records = read_records(tmp_path / "grid")
    assert set(records) == set(first)
    complete = []
    for line in path.read_text().splitlines():
        try:
            complete.append(json.loads(line)["key"])
        except json.JSONDecodeError:
            continue
    assert len(complete) == len(set(complete)) == 12  # nothing counted twice
    assert 0 < len(calls) < 6  # only the missing samples ran again
    for key, rec in records.items():
        assert rec["prediction"] == first[key]["prediction"]
    # Adding a method later runs only the new cell.
    summary = _runner(tiny_llava, vqa_dir, tmp_path, methods=[*METHODS, "random"], warmup=0).run()
    assert len(read_records(tmp_path / "grid")) == 16
    assert {c["method"] for c in summary["cells"]} == {*METHODS, "random"}


def test_batched_equals_unbatched_and_kv_bytes_match_the_cache(tiny_llava, vqa_dir, tmp_path):
    _runner(tiny_llava, vqa_dir, tmp_path / "b2", batch_size=2, warmup=0).run()
    _runner(tiny_llava, vqa_dir, tmp_path / "b1", batch_size=1, warmup=0).run()
    two = read_records(tmp_path / "b2" / "grid")
    one = read_records(tmp_path / "b1" / "grid")
    assert set(one) == set(two)
    for key, rec in one.items():
        assert rec["prediction"] == two[key]["prediction"], key
        assert rec.get("visual_tokens_out") == two[key].get("visual_tokens_out")
        if rec["error"] is None:
            # batch of one, no padding: the analytic per-sample KV bytes equal the cache's allocation
            assert rec["kv_cache_bytes"] == rec["kv_cache_bytes_batch"], key


def test_runner_text_equals_direct_generate(tiny_llava, vqa_dir, tmp_path):
    model, processor = tiny_llava
    _runner(tiny_llava, vqa_dir, tmp_path, methods=["pool"], warmup=0).run()
    rec = read_records(tmp_path / "grid")["tiny-llava|pool|0.5|1"]
    task = get_task("vqav2", path=str(vqa_dir))
    sample = next(s for s in task.samples() if s.id == "1")
    inputs = collate([task.encode(sample, processor, "llava")], processor.tokenizer.pad_token_id)
    tr.wrap(model, tr.PoolConfig.at_budget(0.5, num_layers=4))
    try:
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=task.max_new_tokens, do_sample=False,
                                 eos_token_id=processor.tokenizer.eos_token_id,
                                 pad_token_id=processor.tokenizer.pad_token_id)
    finally:
        tr.unwrap(model)
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    if processor.tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(processor.tokenizer.eos_token_id) + 1]
    assert rec["text"] == processor.tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_unreachable_budget_skips_the_cell_and_bad_arguments_fail(tiny_llava, vqa_dir, tmp_path):
    summary = _runner(tiny_llava, vqa_dir, tmp_path, methods=["none", "fastv"],
                      method_options={"fastv": {"layer": 9}}, warmup=0).run()
    assert [c["method"] for c in summary["cells"]] == ["none"]
    assert "fastv" in next(iter(summary["skipped_cells"]))
    assert "Skipped cells" in (tmp_path / "grid" / "table.md").read_text()
    with pytest.raises(ValueError, match="unknown method"):
        make_cells(["pool", "tome9"], [0.5])
    with pytest.raises(ValueError, match="budgets"):
        make_cells(["pool"], [1.5])
    with pytest.raises(ValueError, match="batch_size"):
        _runner(tiny_llava, vqa_dir, tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="method_options"):
        _runner(tiny_llava, vqa_dir, tmp_path, method_options={"pdrop": {}})
    other = get_task("docvqa", path=str(vqa_dir))
    with pytest.raises(ValueError, match="holds a run of task 'vqav2'"):
        Runner(other, [_spec(tiny_llava)], ["none"], name="grid", out_dir=tmp_path, progress=False).run()


def test_function_task_plugs_in_and_duplicate_ids_fail(tiny_llava, tmp_path):
    from tests.eval_runner.helpers import ShapesTask
    from tokenreduce.eval.task import FunctionTask

    shapes = ShapesTask("image", n=2)
    task = FunctionTask(
        "shapes", load=lambda split, limit: shapes.samples(split, limit),
        score=lambda pred, s: float(pred == s.answer), parse=lambda text, s: text.split()[0] if text else "",
        prompt=lambda s: f"{s.question} answer :", max_new_tokens=2,
    )
    summary = Runner(task, [_spec(tiny_llava)], ["none"], name="fn", out_dir=tmp_path, progress=False,
                     plots=False).run()
    records = list(read_records(tmp_path / "fn").values())
    assert len(records) == 2 and all(r["new_tokens"] == 2 and r["error"] is None for r in records)
    assert summary["cells"][0]["metrics"]["scored"] == 2

    def duplicated(split, limit):
        for s in shapes.samples(split, limit):
            s.id = "same"
            yield s

    twice = FunctionTask("twice", load=duplicated, score=lambda pred, s: 0.0)
    with pytest.raises(ValueError, match="twice"):
        Runner(twice, [_spec(tiny_llava)], ["none"], name="dup", out_dir=tmp_path, progress=False).run()


def test_anyres_llava_next_batches_pad_crops_and_overlays_render(tmp_path):
    import numpy as np
    import transformers as T
    from PIL import Image

    from tokenreduce.eval.overlay import render_record
    from tokenreduce.eval.sample import Sample
    from tokenreduce.eval.task import FunctionTask
    from tokenreduce.testing.tiny import tiny_model, tiny_tokenizer

    model = tiny_model("llava_next", num_layers=4)
    image_processor = T.LlavaNextImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                                image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]])
    processor = T.LlavaNextProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(), patch_size=14,
                                     vision_feature_select_strategy="default", num_additional_image_tokens=1)
    rng = np.random.default_rng(0)
    pages = [Sample(id=str(i), task="pages", modality="image", question="w5 w6", answer="w7",
                    images=[Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))])
             for i, (h, w) in enumerate([(30, 60), (50, 50), (60, 20)])]
    task = FunctionTask("pages", load=lambda split, limit: iter(pages[:limit]), score=lambda p, s: float(p == s.answer))
    spec = ModelSpec("tiny-next", factory=lambda: (model, processor), device="cpu")
    for batch in (3, 1):
        Runner(task, [spec], ["none", "pool"], [0.5], name=f"b{batch}", out_dir=tmp_path, batch_size=batch,
               progress=False, plots=False, warmup=0, keep_maps=3).run()
    three, one = read_records(tmp_path / "b3"), read_records(tmp_path / "b1")
    assert set(three) == set(one) and len(three) == 6
    for key, rec in three.items():
        assert rec["error"] is None and rec["batch_size"] == 3
        assert rec["prediction"] == one[key]["prediction"] and rec["visual_tokens_in"] == one[key]["visual_tokens_in"]
    assert len({three[f"tiny-next|none|-|{i}"]["visual_tokens_in"] for i in range(3)}) == 3  # crops differ per image
    pooled = three["tiny-next|pool|0.5|0"]
    kinds = [seg["kind"] for seg in pooled["kept"]["items"][0]["layout"]["segments"]]
    assert kinds == ["base", "crop"] and pooled["kept"]["items"][0]["fit"] == "stretch"
    (picture,) = render_record(pooled, pages[0], side=64)
    assert picture.size[0] == 128  # base panel | canvas panel


def test_generation_failure_is_recorded_and_the_run_goes_on(tiny_llava, tmp_path):
    """A sample whose inputs encode but whose generation fails (one image placeholder more than its image
    has features) gets a "generate" error record in every cell; the warm-up and the other samples go on."""
    from tests.eval_runner.helpers import ShapesTask
    from tokenreduce.eval.task import FunctionTask
    from tokenreduce.testing.tiny import IMAGE_TOKEN

    shapes = ShapesTask("image", n=3)

    def encode(sample, processor, family):
        inputs = shapes.encode(sample, processor, family)
        if sample.id.endswith("-1"):
            extra = torch.tensor([[IMAGE_TOKEN]], dtype=inputs["input_ids"].dtype)
            inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], dim=1)
        return inputs

    task = FunctionTask("broken", load=lambda split, limit: shapes.samples(split, limit), encode=encode,
                        score=lambda pred, s: float(pred == s.answer), max_new_tokens=2)
    summary = Runner(task, [_spec(tiny_llava)], ["none", "pool"], [0.5], name="gen", out_dir=tmp_path,
                     batch_size=2, warmup=1, progress=False, plots=False).run()
    records = list(read_records(tmp_path / "gen").values())
    assert len(records) == 6
    failed = [r for r in records if r["error"]]
    assert sorted((r["method"], r["sample_id"]) for r in failed) == [("none", "shapes-image-1"), ("pool", "shapes-image-1")]
    for r in failed:
        assert r["error_stage"] == "generate" and r["prediction"] is None and r["score"] is None
        assert r["error"].startswith("ValueError: ")
    assert all(r["new_tokens"] == 2 and r["error"] is None for r in records if r not in failed)
    # the sample batched with the failing one was retried alone: it ran in a batch of one
    assert {r["sample_id"]: r["batch_size"] for r in records if r not in failed and r["method"] == "none"} == {
        "shapes-image-0": 1, "shapes-image-2": 1}
    assert [(c["method"], c["samples"], c["errors"]) for c in summary["cells"]] == [("none", 3, 1), ("pool", 3, 1)]


def test_max_new_tokens_zero_is_refused_not_replaced(tiny_llava, vqa_dir, tmp_path):
    with pytest.raises(ValueError, match=r"^`max_new_tokens` must be an int >= 1 or None \(the task's\), got 0$"):
        _runner(tiny_llava, vqa_dir, tmp_path, max_new_tokens=0)
    assert _runner(tiny_llava, vqa_dir, tmp_path, max_new_tokens=1).max_new_tokens == 1
    assert _runner(tiny_llava, vqa_dir, tmp_path).max_new_tokens == get_task("vqav2", path=str(vqa_dir)).max_new_tokens
