"""What a worker watches while the recipe trains in its main thread: the metrics log and the checkpoint folder
(both written by the training loop), turned into events and checkpoint objects, plus the lease heartbeat."""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.config import JobSpec
from tunelab.job_service.artefacts import Artefacts
from tunelab.job_service.db import CheckpointRow, JobRow
from tunelab.job_service.ids import new_id, now
from tunelab.job_service.settings import ServiceSettings
from tunelab.job_service.store import Event, Progress, Store
from tunelab.layout import CheckpointLayout, RunLayout, checkpoint_folders, checkpoint_step
from tunelab.train.loop import make_plan
from tunelab.train.progress import EVAL_KEY, VALIDATION, is_step_row

logger = logging.getLogger("tunelab.job_service.monitor")
_ROWS = re.compile(r" in (\d+) rows ")


def fine_tuned_name(job: JobRow) -> str:
    """`ft:<base>:<suffix>:<id>`, as OpenAI names fine-tuned models (the suffix may be empty)."""
    return f"ft:{job.model}:{job.suffix or ''}:{job.id.removeprefix('ftjob-')}"


class EventLog:
    """A text stream for the recipe's console: each line it prints becomes a job event.

    The line that reports the packed row count also gives the step total (the recipe does not expose it otherwise),
    computed exactly as the training loop plans it.
    """

    def __init__(self, store: Store, job_id: str, spec: JobSpec) -> None:
        self.store, self.job_id, self.spec = store, job_id, spec
        self.total_steps: int | None = None
        self.before_write: Callable[[], None] = lambda: None
        self._buffer = ""

    def write(self, text: str) -> int:
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        events = [Event(line.strip()) for line in lines if line.strip()]
        for event in events:
            found = _ROWS.search(event.message) if event.message.startswith("data:") else None
            if found:
                self.total_steps = make_plan(int(found.group(1)), self.spec.train).total_steps
        if events:
            self.before_write()  # steps and checkpoints first, so events keep the order things happened in
            self.store.jobs.add_events(self.job_id, events)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class MetricsTail:
    """New rows of metrics.jsonl, read incrementally, across the loop's rewrites: a resumed run rewrites the file
    in place (truncated to the checkpoint's history, then appended to), a fresh start deletes it."""

    def __init__(self, path: Path, last_step: int) -> None:
        self.path, self.last_step = path, last_step
        self.last_validation = last_step  # validation points are counted apart: one follows its step's row
        self._offset = 0
        self._last_line = b""  # the line that ends at _offset: still there unless the file was rewritten

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                data = self._unread(f)
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next read
        lines = complete.splitlines(keepends=True)
        if lines:
            self._offset += len(complete)
            self._last_line = lines[-1]
        rows = [json.loads(line) for line in lines if line.strip()]
        # Exact resume repeats the steps after the checkpoint with the same values: each step is reported once.
        new = [r for r in rows if is_step_row(r) and int(r["step"]) > self.last_step]
        points = [r for r in rows if r.get(EVAL_KEY) == VALIDATION and int(r["step"]) > self.last_validation]
        if new:
            self.last_step = int(new[-1]["step"])
        if points:
            self.last_validation = int(points[-1]["step"])
        # The validation points (the dashboard's second curve) follow the steps they were measured after.
        return sorted(new + points, key=lambda r: (int(r["step"]), not is_step_row(r)))

    def _unread(self, f: Any) -> bytes:
        """The bytes after the last line read, or the whole file when that line is no longer where it was (a
        rewrite can grow past the old size before it is seen, so the size alone cannot tell)."""
        if self._offset:
            f.seek(self._offset - len(self._last_line))
            if f.read(len(self._last_line)) != self._last_line:
                self._offset, self._last_line = 0, b""
                f.seek(0)
        return bytes(f.read())


class Monitor:
    """Runs beside the recipe: every `heartbeat_s` it records progress and renews the lease in one transaction,
    then calls `on_tick` with the pending request ("pause", "cancel", "lost" for a lost lease, or None)."""

    def __init__(
        self,
        settings: ServiceSettings,
        store: Store,
        job: JobRow,
        worker_id: str,
        log: EventLog,
        on_tick: Callable[[str | None], None],
    ) -> None:
        self.settings, self.store, self.job, self.worker_id = settings, store, job, worker_id
        self.log, self.on_tick = log, on_tick
        out = Path(log.spec.output_dir)
        layout = RunLayout(out)
        self.metrics = MetricsTail(layout.metrics, job.last_step)
        self.checkpoints = layout.checkpoints
        self.known_steps = store.models.checkpoint_steps(job.id)
        self.artefacts = Artefacts.of(settings)
        self.history: dict[int, dict[str, Any]] = {}
        self.last_row: dict[str, Any] | None = None
        self._lock = threading.Lock()
        log.before_write = self.record
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"monitor-{job.id}", daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.tick(final=True)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                self.tick()
            except Exception:  # a database hiccup must not end the heartbeats: the next tick retries
                logger.exception("job %s: progress report failed", self.job.id)

    def tick(self, final: bool = False) -> None:
        with self._lock:
            held, control = self._record()
        if not final:
            self.on_tick(control if held else "lost")

    def record(self) -> None:
        """Record progress now (called before the recipe's console lines, from the recipe's thread)."""
        with self._lock:
            self._record()

    def _record(self) -> tuple[bool, str | None]:
        checkpoints = self._new_checkpoints()  # listed first: the loop logs a step before saving its checkpoint
        progress = self._progress()
        for step, path in checkpoints:  # each checkpoint's event goes right after its step's event
            done = [e for e in progress.events if (e.data or {}).get("step", 0) <= step]
            progress.events = progress.events[len(done) :]
            if done:  # with the step count in the same transaction: a resumed run must not report them again
                last = (done[-1].data or {})["step"]
                self._heartbeat(Progress(done, last_step=last))
            self._add_checkpoint(path, step)
        return self._heartbeat(progress)

    def _heartbeat(self, progress: Progress) -> tuple[bool, str | None]:
        return self.store.leases.heartbeat(self.job.id, self.worker_id, self.settings.lease_s, progress)

    def _progress(self) -> Progress:
        rows = self.metrics.read()
        # A metrics row may carry the total itself (see the note on train/loop.py); else the console line gives it.
        total = int(rows[-1].get("total_steps") or 0) or self.log.total_steps if rows else self.log.total_steps
        progress = Progress(total_steps=total)
        steps = [row for row in rows if is_step_row(row)]
        for row in rows:
            if not is_step_row(row):
                progress.events.append(validation_event(row, total))
                continue
            self.history[int(row["step"])] = row
            progress.events.append(metrics_event(row, total))
        if steps:
            self.last_row = steps[-1]
            progress.last_step = self.metrics.last_step
            progress.trained_tokens = int(steps[-1]["tokens"])
            progress.estimated_finish = _eta(steps[-1], total)
        return progress

    def _new_checkpoints(self) -> list[tuple[int, Path]]:
        steps = [(checkpoint_step(p) or 0, p) for p in checkpoint_folders(self.checkpoints)]
        return [(step, path) for step, path in steps if step not in self.known_steps]

    def _add_checkpoint(self, path: Path, step: int) -> None:
        self.known_steps.add(step)
        event = Event(f"Checkpoint created at step {step}", data={"step": step})
        for old in self.store.models.add_checkpoint(self._checkpoint_row(path, step), self.job.keep_checkpoints, event):
            self.artefacts.remove(Path(old))  # here and in the bucket: the database no longer lists it

    def _checkpoint_row(self, path: Path, step: int) -> CheckpointRow:
        loss = self.history.get(step, {}).get("loss")
        if loss is None:  # recorded before this run saw the step: the checkpoint's own history has it
            loss = _checkpoint_loss(path, step)
        return CheckpointRow(
            id=new_id("ftckpt"),
            job_id=self.job.id,
            project_id=self.job.project_id,
            created_at=now(),
            step_number=step,
            metrics={"step": step, "train_loss": loss},
            model_name=f"{fine_tuned_name(self.job)}:ckpt-step-{step}",
            path=str(path),
        )


def metrics_event(row: dict[str, Any], total: int | None) -> Event:
    step = int(row["step"])
    of = f"/{total}" if total else ""
    data = {
        "step": step,
        "total_steps": total,
        "train_loss": row["loss"],
        "learning_rate": row["lr"],
        "grad_norm": row["grad_norm"],
        "tokens": row["tokens"],
        "tokens_per_s": row["tokens_per_s"],
    }
    # What the objective adds to each step (DPO: reward accuracy and margin, chosen/rejected log-probabilities).
    data |= {k: v for k, v in row.items() if k not in LOOP_KEYS}
    return Event(f"Step {step}{of}: training loss={row['loss']:.4f}", type="metrics", data=data)


def validation_event(row: dict[str, Any], total: int | None) -> Event:
    """A validation-loss point measured during training (`train.eval_every`), as OpenAI's `valid_loss`."""
    step = int(row["step"])
    of = f"/{total}" if total else ""
    data = {"step": step, "total_steps": total, "valid_loss": row["loss"]}
    data |= {f"valid_{k}": v for k, v in row.items() if k not in ("step", "loss", EVAL_KEY)}
    return Event(f"Step {step}{of}: validation loss={row['loss']:.4f}", type="metrics", data=data)


LOOP_KEYS = frozenset({"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"})


def _eta(row: dict[str, Any], total: int | None) -> float | None:
    step = int(row["step"])
    if not total or step <= 0 or not math.isfinite(row["elapsed_s"]):
        return None
    return now() + row["elapsed_s"] / step * max(total - step, 0)


def _checkpoint_loss(path: Path, step: int) -> float | None:
    try:
        history = json.loads(CheckpointLayout(path).trainer_state.read_text(encoding="utf-8"))["history"]
    except (OSError, ValueError, KeyError):
        return None
    return next((float(h["loss"]) for h in history if int(h["step"]) == step), None)
