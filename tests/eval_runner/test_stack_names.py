"""Stacks named as text where a method is named: the eval grid (and its YAML), the CLI's name checks, lmms-eval."""

from __future__ import annotations

import pytest

import tokenreduce as tr
from tests.eval_runner.helpers import png_bytes, write_parquet
from tokenreduce.cli import UsageError, check_names
from tokenreduce.core.api import get_handle
from tokenreduce.core.stack import stack_config
from tokenreduce.eval.runner import ModelSpec, Runner, make_cells, read_records
from tokenreduce.eval.tasks import get_task


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqav2")
    rows = [{"question_id": i, "question": "w13 w14", "answers": ["w20"] * 10, "answer_type": "other",
             "image": {"bytes": png_bytes((40 * i, 0, 0), (40, 60)), "path": None}} for i in range(2)]
    write_parquet(root / "validation.parquet", rows)
    return root


def test_a_stack_cell_runs_with_per_method_options(tiny_llava, vqa_dir, tmp_path):
    model, processor = tiny_llava
    runner = Runner(get_task("vqav2", path=str(vqa_dir)),
                    [ModelSpec("tiny", factory=lambda: (model, processor), device="cpu")],
                    ["divprune+fastv", "fastv"], [0.5], name="grid", out_dir=tmp_path, batch_size=2,
                    progress=False, warmup=0, plots=False, method_options={"fastv": {"query": "text"}})
    runner.run()
    assert get_handle(model) is None
    records = list(read_records(tmp_path / "grid").values())
    stacked = [r for r in records if r["method"] == "divprune+fastv"]
    alone = [r for r in records if r["method"] == "fastv"]
    assert len(stacked) == len(alone) == 2 and all(r["error"] is None for r in records)
    # fastv's options reach it alone and in the stack; the stack splits the budget in equal factors
    expected = stack_config("divprune+fastv", 0.5, 4, fastv={"query": "text"})
    assert stacked[0]["config"] == expected.to_dict()
    assert expected.configs[0].keep == pytest.approx(0.5 ** 0.5) and expected.configs[1].query == "text"
    assert alone[0]["config"]["query"] == "text"
    assert stacked[0]["visual_tokens_out"] < alone[0]["visual_tokens_out"]


@pytest.mark.parametrize("methods, message", [
    (["divprune+pool"], "methods 'divprune' and 'pool' act in the projector stage"),
    (["divprune+fastvv"], "unknown method 'fastvv'"),
    (["divprune+"], "has an empty method name"),
])
def test_make_cells_refuses_a_bad_stack(methods, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        make_cells(methods, [0.25])


@pytest.mark.parametrize("methods, options, message", [
    (["divprune+fastvv"], {}, "unknown method 'fastvv'; did you mean 'fastv'?"),
    (["divprune+pool"], {}, "--methods divprune+pool: a stack takes at most one method per stage; methods "
                            "'divprune' and 'pool' act in the projector stage"),
    (["none+pool"], {}, "--methods none+pool: 'none' (the unreduced model) cannot be part of a stack"),
    (["divprune+"], {}, "--methods: stack 'divprune+' has an empty method name"),
    (["divprune+fastv"], {"pool": {"keep": 3}}, "--method-opt names method 'pool', which is not in --methods"),
    (["divprune+fastv"], {"fastv": {"kep": 3}}, "unknown fastv option 'kep'; did you mean 'keep'?"),
    (["divprune+fastv"], {"divprune": {"keep": 3}}, "multiple values for keyword argument 'keep'"),
])
def test_cli_names_of_stacks_fail_in_one_line(methods, options, message):
    with pytest.raises(UsageError) as info:
        check_names("synthetic-image", methods, options)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_accepts_a_stack_with_options_of_its_members():
    check_names("synthetic-image", ["none", "divprune+fastv", "pool"], {"fastv": {"query": "text", "layer": 1}})


def test_lmms_eval_model_args_name_a_stack(tiny_llava):
    pytest.importorskip("lmms_eval")
    from tokenreduce.eval.lmms import TokenReduceLMM

    model, processor = tiny_llava
    lm = TokenReduceLMM(pretrained="unused", model=model, processor=processor, device="cpu",
                        method="divprune+fastv", **{"divprune.keep": 0.5, "fastv.layer": 1, "fastv.keep": 2})
    try:
        assert lm.config == stack_config([tr.DivPruneConfig(keep=0.5), tr.FastVConfig(layer=1, keep=2)])
    finally:
        tr.unwrap(model)
    lm = TokenReduceLMM(pretrained="unused", model=model, processor=processor, device="cpu",
                        method="divprune+fastv", budget=0.25)
    try:
        assert tr.stats(model).budget == 0.25
        assert lm.config == stack_config("divprune+fastv", 0.25, model.config.text_config.num_hidden_layers)
    finally:
        tr.unwrap(model)


@pytest.mark.parametrize("name", ["image", "document", "video"])
def test_the_stack_benchmark_grids_are_valid(name):
    """The equal-FLOPs grids of benchmarks/stacks/ load and name only known methods and valid stacks."""
    from pathlib import Path

    from tokenreduce.cli import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "benchmarks" / "stacks" / f"{name}.yaml")
    check_names(cfg["task"], cfg["methods"], cfg.get("method_options", {}), cfg["budgets"])
    cells = make_cells(cfg["methods"], cfg["budgets"])
    assert any("+" in c.method for c in cells) and cfg["limit"] >= 300
