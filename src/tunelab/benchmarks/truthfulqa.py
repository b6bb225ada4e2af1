"""Document hooks for tunelab's TruthfulQA task YAMLs (loaded by lm-eval through `!function truthfulqa.<name>`).

The bundled split keeps the TruthfulQA CSV's shape (question, best_answer, correct_answers, incorrect_answers);
`process_docs` rebuilds the `mc1_targets` / `mc2_targets` fields of the hub's `truthful_qa/multiple_choice`, so the
tasks use lm-eval's own choice lists and its own MC2 scoring function unchanged.
"""

from __future__ import annotations

from typing import Any

from lm_eval.tasks.truthfulqa.utils import process_results_mc2

__all__ = ["process_docs", "process_results_mc2", "targets"]


def targets(doc: dict[str, Any]) -> dict[str, dict[str, list[Any]]]:
    """MC1: the best answer first (the gold index is 0), then the incorrect ones. MC2: every correct answer, then
    every incorrect one, labelled 1/0 (lm-eval's MC2 splits the probability mass by these labels)."""
    correct, incorrect = list(doc["correct_answers"]), list(doc["incorrect_answers"])
    return {
        "mc1_targets": {"choices": [doc["best_answer"], *incorrect], "labels": [1] + [0] * len(incorrect)},
        "mc2_targets": {"choices": [*correct, *incorrect], "labels": [1] * len(correct) + [0] * len(incorrect)},
    }


def process_docs(dataset: Any) -> Any:
    """A `datasets.Dataset` of bundled rows -> the same rows with mc1_targets and mc2_targets added."""
    return dataset.map(targets)
