"""Standard benchmarks (lm-evaluation-harness tasks) scored on the model tunelab already loaded.

This module stays light (no lm-eval import) so the CLI and the job spec can name benchmarks cheaply; the scoring
itself is in `tunelab.benchmarks.harness`, imported only when benchmarks run.

tunelab ships lm-eval task YAMLs for the bundled TruthfulQA split (`truthfulqa_mc1`, `truthfulqa_mc2`, in this
folder): they take precedence over lm-eval's built-in tasks of the same names, which need the Hugging Face hub.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError

TASKS_DIR = Path(__file__).resolve().parent
BUNDLED_TASKS = ("truthfulqa_mc1", "truthfulqa_mc2")
DATA_DIR_ENV = "TUNELAB_DATA_DIR"


@dataclass(frozen=True)
class BenchmarkScores:
    metrics: dict[str, float]  # "<task>/<metric>", e.g. "truthfulqa_mc1/acc"
    lower_is_better: frozenset[str]  # from each task's own higher_is_better (perplexities, say)
    questions: dict[str, int]  # documents scored per task
    seconds: float


def parse_benchmarks(text: str) -> list[str]:
    """'truthfulqa_mc1, truthfulqa_mc2' -> ['truthfulqa_mc1', 'truthfulqa_mc2'] (a name given twice counts once)."""
    return list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))


def bundled_data_dir() -> Path:
    """The repository's data/ folder: next to src/ in a source checkout. A wheel does not ship data/ (the same files
    would be installed twice, once per environment); installed that way, point TUNELAB_DATA_DIR at a copy of it."""
    override = os.environ.get(DATA_DIR_ENV)
    return Path(override) if override else TASKS_DIR.parents[2] / "data"


def truthfulqa_test_file() -> Path:
    path = bundled_data_dir() / "truthfulqa" / "test.jsonl"
    if not path.is_file():
        raise TunelabError(
            f"the bundled TruthfulQA test split is not at {path}: run tunelab from a source checkout (data/ is not "
            f"in the wheel), or set {DATA_DIR_ENV} to a folder holding truthfulqa/test.jsonl"
        )
    return path
