"""The ``tokenreduce`` command: eval (flags and config file), show (table and overlays), demo, bench."""

from __future__ import annotations

import json

import pytest

from tokenreduce.cli import main


def test_eval_from_flags_then_config_then_show_overlays(synthetic_models, tmp_path, capsys):
    image = synthetic_models / "synthetic-llava-image"
    args = ["eval", "--task", "synthetic-image", "--task-opt", "seed=0", "--limit", "3", "--model", f"tiny={image}",
            "--methods", "none", "pool", "fastv", "--budgets", "0.5", "--out", str(tmp_path), "--name", "cli",
            "--batch-size", "2", "--keep-maps", "1", "--quiet", "--threads", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "**tiny**" in out and "records, summary, table and plots" in out
    rows = [line.split(" | ")[:2] for line in out.splitlines() if line.startswith("| ") and " | method | " not in line
            and not line.startswith("| method")]
    assert rows == [["| none", "full"], ["| fastv", "50%"], ["| pool", "50%"]]  # the full model, then by budget
    run = tmp_path / "cli"
    spec = json.loads((run / "run.json").read_text())
    assert spec["task"] == "synthetic-image" and spec["task_options"] == {"seed": 0}
    assert len((run / "records.jsonl").read_text().splitlines()) == 9

    assert main(["show", str(run), "--overlays", "--stats"]) == 0
    out = capsys.readouterr().out
    overlays = sorted(p.name for p in (run / "overlays").glob("*.png"))
    assert overlays == ["tiny_fastv_0.5_image-test-0-000000_0.png", "tiny_pool_0.5_image-test-0-000000_0.png"]
    assert "| tiny | pool@0.5 |" in out and '"method"' not in out  # --stats: a table, not JSON

    config = tmp_path / "grid.yaml"
    config.write_text(f"name: from-config\ntask: synthetic-image\nlimit: 4\nmodels: [{{name: t, path: '{image}'}}]\n"
                      f"methods: [none, random]\nbudgets: [0.25]\nout: {tmp_path}\nbatch_size: 4\n")
    assert main(["eval", "--config", str(config), "--limit", "2", "--no-plots", "--quiet"]) == 0
    records = (tmp_path / "from-config" / "records.jsonl").read_text().splitlines()
    assert len(records) == 4  # --limit 2 overrides the file; two cells
    assert not list((tmp_path / "from-config").glob("*.png"))

    bad = tmp_path / "bad.yaml"
    bad.write_text("task: synthetic-image\ncolour: red\n")
    with pytest.raises(SystemExit, match="unknown key"):
        main(["eval", "--config", str(bad)])
    with pytest.raises(SystemExit, match="missing --model"):
        main(["eval", "--task", "synthetic-image", "--methods", "none"])
    with pytest.raises(SystemExit, match=r"METHOD\.OPTION"):
        main(["eval", "--task", "synthetic-image", "--model", str(image), "--methods", "pool", "--method-opt", "keep=3"])
    with pytest.raises(SystemExit, match="tiny processor"):
        main(["eval", "--task", "synthetic-image", "--model", "tiny:llava_next", "--methods", "none"])


def test_demo_runs_every_synthetic_family(synthetic_models, tmp_path, capsys):
    args = ["demo", "--samples", "2", "--methods", "none", "random", "--budgets", "0.1", "--models",
            str(synthetic_models), "--out", str(tmp_path), "--check-samples", "3", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for kind, model in (("image", "synthetic-llava-image"), ("document", "synthetic-onevision-document"),
                        ("video", "synthetic-onevision-video")):
        run = tmp_path / f"demo-{kind}"
        assert f"## demo-{kind} (synthetic-{kind}, 1 model(s), 2 samples)" in out
        section = out.split(f"## demo-{kind} ", 1)[1].split("\n## ", 1)[0]
        assert f"**{model}**" in section and "| random | 10% |" in section
        assert f"benchmark checks (3 test samples; {run / 'check'})" in out
        assert f"{model}: full-token accuracy" in out and f"{model}: random@0.1 loses" in out
        assert list((run / "overlays").glob("*.png")) and f"plots: {run / 'accuracy_vs_tokens.png'}" in out
        assert len((run / "records.jsonl").read_text().splitlines()) == 4
        assert len((run / "check" / "records.jsonl").read_text().splitlines()) == 6  # none, random@0.1
    assert out.count("FAIL  ") + out.count("PASS  ") == 6 and out.count("at 3 samples") == 3

    assert main([*args[:-3], "--samples", "1", "--check-samples", "0", "--quiet"]) == 0  # starts afresh
    out = capsys.readouterr().out
    assert len((tmp_path / "demo-video" / "records.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "demo-video" / "check").exists()
    assert out.count("benchmark checks (on the 1 samples above)") == 3 and out.count("at 1 samples") == 3
    with pytest.raises(SystemExit, match=r"`check` must be an int >= 0 or None, got -1"):
        main([*args[:-2], "-1", "--quiet"])


def test_bench_runs_the_shared_prefill_benchmark(tmp_path, monkeypatch, capsys):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from tokenreduce.eval import bench

    def small(size, dtype, device):  # the benchmark's model shrunk to test speed; same code path
        text = dict(model_type="llama", vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
        vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, image_size=336, patch_size=14)
        model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                          image_token_index=bench.IMAGE_TOKEN)).to(dtype).eval()
        model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
        return model

    monkeypatch.setattr(bench, "build_model", small)
    out = tmp_path / "bench.json"
    assert main(["bench", "--dtype", "float32", "--repeats", "1", "--decode-tokens", "1", "--methods", "pool-64",
                 "--out", str(out), "--threads", "1"]) == 0
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["rows"]] == ["full", "pool-64"]
    pool = report["rows"][1]
    assert pool["visual_tokens_layer_mean"] == 64 and pool["kv_cache_ratio"] < 0.5
    assert pool["direct"]["visual_tokens"] == 64 and pool["direct"]["prefill_ms"] > 0 and pool["of_direct"] > 0
    printed = capsys.readouterr().out
    assert "pool-64" in printed and "direct 64" in printed


def test_bench_direct_row_of_an_in_llm_method_follows_its_layers():
    # fastv at layer 2 keeping 64: the first two layers see all 576 visual tokens, the other two 64, so the
    # direct row times the unwrapped model at 576 and at 64 tokens, half the layers each (not at the mean).
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from tokenreduce.core.config import build_config
    from tokenreduce.eval import bench

    text = dict(model_type="llama", vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, image_size=336, patch_size=14)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                      image_token_index=bench.IMAGE_TOKEN)).eval()
    model.generation_config.pad_token_id = 0
    batch = bench.inputs(model, "cpu", torch.float32)
    per_layer = bench.visual_tokens_per_layer(model, batch, build_config("fastv", layer=2, keep=64))
    assert per_layer == [576, 576, 64, 64]
    assert bench.direct_mix(per_layer) == {576: 0.5, 64: 0.5}
    assert bench.direct_mix([7, 37, 37, 209]) == {7: 0.25, 37: 0.5, 209: 0.25}


def test_show_plots_the_entropy_of_an_ares_run(synthetic_models, tmp_path, capsys):
    image = synthetic_models / "synthetic-llava-image"
    args = ["eval", "--task", "synthetic-image", "--limit", "2", "--model", f"tiny={image}", "--methods", "ares",
            "--budgets", "1.0", "--out", str(tmp_path), "--name", "ares", "--quiet", "--threads", "1"]
    assert main(args) == 0
    run = tmp_path / "ares"
    records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    assert all("entropy" in r["extra"]["ares"] for r in records)
    assert main(["show", str(run)]) == 0
    assert "2 entropy plot(s)" in capsys.readouterr().out
    assert len(list((run / "entropy").glob("*.png"))) == 2


def test_eval_explicit_zeros_override_the_config_file(synthetic_models, tmp_path, monkeypatch):
    """``--warmup 0``, ``--keep-maps 0`` and ``--limit 0`` replace the file's values (0 is not "unset")."""
    from tokenreduce.eval import runner as runner_module

    seen = []
    original = runner_module.Runner.__init__

    def recording(self, *args, **kwargs):
        seen.append(kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(runner_module.Runner, "__init__", recording)
    image = synthetic_models / "synthetic-llava-image"
    config = tmp_path / "grid.yaml"
    config.write_text(f"task: synthetic-image\nlimit: 2\nwarmup: 2\nkeep_maps: 3\nmodels: [{{name: t, path: '{image}'}}]\n"
                      f"methods: [pool]\nbudgets: [0.5]\nout: {tmp_path}\n")
    assert main(["eval", "--config", str(config), "--name", "zeros", "--warmup", "0", "--keep-maps", "0",
                 "--no-plots", "--quiet"]) == 0
    assert (seen[-1]["warmup"], seen[-1]["keep_maps"], seen[-1]["limit"]) == (0, 0, 2)
    records = [json.loads(line) for line in (tmp_path / "zeros" / "records.jsonl").read_text().splitlines()]
    assert len(records) == 2 and not any("kept" in r for r in records)

    assert main(["eval", "--config", str(config), "--name", "none", "--limit", "0", "--no-plots", "--quiet"]) == 0
    assert seen[-1]["limit"] == 0
    assert not (tmp_path / "none" / "records.jsonl").exists() or not (tmp_path / "none" / "records.jsonl").read_text()


def test_cli_argument_errors_name_the_flag(tmp_path):
    with pytest.raises(SystemExit, match=r"^--threads must be >= 1, got 0$"):
        main(["eval", "--task", "synthetic-image", "--threads", "0"])
    with pytest.raises(SystemExit, match=r"^--task-opt must be KEY=VALUE, got 'seed'$"):
        main(["eval", "--task", "synthetic-image", "--task-opt", "seed", "--model", "x", "--methods", "none"])
    with pytest.raises(SystemExit, match=r"^tokenreduce demo: the demo needs the synthetic benchmark's tiny models"):
        main(["demo", "--models", str(tmp_path / "empty"), "--quiet"])


def test_cli_config_and_run_folder_errors(tmp_path):
    with pytest.raises(SystemExit, match=r"^--config: no file .*missing\.yaml$"):
        main(["eval", "--config", str(tmp_path / "missing.yaml")])
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(SystemExit, match=r"expected a mapping at the top level, got list$"):
        main(["eval", "--config", str(listing)])
    no_path = tmp_path / "nopath.yaml"
    no_path.write_text("task: synthetic-image\nmethods: [none]\nmodels: [{name: t}]\n")
    with pytest.raises(SystemExit, match=r"^model entry \{'name': 't'\} has no `path`$"):
        main(["eval", "--config", str(no_path)])
    with pytest.raises(SystemExit, match=r"is not a run folder \(no run\.json\)"):
        main(["show", str(tmp_path)])
