"""Standard benchmarks (lm-evaluation-harness tasks) scored on the model tunelab already loaded.

This module stays light (no lm-eval import) so the CLI and the job spec can name benchmarks cheaply; the scoring
itself is in `tunelab.benchmarks.harness`, imported only when benchmarks run.

tunelab ships lm-eval task YAMLs for the bundled TruthfulQA split (`truthfulqa_mc1`, `truthfulqa_mc2`, in this
folder): they take precedence over lm-eval's built-in tasks of the same names, which need the Hugging Face hub.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.errors import ConfigError, Problem, TunelabError
from tunelab.extras import require

if TYPE_CHECKING:
    import torch
    from rich.console import Console
    from transformers import PreTrainedTokenizerBase

    from tunelab.config import EvalSpec, JobSpec
    from tunelab.tasks import Evaluation

TASKS_DIR = Path(__file__).resolve().parent
# `_validation`: the same tasks on the 41 questions held out of the training half, to choose a recipe on (the test
# split is for reporting only).
BUNDLED_TASKS = ("truthfulqa_mc1", "truthfulqa_mc2", "truthfulqa_mc1_validation", "truthfulqa_mc2_validation")
DATA_DIR_ENV = "TUNELAB_DATA_DIR"
BENCHMARKS_KEY = "benchmarks"  # in Evaluation.details
FEATURE = "benchmarks (eval.benchmarks, tunelab eval -b)"


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


def truthfulqa_file(split: str = "test") -> Path:
    """The bundled TruthfulQA split `split` (test or validation)."""
    path = bundled_data_dir() / "truthfulqa" / f"{split}.jsonl"
    if not path.is_file():
        raise TunelabError(
            f"the bundled TruthfulQA {split} split is not at {path}: run tunelab from a source checkout (data/ is not "
            f"in the wheel), or set {DATA_DIR_ENV} to a folder holding truthfulqa/{split}.jsonl"
        )
    return path


def check_benchmarks(job: JobSpec) -> None:
    """Fail before any model loads or trains when eval.benchmarks cannot run: a wrong name or include path, or a
    classification head, or lm-eval not installed (it is imported here, and only when there are benchmarks)."""
    if not job.eval.benchmarks:
        return
    if job.task.approach == "head":
        problem = "benchmarks score a language model's text; a classification head has none"
        raise ConfigError(
            [Problem("eval.benchmarks", problem, "remove eval.benchmarks or use task.approach: generative")]
        )
    require("benchmarks", FEATURE)
    from tunelab.benchmarks.harness import resolve_tasks

    resolve_tasks(job.eval.benchmarks, _include_paths(job.eval))


def run_benchmarks(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, spec: EvalSpec, console: Console | None = None
) -> BenchmarkScores:
    """The job spec's benchmarks (eval.benchmarks, benchmark_limit, benchmark_include_path) on `model` as it is:
    the API a training recipe (SFT, DPO, ...) calls before and after training."""
    require("benchmarks", FEATURE)
    from tunelab.benchmarks.harness import score_benchmarks

    return score_benchmarks(
        model,
        tokenizer,
        spec.benchmarks,
        limit=spec.benchmark_limit,
        include_paths=_include_paths(spec),
        console=console,
    )


def with_benchmarks(evaluation: Evaluation, scores: BenchmarkScores) -> Evaluation:
    """The evaluation with the benchmark metrics added; `details` says which metrics they are, so the report draws
    them together and eval_before.json keeps them for a resumed run."""
    details = {
        BENCHMARKS_KEY: {
            "metrics": list(scores.metrics),
            "lower_is_better": sorted(scores.lower_is_better),
            "questions": scores.questions,
            "seconds": scores.seconds,
        }
    }
    return replace(evaluation, metrics=evaluation.metrics | scores.metrics, details=evaluation.details | details)


def benchmark_metrics(evaluation: Evaluation) -> tuple[list[str], frozenset[str]]:
    """(benchmark metric names, those where lower is better) recorded by `with_benchmarks`."""
    recorded = evaluation.details.get(BENCHMARKS_KEY, {})
    return list(recorded.get("metrics", [])), frozenset(recorded.get("lower_is_better", []))


def _include_paths(spec: EvalSpec) -> list[Path]:
    return [spec.benchmark_include_path] if spec.benchmark_include_path is not None else []
