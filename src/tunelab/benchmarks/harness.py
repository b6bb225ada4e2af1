"""lm-evaluation-harness glue: resolve benchmark names to tasks, score a loaded model, read the results back.

Imports lm-eval (about 2 s), so callers import this module only when benchmarks run.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import io
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval.evaluator import evaluate
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from rich.console import Console
from transformers import PreTrainedTokenizerBase

from tunelab.benchmarks import BUNDLED_TASKS, TASKS_DIR, BenchmarkScores, truthfulqa_file
from tunelab.benchmarks.lm import LoadedModelLM, ProgressFn
from tunelab.errors import TunelabError

TaskSpec = str | dict[str, Any]
DEFAULT_BATCH_SIZE = 32
FEWSHOT_SEED = 1234  # lm-eval's default: the same few-shot examples as its own runs
# Loggers that report every step at INFO/WARNING ("pretrained is not a str", dataset building, ...).
NOISY_LOGGERS = ("lm_eval", "datasets", "fsspec")


def resolve_tasks(names: Sequence[str], include_paths: Sequence[Path] = ()) -> tuple[TaskManager, list[TaskSpec]]:
    """A TaskManager that knows every name, and what to pass lm-eval for each: tunelab's own TruthfulQA tasks as
    configs with the bundled file's path filled in, anything else (a user's YAML, an lm-eval task) by name.

    tunelab's tasks and the user's folders are indexed first (milliseconds); lm-eval's ~15,000 built-in tasks are
    indexed (about 20 s) only when a name is not found there. Later folders override earlier ones, so a user's
    --include-path can redefine truthfulqa_mc1."""
    if not names:
        raise TunelabError("no benchmark given: name lm-eval tasks, e.g. --benchmark truthfulqa_mc1,truthfulqa_mc2")
    folders = tuple(str(f) for f in [TASKS_DIR, *(_checked_folder(p) for p in include_paths)])
    manager = _task_manager(folders, with_builtin=False)
    if any(name not in manager.all_tasks for name in names):
        manager = _task_manager(folders, with_builtin=True)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise TunelabError(_unknown_message(unknown, manager.all_tasks))
    return manager, [_task_spec(manager, name) for name in names]


@functools.lru_cache(maxsize=4)
def _task_manager(folders: tuple[str, ...], with_builtin: bool) -> TaskManager:
    """Indexed once per process: a run scores before and after training with the same tasks. Quiet: lm-eval warns
    that tunelab's truthfulqa_mc1/mc2 override its own, which is the point."""
    with _quiet_lm_eval():
        return TaskManager(include_defaults=with_builtin, include_path=list(folders))


def _checked_folder(path: Path) -> Path:
    if not path.is_dir():
        raise TunelabError(
            f"benchmark include path {path} is not a folder: give a folder of lm-eval task YAML files "
            "(--include-path, or eval.benchmark_include_path in a job spec)"
        )
    return path


def _unknown_message(unknown: list[str], known: list[str]) -> str:
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=3)
        parts.append(f"{name!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
    return (
        f"unknown benchmark {', '.join(parts)}: give lm-eval task names (bundled: {', '.join(BUNDLED_TASKS)}), "
        "or add a folder of task YAMLs with --include-path"
    )


def _task_spec(manager: TaskManager, name: str) -> TaskSpec:
    yaml_path = manager.task_index[name].yaml_path
    if yaml_path is None or Path(yaml_path).resolve().parent != TASKS_DIR:
        return name
    # lm-eval reads `dataset_kwargs.data_files` relative to the working directory; tunelab runs from anywhere.
    config = load_yaml(yaml_path, resolve_func=True)
    split = Path(config["dataset_kwargs"]["data_files"]["test"]).stem  # data/truthfulqa/<split>.jsonl
    config["dataset_kwargs"] = {"data_files": {"test": str(truthfulqa_file(split))}}
    return config


def score_benchmarks(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    names: Sequence[str],
    *,
    limit: int | None = None,
    include_paths: Sequence[Path] = (),
    batch_size: int = DEFAULT_BATCH_SIZE,
    console: Console | None = None,
    shared_cache: bool = True,
) -> BenchmarkScores:
    """Score `model` as it is (a base, a PeftModel with its adapter active, a merged or quantised model) on the
    lm-eval tasks `names`, each on its first `limit` documents (all when None). `shared_cache=False` scores with
    lm-eval's own request-by-request code instead of tunelab's faster one (same numbers; for comparison)."""
    manager, specs = resolve_tasks(names, include_paths)
    started = time.perf_counter()
    with _progress(console or Console(stderr=True, quiet=True)) as on_progress, _quiet_lm_eval():
        lm = LoadedModelLM(model, tokenizer, batch_size=batch_size, on_progress=on_progress, shared_cache=shared_cache)
        results = evaluate(
            lm=lm,
            task_dict=_load_tasks(manager, specs),
            limit=limit,
            bootstrap_iters=0,  # standard errors by bootstrap cost minutes on MC2 and are not reported
            log_samples=False,
        )
    if results is None:
        raise TunelabError("lm-eval returned no results (only rank 0 of a launch scores benchmarks)")
    return read_scores(results, time.perf_counter() - started)


def _load_tasks(manager: TaskManager, specs: list[TaskSpec]) -> Any:
    """What lm-eval's simple_evaluate does before evaluating, without what tunelab does not want: it would reseed
    Python, NumPy and torch (a run's adapter initialisation must not depend on whether benchmarks were scored before
    training) and collect environment details by running pip and other programs (seconds)."""
    loaded = manager.load(specs)
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    return loaded


def read_scores(results: dict[str, Any], seconds: float) -> BenchmarkScores:
    """lm-eval's results -> '<task>/<metric>' values; a filter other than the default is kept as '[filter]'."""
    metrics: dict[str, float] = {}
    lower: set[str] = set()
    for task, values in results["results"].items():
        higher_is_better = results.get("higher_is_better", {}).get(task, {})
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if (
                metric.endswith("_stderr")
                or metric == "sample_len"
                or isinstance(value, bool)
                or not isinstance(value, int | float)
            ):
                continue
            name = f"{task}/{metric}" + (f"[{filter_name}]" if filter_name not in ("", "none") else "")
            metrics[name] = float(value)
            if higher_is_better.get(metric) is False:
                lower.add(name)
    questions = {task: int(n["effective"]) for task, n in results.get("n-samples", {}).items()}
    return BenchmarkScores(metrics, frozenset(lower), questions, seconds)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs at INFO/WARNING and draws tqdm bars it has no switch for; keep all of it, show it only when
    something fails."""
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    saved = []
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers, logger.propagate, logger.level))
        logger.handlers, logger.propagate = [handler], False
        logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    finally:
        for logger, handlers, propagate, level in saved:
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)


@contextlib.contextmanager
def _progress(console: Console) -> Iterator[ProgressFn]:
    """Questions scored: a live bar on a terminal, a line every tenth otherwise. Bound to the console's stream
    now, before lm-eval's chatter is redirected."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    shown = Console(file=console.file, force_terminal=console.is_terminal, quiet=console.quiet, soft_wrap=True)
    started = time.perf_counter()
    if not shown.is_terminal:
        step = [0]

        def plain(done: int, total: int) -> None:
            if done * 10 // max(total, 1) > step[0] or done == total:
                step[0] = done * 10 // max(total, 1)
                shown.print(f"benchmarks: {done}/{total} questions scored ({time.perf_counter() - started:.0f} s)")

        yield plain
        return
    columns = (TextColumn("[bold]benchmarks"), BarColumn(), MofNCompleteColumn(), TextColumn("questions"))
    with Progress(*columns, TimeElapsedColumn(), console=shown, transient=True) as bar:
        task = bar.add_task("benchmarks", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
