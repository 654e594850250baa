"""TokDense (accuracy in percent per visual token fed to the LLM) in the runner's summary and table."""

from tokenreduce.eval.report import markdown_table, summarize, tokdense
from tokenreduce.eval.task import Task


def _record(method, sample, score, tokens):
    return {
        "model": "m",
        "method": method,
        "budget": None if method == "none" else 0.01,
        "sample_id": sample,
        "score": score,
        "prediction": str(score),
        "error": None,
        "visual_tokens_in": 577,
        "visual_tokens_llm_input": tokens,
    }


def test_tokdense_is_percent_accuracy_per_llm_input_token():
    assert abs(tokdense(0.5772, 13.08) - 4.4128) < 1e-3  # the paper's 57.72 / 13.08 = 4.41
    assert tokdense(None, 5) is None and tokdense(0.5, 0) is None
    records = [_record("none", i, float(i < 3), 577) for i in range(4)]
    records += [_record("vqtoken", i, float(i < 2), 4 + i % 2) for i in range(4)]
    summary = summarize(records, Task())
    cells = {c["method"]: c for c in summary["cells"]}
    assert abs(cells["vqtoken"]["tokdense"] - 100 * 0.5 / 4.5) < 1e-9
    assert abs(cells["none"]["tokdense"] - 75 / 577) < 1e-9
    table = markdown_table(summary)
    assert "TokDense" in table and "| 11.1 |" in table
