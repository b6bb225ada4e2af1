"""Progress for people (a live bar, or plain lines when output is not a terminal) and for tools (a JSON-lines
metrics log): training steps, and the long phases around training (evaluation's loss pass and generation)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from tunelab.benchmarks import benchmark_metrics
from tunelab.metrics import is_timing

if TYPE_CHECKING:
    from tunelab.tasks import Evaluation


class ProgressReporter:
    def __init__(
        self,
        total_steps: int,
        start_step: int,
        metrics_path: Path | None,
        console: Console | None = None,
        plain_every: int = 10,
    ) -> None:
        self.console = console or Console(stderr=True)
        self.total = total_steps
        self.metrics_path = metrics_path
        self.plain_every = plain_every
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._start = start_step
        self._last_line = time.perf_counter()

    def _line_due(self) -> bool:
        # In a log, slow steps (a minute each on a busy CPU) must not leave it silent for `plain_every` steps.
        return time.perf_counter() - self._last_line >= PLAIN_EVERY_S

    @property
    def quiet(self) -> bool:
        """Processes other than rank 0 of a launch report nothing (metrics_path None), or lines would repeat."""
        return self.metrics_path is None

    def __enter__(self) -> ProgressReporter:
        if self.console.is_terminal and not self.quiet:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total, completed=self._start, loss="-", tps="-")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, row: dict[str, float], eta_s: float) -> None:
        """Show one optimizer step and append it to the metrics log."""
        if self.metrics_path is None:
            return
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        step = int(row["step"])
        if self._progress is not None and self._task is not None:
            self._progress.update(
                self._task, completed=step, loss=f"{row['loss']:.4f}", tps=f"{row['tokens_per_s']:.0f}"
            )
        elif step % self.plain_every == 0 or step == self.total or self._line_due():
            self._last_line = time.perf_counter()
            self.console.print(
                f"step {step}/{self.total}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                f"{row['tokens_per_s']:.0f} tok/s  ETA {eta_s:.0f}s"
            )

    def validation(self, point: dict[str, float]) -> None:
        """Show one validation-loss point and append it to the metrics log (readers of steps skip it)."""
        if self.metrics_path is None:
            return
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(validation_row(point)) + "\n")
        # Printed above a live bar too: a few lines a run, each worth keeping in the scrollback.
        self.console.print(f"step {int(point['step'])}/{self.total}  validation loss {point['loss']:.4f}")

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)


def rewrite_metrics(
    path: Path, history: list[dict[str, float]], validation: list[dict[str, float]] | None = None
) -> None:
    """On resume, the log must hold exactly the steps (and validation points) the checkpoint knows (later ones
    were lost); a validation row follows the step it was measured after, as in a run that never stopped."""
    points = {int(row["step"]): row for row in validation or []}
    lines = []
    for row in history:
        lines.append(json.dumps(row))
        if int(row["step"]) in points:
            lines.append(json.dumps(validation_row(points[int(row["step"])])))
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


EVAL_KEY = "eval"  # marks a metrics.jsonl row as an evaluation ("before"/"after"/"validation"), not a step
VALIDATION = "validation"  # the EVAL_KEY of a validation-loss point measured during training


def validation_row(point: dict[str, float]) -> dict[str, Any]:
    """A validation point as metrics.jsonl holds it: {"eval": "validation", "step": 5, "loss": 2.4, ...}."""
    return {EVAL_KEY: VALIDATION, **point}


def log_benchmarks(path: Path, before: Evaluation, after: Evaluation | None, step: int) -> None:
    """Append the benchmark scores and the evaluation times before and after training (Evaluations) as two rows
    after the steps, e.g. {"eval": "before", "step": 0, "truthfulqa_mc1/acc": 0.23, "eval_seconds": 9.1}. A resumed
    run rewrites the steps and logs these anew."""
    rows = []
    for label, evaluation, at in (("before", before, 0), ("after", after, step)):
        names = benchmark_metrics(evaluation)[0] + timing_names(evaluation) if evaluation is not None else []
        if evaluation is not None and names:
            rows.append({EVAL_KEY: label, "step": at, **{n: evaluation.metrics[n] for n in names}})
    if rows:
        with path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def timing_names(evaluation: Evaluation) -> list[str]:
    return [name for name in evaluation.metrics if is_timing(name)]


def timing_line(label: str, seconds: dict[str, float]) -> str:
    """`eval before: 9.1 s (loss 2.0 s, scoring 7.1 s)`: evaluation time apart from training's."""
    phases = ", ".join(f"{k.removesuffix('_seconds')} {v:.1f} s" for k, v in seconds.items() if k != "eval_seconds")
    return f"{label}: {seconds.get('eval_seconds', 0.0):.1f} s" + (f" ({phases})" if phases else "")


def is_step_row(row: dict[str, Any]) -> bool:
    """Readers of metrics.jsonl that want training steps skip the evaluation rows."""
    return EVAL_KEY not in row


# -- long phases outside the training loop (evaluation: the loss pass, generation, a head's scoring) -------------

PLAIN_EVERY_S = 10.0  # without a terminal, one line this often (and at the end), so logs show the phase is alive


class PhaseProgress:
    """One long phase, counted in items (rows, examples): a live bar in a terminal; in a log, a plain line every
    PLAIN_EVERY_S seconds with the count, the rate and the ETA, and one when it ends."""

    def __init__(self, console: Console, label: str, total: int, unit: str) -> None:
        self.console, self.label, self.total, self.unit = console, label, total, unit
        self.done = 0
        self._started = self._last_line = time.perf_counter()
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> PhaseProgress:
        if self.console.is_terminal:
            self._bar = Progress(
                TextColumn(f"[bold]{self.label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(self.unit),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
        if exc_type is None:
            self.console.print(self.line())

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=self.done)
        elif time.perf_counter() - self._last_line >= PLAIN_EVERY_S and self.done < self.total:
            self._last_line = time.perf_counter()
            self.console.print(self.line())

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        return (
            f"{self.label}: {self.done}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s, "
            f"elapsed {elapsed:.0f}s, ETA {eta:.0f}s"
        )


class _Silent:
    """A phase nobody asked to see (no `reporting` around it): counting costs nothing."""

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def advance(self, n: int) -> None:
        return None


# The loops that score (tunelab.evaluate, the heads' predict) sit inside each task's `evaluate`, below the Task
# protocol. A context variable lets whoever runs an evaluation (the recipe, `tunelab eval`) ask for progress
# without every task passing a reporter down: a new scenario's evaluation reports as soon as it uses those loops.
_REPORTING: ContextVar[tuple[Console, str] | None] = ContextVar("tunelab_eval_progress", default=None)


@contextmanager
def reporting(console: Console, label: str) -> Iterator[None]:
    """Show the progress of every evaluation phase run inside this block, prefixed with `label`."""
    token = _REPORTING.set((console, label))
    try:
        yield
    finally:
        _REPORTING.reset(token)


# Seconds per phase of the evaluation running inside `timed()`: evaluation time is reported apart from training's.
_TIMINGS: ContextVar[dict[str, float] | None] = ContextVar("tunelab_eval_timings", default=None)


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    """Collect the time of every phase run inside this block: {"loss_seconds": ..., "scoring_seconds": ...,
    "eval_seconds": the whole block}; the dict is filled when the block ends."""
    seconds: dict[str, float] = {}
    token = _TIMINGS.set(seconds)
    started = time.perf_counter()
    try:
        yield seconds
    finally:
        seconds["eval_seconds"] = time.perf_counter() - started
        _TIMINGS.reset(token)


@contextmanager
def phase(name: str, total: int, unit: str = "examples") -> Iterator[PhaseProgress | _Silent]:
    """A counter for one phase (`with phase("generation", n) as p: ... p.advance(k)`), shown if asked for, and
    timed inside `timed()`."""
    asked = _REPORTING.get()
    started = time.perf_counter()
    shown = _Silent() if asked is None or total == 0 else PhaseProgress(asked[0], f"{asked[1]} {name}", total, unit)
    with shown:
        yield shown
    timings = _TIMINGS.get()
    if timings is not None:
        timings[f"{name}_seconds"] = timings.get(f"{name}_seconds", 0.0) + time.perf_counter() - started
