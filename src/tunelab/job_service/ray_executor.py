"""`tunelab service --executor ray`: each job runs as a Ray task on a cluster instead of in a local worker process.

The database stays the only scheduler. Each of `workers` dispatch slots (a thread here) picks the oldest queued job
nobody is dispatching and submits one Ray task with the job's resources; the task claims that job under a lease and
runs `Worker.run_one` on it, the code local workers run, so statuses, events, checkpoints, pause, cancel and resume
behave the same. The lease starts only when the task runs, so a job waiting for cluster resources stays queued.

A task whose Ray worker or node dies fails its object reference: the slot expires that task's lease at once and the
job is queued again, to resume from its last checkpoint wherever it lands next. The lease keeps a job from running
twice at once: a task that lost its lease (cut off from the database longer than `lease_s`) stops by itself.

Service stop: the service cannot signal a Ray task, so it asks through the database (control "shutdown", read by the
task's monitor), and waits for the tasks to checkpoint and queue their jobs again before leaving the cluster.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Console

from tunelab.extras import optional_import
from tunelab.job_service.db import JobRow
from tunelab.job_service.settings import ServiceSettings
from tunelab.job_service.store import Store

if TYPE_CHECKING:
    from tunelab.job_service.worker import Worker

RAY_FEATURE = "tunelab service --executor ray"


@dataclass
class Dispatch:
    """The job a slot has submitted, and the lease owner its task claims it as."""

    job_id: str
    worker_id: str
    ref: Any


class RayExecutor:
    """Same interface as the local Supervisor: start(), stop(timeout_s), status()."""

    def __init__(self, settings: ServiceSettings, store: Store, console: Console) -> None:
        self.settings, self.store, self.console = settings, store, console
        self.ray = optional_import("ray", "ray", RAY_FEATURE)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._dispatched: dict[str, Dispatch] = {}  # slot name -> its job in flight
        self._threads: list[threading.Thread] = []
        self._task: Any = None

    def start(self) -> None:
        if not self.ray.is_initialized():
            # No address: a local cluster of this machine's cores, gone when the service stops.
            self.ray.init(address=self.settings.ray_address)
        # max_retries=0: a lost task is retried through the lease (from its checkpoint), never by Ray from scratch.
        self._task = self.ray.remote(max_retries=0)(run_task)
        resources = self.ray.cluster_resources()
        self.console.print(f"Ray executor: {self.settings.workers} job slot(s) on a cluster with {resources}")
        for i in range(self.settings.workers):
            thread = threading.Thread(target=self._slot, args=(f"s{i}",), name=f"ray-slot-{i}", daemon=True)
            self._threads.append(thread)
            thread.start()

    # A slot: pick a job, run it on the cluster, repeat.

    def _slot(self, name: str) -> None:
        while not self._stopping.is_set():
            try:
                self.store.leases.expire(self.settings.max_attempts)
                job = self._pick(name)
                if job is None:
                    self._stopping.wait(self.settings.poll_s)
                    continue
                self._run(name, job)
            except Exception as exc:  # a database hiccup must not end the slot: the next round retries
                self.console.print(f"[yellow]ray slot {name}: {type(exc).__name__}: {exc}[/]")
                self._stopping.wait(self.settings.poll_s)

    def _pick(self, name: str) -> Dispatch | None:
        with self._lock:
            busy = {d.job_id for d in self._dispatched.values()}
            job = next((j for j in self.store.leases.queued(len(busy) + 1) if j.id not in busy), None)
            if job is None:
                return None
            worker_id = f"ray-{name}-{uuid.uuid4().hex[:8]}"
            options = job_resources(self.settings, job)
            settings = self.settings.model_dump_json()
            ref = self._task.options(**options).remote(settings, worker_id, job.id, options["num_cpus"])
            self._dispatched[name] = Dispatch(job.id, worker_id, ref)
            return self._dispatched[name]

    def _run(self, name: str, dispatch: Dispatch) -> None:
        lost = False
        try:
            self._wait(dispatch)
        except self.ray.exceptions.RayError as exc:  # the task's worker or node died (or the task raised)
            lost = True
            self.console.print(f"[yellow]Ray task {dispatch.worker_id} lost: {type(exc).__name__}: {exc}[/]")
        finally:
            with self._lock:
                del self._dispatched[name]
        # The task is over either way: whatever lease it still holds is a dead worker's (local: Supervisor._lost).
        requeued = self.store.leases.expire(self.settings.max_attempts, owner=dispatch.worker_id)
        if requeued:
            self.console.print(f"[yellow]job {', '.join(requeued)} re-queued (its Ray task was lost)[/]")
        if lost:
            self._stopping.wait(self.settings.poll_s)  # a task that cannot start at all must not be resubmitted hot

    def _wait(self, dispatch: Dispatch) -> None:
        while True:
            ready, _ = self.ray.wait([dispatch.ref], timeout=0.5)
            if ready:
                self.ray.get(dispatch.ref)
                return
            try:
                job = self.store.jobs.by_id(dispatch.job_id)
            except Exception:  # a database hiccup: keep following the task, which is what holds the job
                continue
            if job is not None and job.lease_owner == dispatch.worker_id:
                continue  # running: it ends by itself, and a stop reaches it through the database
            if self._stopping.is_set() or job is None or job.status != "queued":
                # Still waiting for resources, and no longer wanted (stopping, cancelled or paused meanwhile): drop
                # it. Should it claim the job right now, its lease is expired at once (see _run).
                self.ray.cancel(dispatch.ref)
                return

    # Stopping.

    def stop(self, timeout_s: float) -> None:
        """Ask every running task to checkpoint and queue its job again, wait for them, then leave the cluster."""
        self._stopping.set()
        deadline = time.monotonic() + timeout_s
        while any(t.is_alive() for t in self._threads) and time.monotonic() < deadline:
            with self._lock:
                owners = [d.worker_id for d in self._dispatched.values()]
            for owner in owners:  # repeated: a task that claims its job after the first round is asked too
                self.store.leases.request_shutdown(owner)
            for thread in self._threads:
                thread.join(timeout=0.2)
        with self._lock:
            late = list(self._dispatched.values())
        for dispatch in late:
            self.ray.cancel(dispatch.ref, force=True)
        self.ray.shutdown()  # a driver's tasks end with it
        for dispatch in late:  # killed before they released their job: queue it again
            self.store.leases.expire(self.settings.max_attempts, owner=dispatch.worker_id)

    def status(self) -> list[dict[str, object]]:
        with self._lock:
            return [{"worker": d.worker_id, "job": d.job_id} for d in self._dispatched.values()]


def job_resources(settings: ServiceSettings, job: JobRow) -> dict[str, Any]:
    """Ray task options for `job`: its request's `tunelab.resources`, else the service's per-job defaults."""
    asked = job.resources or {}
    options: dict[str, Any] = {
        "num_cpus": asked.get("cpus", settings.ray_cpus_per_job),
        "num_gpus": asked.get("gpus", settings.ray_gpus_per_job),
    }
    memory_mb = asked.get("memory_mb", settings.ray_memory_mb_per_job)
    if memory_mb:
        options["memory"] = memory_mb * 2**20
    return options


def run_task(settings_json: str, worker_id: str, job_id: str, cpus: float) -> str:
    """The Ray task: claim `job_id` as `worker_id` and run it as a local worker would. Returns what happened."""
    import torch

    from tunelab.job_service.worker import Worker

    settings = ServiceSettings.model_validate_json(settings_json)
    store = Store(settings.database_url, pool_size=2)
    try:
        job = store.leases.claim(worker_id, settings.lease_s, job_id=job_id)
        if job is None:
            return "not queued any more"  # cancelled, or paused, while the task waited for resources
        torch.set_num_threads(max(1, int(cpus)))  # the job's share of its node, as Ray reserved it
        worker = Worker(settings, worker_id, store=store)
        with _stop_signals(worker):
            worker.run_one(job)
        return "ran"
    finally:
        store.close()


@contextmanager
def _stop_signals(worker: Worker) -> Iterator[None]:
    """The worker stops its training loop with a SIGINT to its own process. A Ray task runs on its worker process's
    main thread, so the loop's handler works there, but Ray blocks SIGINT in its workers (measured with Ray 2.60:
    the signal never arrives): unblock it for the job, which also reaches the monitor thread started after this.
    Outside the loop the worker's own handler defers the signal."""
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    previous = signal.signal(signal.SIGINT, worker.on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
