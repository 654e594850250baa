"""Mutation testing of tokenreduce's logic with mutmut, one module (or group of modules) at a time.

``python scripts/mutate.py`` runs every group of :data:`GROUPS` in turn; ``python scripts/mutate.py PATH``
runs the group holding ``PATH`` (a file or a folder under ``tokenreduce/``, e.g.
``tokenreduce/eval/metrics.py``) against only the tests that exercise it, in minutes. Run from the
repository root (``make mutate [MODULE=PATH]``). Not part of ``make test``.

mutmut copies the project into ``mutants/`` (git-ignored), writes every mutant of the selected files into
it behind a switch, and runs the selected tests once per mutant with that mutant switched on. The summary
printed at the end lists, per file, the mutants, how many the tests killed and the names of the survivors
(``mutmut show NAME`` prints a survivor's diff). Triton JIT bodies are never mutated: mutants of a
``@triton.jit`` kernel cannot run without a GPU, and each kernel's torch twin (``naive.py``) is the
reference the tests compare it with.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections import Counter
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (files to mutate, pytest arguments selecting the tests that exercise them). Globs are relative to the
# repository root. The selections are the fast tests that matter for each group: every mutant runs them.
LLM_TESTS = ["tests/test_llm_stage.py", "-k",
             "((forward_equals_reference or generate_equals_reference) and B3 and llava_onevision) "
             "or (forward_equals_reference and B3 and qwen2_5_vl and fastv) or (sdpa and qwen2_5_vl) "
             "or budgets or renumbered or (loss_covers and llava) or scores_equal or out_of_range or averaged "
             "or llm_config or text_only_row or bookkeeping"]
HANDLE_TESTS = ["tests/test_core_handle.py", "tests/test_projector_stage.py", "tests/test_input_rule.py",
                "tests/test_plain_inputs.py", "-k",
                "core_handle or qwen_two_dimensional or qwen_generate_without "
                "or (inputs_embeds and pool and qwen2_5_vl) or (forward_equals and pool) or (generate_equals and pool and (llava_onevision or qwen2_5_vl)) "
                "or loss_equals or qwen_positions or renumber_positions or modalities_option "
                "or (pass_through and not placeholders_without) or keep_above or keep_within"]
GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "metrics": (["tokenreduce/eval/metrics.py"], ["tests/metrics"]),
    "llm-select": (
        [
            "tokenreduce/ops/llm.py",
            "tokenreduce/plugins/baselines/fastv.py",
            "tokenreduce/plugins/baselines/pdrop.py",
        ],
        LLM_TESTS,
    ),
    "llm-core": (["tokenreduce/core/llm.py"], LLM_TESTS),
    # ATP's own oracles (its definition in `_atp_select`) on two families, the uneven budgets, the
    # current-layer / self-weight cases and `tests/test_atp.py`, not the whole LLM selection.
    "atp": (["tokenreduce/plugins/atp/method.py", "tokenreduce/plugins/atp/scores.py"],
            ["tests/test_llm_stage.py", "tests/test_atp.py", "tests/test_atp_config.py", "-k",
             "(atp and B3 and (llava_onevision or qwen2_5_vl)) or (atp and (uneven or current or self "
             "or own_choice)) or test_atp"]),
    "sequence": (["tokenreduce/core/sequence.py"], ["tests/test_sequence.py"]),
    "pool": (["tokenreduce/plugins/baselines/pool.py", "tokenreduce/ops/pooling.py"], ["tests/test_pool_plan.py", "tests/test_selection.py", "-k", "pool or plan"]),
    "divprune": (["tokenreduce/plugins/baselines/divprune.py"], ["tests/test_selection.py", "-k", "divprune"]),
    "projector": (
        ["tokenreduce/plugins/baselines/random.py", "tokenreduce/ops/vision.py"],
        ["tests/test_selection.py", "tests/test_random_config.py", "tests/test_vision_stage.py", "tests/test_ops_vision.py"],
    ),
    "vision": (
        [
            "tokenreduce/plugins/baselines/tome.py",
            "tokenreduce/plugins/baselines/visionzip.py",
            "tokenreduce/plugins/baselines/prumerge.py",
            "tokenreduce/ops/selection.py",
        ],
        # the step-by-step references of every function, the [CLS] top-k oracle, ToMe on a bare tower and
        # each baseline's forward / generate oracle on LLaVA-1.5 (the anyres families add minutes a mutant)
        ["tests/test_vision_methods.py", "tests/test_ops_selection.py"]
        + [f"tests/test_vision_stage.py::{t}" for t in (
            "test_tome_merge_step_equals_loop_reference", "test_tome_schedule",
            "test_tome_projector_merges_by_similarity_into_member_means", "test_visionzip_select_equals_reference",
            "test_prumerge_group_equals_reference", "test_visionzip_dominant_tokens_are_the_towers_cls_top_k",
            "test_tower_keep_all_unwrap_and_isolation[hf_clip]", "test_baseline_oracles[tome-llava]",
            "test_baseline_oracles[visionzip-llava]", "test_baseline_oracles[prumerge-llava]",
            "test_baseline_oracles[prumerge_plus-llava]")]
        + [f"tests/test_fidelity.py::{t}" for t in (
            "test_prumerge_reference_equals_the_official_pipeline", "test_visionzip_reference_equals_the_official_pipeline",
            "test_tome_reference_order_equals_official_merges")]
        # PruMerge+'s adaptive count and stride (no other test of the selection reaches them)
        + ["tests/hot/test_method_selection.py::test_prumerge_plus_kept_set_equals_the_definition"],
    ),
    # The selections of the later baselines against their step-by-step references (no model for cdpruner / evs).
    "new-baselines": (["tokenreduce/plugins/baselines/evs/select.py", "tokenreduce/plugins/baselines/cdpruner/select.py",
                       "tokenreduce/plugins/baselines/vispruner/select.py"],
                      ["tests/test_selection.py", "tests/test_vision_stage.py", "-k", "evs or cdpruner or vispruner_select"]),
    # The handle's input rule, placeholders, rows and rebuilt sequences: the projector-stage oracles (two
    # families, image / video / anyres, batches with padding) plus the pass-through and refusal paths.
    "handle": (["tokenreduce/core/handle.py"], HANDLE_TESTS),
    # The core's pure-Python parts: configs, the registry, FLOPs and statistics, against their unit tests
    # (no model in most: each mutant runs in seconds).
    "core": (
        [
            "tokenreduce/core/config.py",
            "tokenreduce/core/flops.py",
            "tokenreduce/core/registry.py",
            "tokenreduce/core/stats.py",
        ],
        ["tests/test_config.py", "tests/test_core_units.py", "tests/test_registry_plugins.py"],
    ),
    # The public entry points on tiny models: wrap's refusals, unwrap, disabled, stats.
    "api": (["tokenreduce/core/api.py"], ["tests/test_core_api.py", "tests/test_wrap.py", "-k",
             "core_api or unsupported_model or submodule or bare_tower or twice"]),
    "inputs": (["tokenreduce/core/inputs.py"], ["tests/test_core_inputs.py", "tests/test_plain_inputs.py", "-k",
               "core_inputs or docowl or (inputs_embeds and (pool or fastv) and (llava_onevision or qwen2_5_vl))"]),
    "continuation": (["tokenreduce/core/continuation.py"], ["tests/test_core_continuation.py", "tests/test_continuation.py",
                     "-k", "core_continuation or refused or lines_up or reset"]),
    "core-rest": (
        [
            "tokenreduce/core/layout.py",
            "tokenreduce/core/lowrank.py",
            "tokenreduce/core/reduction.py",
            "tokenreduce/core/vision.py",
        ],
        ["tests/test_wrap.py", "tests/test_config.py", "tests/test_layout.py", "tests/test_projector_stage.py"],
    ),
    "kernels": (
        ["tokenreduce/kernels/*/naive.py", "tokenreduce/kernels/*/__init__.py", "tokenreduce/kernels/_backend.py"],
        ["tests/kernels"],
    ),
    # TCC's density, budgets, choice and merge: the step-by-step references of tests/doc_correlation
    "doc_correlation": (["tokenreduce/plugins/doc_correlation/*.py"], ["tests/doc_correlation/test_density.py"]),
    "runner": (["tokenreduce/eval/runner.py"], ["tests/eval_runner/test_runner.py"]),
    "cli": (["tokenreduce/cli.py"], ["tests/eval_runner/test_cli.py"]),
}


def group_for(path: str) -> tuple[str, list[str], list[str]]:
    """The group named ``path``, or the group holding ``path`` narrowed to the files under it."""
    if path in GROUPS:
        return path, *GROUPS[path]
    target = Path(path).resolve().relative_to(ROOT).as_posix().rstrip("/")
    for name, (files, tests) in GROUPS.items():
        matched = [f for f in files if fnmatch(target, f) or f == target]
        if matched:
            return name, [target], tests
        inside = [f for f in files if f.startswith(target + "/")]
        if inside:
            return name, inside, tests
    known = ", ".join(f for files, _ in GROUPS.values() for f in files)
    raise SystemExit(f"MODULE {path!r} is in no mutation group; groups cover: {known}")


def mutant_patterns(functions: list[str]) -> list[str]:
    """mutmut name patterns of every mutant of the named functions or methods (``_prune``, ``top_visual``)."""
    return [p for f in functions for p in (f"*ǁ{f}__mutmut_*", f"*.x_{f}__mutmut_*")]


def is_mutated(path: Path) -> bool:
    """Whether ``mutants/`` holds this source file's mutants (not a plain copy another group's run left)."""
    copy = ROOT / "mutants" / path.relative_to(ROOT)
    return copy.exists() and copy.stat().st_mtime > path.stat().st_mtime and "__mutmut_" in copy.read_text()


def unresolved(files: list[str]) -> list[str]:
    """Names of the mutants of ``files`` the last run left alive, timed out or did not check."""
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.stats import status_by_exit_code

    names = []
    for path in sorted({p for f in files for p in ROOT.glob(f)}):
        rel = path.relative_to(ROOT)
        if not is_mutated(path):
            # changed since its run (or never run): every mutant of it runs again, the copy made afresh
            print(f"--survivors: {rel} changed since its last run (or another group ran since): all its mutants rerun")
            for stale in (ROOT / "mutants" / rel, ROOT / "mutants" / f"{rel}.meta"):
                stale.unlink(missing_ok=True)
            module = ".".join(rel.with_suffix("").parts)
            module = module.removesuffix(".__init__")
            names += [f"{module}.x_*", f"{module}.xǁ*"]
            continue
        data = SourceFileMutationData(path=rel)
        data.load()
        names += [k for k, v in data.exit_code_by_key.items()
                  if status_by_exit_code[v] not in ("killed", "caught by type check")]
    return names


def run_group(name: str, files: list[str], tests: list[str], max_children: int,
              functions: list[str] | None = None, survivors: bool = False) -> None:
    """Run mutmut over ``files`` against ``tests`` and print per-file counts and survivors.

    ``functions``: only the mutants of these functions (their earlier results kept for the rest).
    ``survivors``: only the mutants the group's last run did not kill, the others' results kept: the rerun
    after adding tests.
    """
    from mutmut import configuration
    from mutmut.__main__ import _run
    from mutmut.stats import status_by_exit_code

    tests = [t for t in tests if t.startswith("-") or not t.startswith("tests/") or (ROOT / t.split("::")[0]).exists()]
    names = mutant_patterns(functions or [])
    if survivors:
        names = unresolved(files)
        if functions:  # the named functions' survivors only (all their mutants where the file changed)
            patterns = mutant_patterns(functions)
            names = (patterns if any("*" in n for n in names)
                     else [n for n in names if any(fnmatch(n, p) for p in patterns)])
        if not names:
            print(f"== {name}: no survivor left to rerun")
            summarize(files, status_by_exit_code)
            return
    else:
        # A file another group's run copied unmutated (newer than its source) would count as already
        # mutated: start this group's files afresh (a run of some functions keeps a valid earlier run's
        # results for the others).
        for path in {p for f in files for p in ROOT.glob(f)}:
            if functions and is_mutated(path):
                continue
            for stale in (ROOT / "mutants" / path.relative_to(ROOT), ROOT / "mutants" / f"{path.relative_to(ROOT)}.meta"):
                stale.unlink(missing_ok=True)
    # Which tests reach which function is recorded per run; a group with the same test selection as the
    # last one would otherwise reuse a mapping taken while its files were not mutated (no test for any).
    (ROOT / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    configuration.reset_config()
    config = configuration.config()
    config.only_mutate = files
    config.pytest_add_cli_args_test_selection = tests
    print(f"== {name}: mutating {', '.join(files)} against {', '.join(tests)}", flush=True)
    try:
        _run(names, max_children)
    except SystemExit as e:  # mutmut exits when the clean run fails; report it and stop
        if e.code not in (0, None):
            raise
    summarize(files, status_by_exit_code, names if functions else None)


def summarize(files: list[str], status_by_exit_code, only: list[str] | None = None) -> None:
    """Per file: mutants, killed, and each survivor's diff (``only``: the mutants matching these patterns)."""
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    for path in sorted({p for f in files for p in ROOT.glob(f)}):
        rel = path.relative_to(ROOT)
        data = SourceFileMutationData(path=rel)
        data.load()
        codes = {k: v for k, v in data.exit_code_by_key.items() if only is None or any(fnmatch(k, p) for p in only)}
        counts = Counter(status_by_exit_code[v] for v in codes.values())
        total = sum(counts.values())
        killed = counts.get("killed", 0)
        print(f"{rel}: {total} mutants, {killed} killed ({100 * killed / max(1, total):.1f} %); " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
        for key, code in sorted(codes.items()):
            status = status_by_exit_code[code]
            if status not in ("killed", "caught by type check"):
                print(f"    {status}: {key}")
                # the diff now: the next group's run rewrites mutants/ and `mutmut show` loses it
                try:
                    diff = get_diff_for_mutant(key, path=rel)
                except FileNotFoundError:  # another group ran since: mutants/ holds this file unmutated
                    continue
                print("".join(f"        {line}\n" for line in diff.splitlines() if line[:1] in "+-"
                              and not line.startswith(("+++", "---"))), end="")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", nargs="?", help="a group name, or a file or folder under tokenreduce/ (default: every group)")
    parser.add_argument("--max-children", type=int, default=1, help="parallel mutant runs (default 1)")
    parser.add_argument("--report", action="store_true",
                        help="only print the counts and survivors of the group's last run (an interrupted one too)")
    parser.add_argument("--functions", nargs="+", metavar="NAME",
                        help="only the mutants of these functions or methods (a slow group split by function)")
    parser.add_argument("--survivors", action="store_true",
                        help="rerun only the mutants the group's last run left alive (after adding tests)")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    if args.report:
        from mutmut.stats import status_by_exit_code

        summarize(group_for(args.module)[1], status_by_exit_code, mutant_patterns(args.functions) if args.functions else None)
        return
    # Subprocesses the tests start (the CLI's) import the mutated copy, not the worktree.
    os.environ["PYTHONPATH"] = str(ROOT / "mutants")
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    if args.module:
        run_group(*group_for(args.module), args.max_children, args.functions, args.survivors)
        return
    if args.functions or args.survivors:
        raise SystemExit("--functions and --survivors need a MODULE (a group, file or folder)")
    # One process per group: mutmut keeps global state for the run.
    for name in GROUPS:
        done = subprocess.run([sys.executable, __file__, name, "--max-children", str(args.max_children)])
        if done.returncode:
            raise SystemExit(f"mutation run of group {name!r} failed (exit {done.returncode})")


if __name__ == "__main__":
    main()
