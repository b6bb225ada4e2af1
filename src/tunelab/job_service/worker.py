"""A worker process: it takes queued jobs one at a time under a lease and runs the recipe in its main thread
(`run_job`, exactly as `tunelab train` does), while a monitor thread renews the lease and reports progress.

Stopping uses the training loop's own Ctrl-C path: a SIGINT makes the loop finish its step, save a checkpoint and
return, so pause, cancel and a graceful shutdown all leave a checkpoint to resume from. A worker killed outright
stops renewing its lease; the job is then queued again and `run_job(resume=True)` continues from the last
checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from rich.console import Console

from tunelab.config import JobSpec
from tunelab.errors import ConfigError, DataError, ModelError, TunelabError
from tunelab.job_service.artefacts import Artefacts
from tunelab.job_service.db import JobRow
from tunelab.job_service.ids import now
from tunelab.job_service.monitor import EventLog, Monitor, fine_tuned_name
from tunelab.job_service.results import model_row, result_files
from tunelab.job_service.settings import ServiceSettings
from tunelab.job_service.store import Event, Store
from tunelab.layout import RunLayout, checkpoint_name, checkpoint_step
from tunelab.metrics import lower_is_better
from tunelab.recipe import RunSummary, run_job
from tunelab.report import compare
from tunelab.storage import RunMirror
from tunelab.train.checkpoint import latest_checkpoint

log = logging.getLogger("tunelab.job_service.worker")
# Where a job goes when the worker stops it on request ("lost": another worker holds it now; leave it alone).
STOPPED_STATUS = {"pause": "paused", "cancel": "cancelled", "shutdown": "queued"}
STOPPED_EVENT = {
    "pause": "Job paused at step {step}; resume continues from the checkpoint",
    "cancel": "Job cancelled at step {step}",
    "shutdown": "Worker stopping: job queued again at step {step}; it resumes from the checkpoint",
}


@dataclass
class Outcome:
    status: str
    events: list[Event]
    values: dict[str, Any]


class Worker:
    def __init__(
        self, settings: ServiceSettings, worker_id: str, store: Store | None = None, parent: int | None = None
    ) -> None:
        self.settings = settings
        self.id = worker_id
        self.parent = parent  # the supervisor: when it is gone, stop (checkpointing) rather than run orphaned
        self.store = store or Store(settings.database_url, pool_size=2)
        self.stopping = threading.Event()
        self._stop_reason: str | None = None
        self._absorbed_at: int | None = None  # step seen when a SIGINT arrived outside the training loop
        self._resent = False
        self._monitor: Monitor | None = None

    # The loop.

    def run_forever(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.shutdown())
        signal.signal(signal.SIGINT, self.on_sigint)
        log.info("worker %s ready", self.id)
        while not self.stopping.is_set():
            if self._orphaned():
                break
            self.store.leases.expire(self.settings.max_attempts)
            job = self.store.leases.claim(self.id, self.settings.lease_s)
            if job is None:
                self.stopping.wait(self.settings.poll_s)
                continue
            self.run_one(job)
        log.info("worker %s stopped", self.id)

    def _orphaned(self) -> bool:
        if self.parent is None or os.getppid() == self.parent:
            return False
        if self.stopping.is_set():
            return True
        log.warning("worker %s: supervisor %s is gone; stopping", self.id, self.parent)
        self.shutdown()
        return True

    def shutdown(self) -> None:
        self.stopping.set()
        self.request_stop("shutdown")

    def run_one(self, job: JobRow) -> None:
        spec = self._spec_here(JobSpec.model_validate(job.spec))
        self._stop_reason, self._absorbed_at, self._resent = None, None, False
        resume_from = self._resume_point(spec)
        started = f"Resuming from checkpoint {resume_from}" if resume_from else "Fine-tuning job started"
        where = {"worker": self.id, "pid": os.getpid(), "lost_workers": job.attempts}
        self.store.jobs.add_events(job.id, [Event(started, data=where)])
        event_log = EventLog(self.store, job.id, spec)
        console = Console(file=event_log, force_terminal=False, color_system=None, width=400)  # type: ignore[arg-type]
        summary: RunSummary | None = None
        error: BaseException | None = None
        with Monitor(self.settings, self.store, job, self.id, event_log, self.on_tick) as monitor:
            self._monitor = monitor
            try:
                summary = run_job(spec, resume=resume_from is not None, console=console)  # fetches it if remote
            except (Exception, KeyboardInterrupt) as exc:  # any failure is the job's, not the worker's
                error = exc
                log.error("job %s: %s", job.id, "".join(traceback.format_exception(exc)))
            self._monitor = None
        self._finish(job, summary, error, monitor.metrics.last_step)

    def _spec_here(self, spec: JobSpec) -> JobSpec:
        """The job's spec on this node: with object storage, its data files fetched if they are not here, and its
        folder mirrored to the bucket as it trains."""
        artefacts = Artefacts.of(self.settings)
        if artefacts.jobs_url is None:
            return spec
        for path in (spec.data.train, spec.data.validation):
            if isinstance(path, Path):  # the service names one uploaded file for each
                artefacts.local(path)
        return spec.model_copy(update={"storage": artefacts.jobs_url})

    def _resume_point(self, spec: JobSpec) -> str | None:
        """The name of the latest checkpoint, here or (with object storage) in the bucket; None for a fresh start."""
        layout = RunLayout(Path(spec.output_dir))
        local = latest_checkpoint(layout.checkpoints)
        step = checkpoint_step(local) if local is not None else None
        remote = RunMirror(spec.storage, layout.root).latest_remote_step() if spec.storage else None
        if remote is not None and (step is None or remote > step):
            return checkpoint_name(remote)
        return local.name if local is not None else None

    # Stopping a running job.

    def on_tick(self, request: str | None) -> None:
        """Called by the monitor each heartbeat with the job's pending request, if any."""
        if request is not None:
            self.request_stop(request)
        self._orphaned()
        self._resend_if_absorbed()

    def request_stop(self, reason: str) -> None:
        """Ask the training loop to stop after its current step (one SIGINT; a second would stop it mid-step)."""
        if self._stop_reason is not None:
            if reason == "cancel":
                self._stop_reason = reason  # a cancel overrides a pause that is already stopping the loop
            return
        self._stop_reason = reason
        if self._monitor is not None:
            os.kill(os.getpid(), signal.SIGINT)

    def on_sigint(self, signum: int, frame: FrameType | None) -> None:
        # Outside the training loop (loading, evaluating, exporting) a SIGINT must not raise KeyboardInterrupt
        # in the middle of writing files; remember it, and repeat it once the loop runs (see _resend_if_absorbed).
        monitor = self._monitor
        self._absorbed_at = monitor.metrics.last_step if monitor else 0
        if self._stop_reason is None:
            self.shutdown()  # a Ctrl-C aimed at the worker process itself

    def _resend_if_absorbed(self) -> None:
        monitor = self._monitor
        if monitor is None or self._absorbed_at is None or self._resent:
            return
        if monitor.metrics.last_step > self._absorbed_at:  # a step finished since: the loop's handler is active
            self._resent = True
            os.kill(os.getpid(), signal.SIGINT)

    # Ending a job.

    def _finish(self, job: JobRow, summary: RunSummary | None, error: BaseException | None, step: int) -> None:
        reason = self._stop_reason
        if reason == "lost":
            log.warning("job %s: lease lost; another worker owns it now", job.id)
            return
        if error is not None:
            outcome = self._stopped(reason, step) if reason else _failed(error)
        elif summary is not None and summary.interrupted:
            outcome = self._stopped(reason or "shutdown", step)
        else:
            assert summary is not None  # narrowed for mypy: no error means run_job returned
            return self._succeed(job, summary, reason)
        self.store.leases.release(job.id, self.id, outcome.status, outcome.events, **outcome.values)

    def _stopped(self, reason: str, step: int) -> Outcome:
        status = STOPPED_STATUS[reason]
        values = {"finished_at": now()} if status == "cancelled" else {}
        return Outcome(status, [Event(STOPPED_EVENT[reason].format(step=step))], values)

    def _succeed(self, job: JobRow, summary: RunSummary, reason: str | None) -> None:
        if reason == "cancel":  # asked while evaluating or exporting: the user's cancel still wins
            self.store.leases.release(job.id, self.id, "cancelled", [Event("Job cancelled")], finished_at=now())
            return
        files = result_files(self.settings, job, summary)
        model = model_row(job, summary)
        events = []
        if summary.after:
            shown = ", ".join(_scored(k, v, summary.before.get(k)) for k, v in summary.after.items())
            events.append(Event(f"Validation after training: {shown}", type="metrics", data=dict(summary.after)))
        events += [Event(f"New fine-tuned model created: {model.id}"), Event("The job has successfully completed")]
        self.store.leases.release(
            job.id,
            self.id,
            "succeeded",
            events,
            model=model,
            files=files,
            fine_tuned_model=fine_tuned_name(job),
            result_files=[f.id for f in files],
            finished_at=now(),
            estimated_finish=None,
        )


def _scored(name: str, after: float, before: float | None) -> str:
    """`accuracy 0.9000 (better)`: the verdict follows the metric's declared direction (tunelab.metrics)."""
    _, verdict = compare(before, after, lower_is_better(name))
    return f"{name} {after:.4f}" + (f" ({verdict})" if verdict else "")


def _failed(error: BaseException) -> Outcome:
    code, param = "training_failed", None
    if isinstance(error, DataError):
        code, param = "invalid_file_format", "training_file"
    elif isinstance(error, ConfigError):
        code = "invalid_spec"
    elif isinstance(error, ModelError):
        code = "model_load_failed"
    elif not isinstance(error, TunelabError):
        code = "internal_error"
    message = str(error) if isinstance(error, TunelabError) else f"{type(error).__name__}: {error}"
    return Outcome(
        "failed",
        [Event(f"Job failed: {message}", level="error")],
        {"error": {"code": code, "message": message, "param": param}, "finished_at": now()},
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A tunelab service worker (started by `tunelab service`).")
    parser.add_argument("--settings", required=True, help="ServiceSettings as JSON.")
    parser.add_argument("--name", default="w", help="Worker name; the worker id is NAME-PID.")
    parser.add_argument("--parent", type=int, default=None, help="Stop when this process (the supervisor) is gone.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    settings = ServiceSettings.model_validate_json(args.settings)
    if settings.worker_nice:
        os.nice(settings.worker_nice)  # training yields the CPU to the API: its latency matters more
    torch.set_num_threads(settings.threads_per_process())
    Worker(settings, f"{args.name}-{os.getpid()}", parent=args.parent).run_forever()


if __name__ == "__main__":
    main()
