"""Training progress for people (a live bar, or plain lines when output is not a terminal) and for tools
(a JSON-lines metrics log)."""

from __future__ import annotations

import json
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
        elif step % self.plain_every == 0 or step == self.total:
            self.console.print(
                f"step {step}/{self.total}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                f"{row['tokens_per_s']:.0f} tok/s  ETA {eta_s:.0f}s"
            )

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)


def rewrite_metrics(path: Path, history: list[dict[str, float]]) -> None:
    """On resume, the log must hold exactly the steps the checkpoint knows (later ones were lost)."""
    path.write_text("".join(json.dumps(row) + "\n" for row in history), encoding="utf-8")


EVAL_KEY = "eval"  # marks a metrics.jsonl row as an evaluation ("before"/"after"), not a training step


def log_benchmarks(path: Path, before: Evaluation, after: Evaluation | None, step: int) -> None:
    """Append the benchmark scores before and after training (Evaluations) as two rows after the steps, e.g.
    {"eval": "before", "step": 0, "truthfulqa_mc1/acc": 0.23}. A resumed run rewrites the steps and logs these anew."""
    rows = []
    for label, evaluation, at in (("before", before, 0), ("after", after, step)):
        names = benchmark_metrics(evaluation)[0] if evaluation is not None else []
        if evaluation is not None and names:
            rows.append({EVAL_KEY: label, "step": at, **{n: evaluation.metrics[n] for n in names}})
    if rows:
        with path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def is_step_row(row: dict[str, Any]) -> bool:
    """Readers of metrics.jsonl that want training steps skip the evaluation rows."""
    return EVAL_KEY not in row
