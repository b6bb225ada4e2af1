"""`tunelab service`: the API (uvicorn, in this process) and N worker processes, restarted when they die.

Workers run in their own process group, so a Ctrl-C in the terminal reaches only this process; it then stops the
API and asks each worker to stop (SIGTERM): the worker checkpoints its job and queues it again for the next start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

import uvicorn
from rich.console import Console

from tunelab.job_service.api import create_app
from tunelab.job_service.settings import ServiceSettings
from tunelab.job_service.store import Store

if TYPE_CHECKING:
    from tunelab.job_service.ray_executor import RayExecutor

RESTART_DELAY_S = 2.0
QUICK_DEATH_S = 10.0  # a worker that dies sooner than this after starting is restarted only after a delay


@dataclass
class Slot:
    name: str
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    started: float = field(default_factory=time.monotonic)

    @property
    def worker_id(self) -> str:
        return f"{self.name}-{self.process.pid}"


class Supervisor:
    def __init__(self, settings: ServiceSettings, store: Store, console: Console) -> None:
        self.settings, self.store, self.console = settings, store, console
        self.slots: list[Slot] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    def start(self) -> None:
        self.settings.logs_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.slots = [self._spawn(f"w{i}") for i in range(self.settings.workers)]
        self._watcher.start()

    def _spawn(self, name: str) -> Slot:
        log = (self.settings.logs_dir / f"{name}.log").open("ab")
        command = [sys.executable, "-m", "tunelab.job_service.worker", "--settings", self.settings.model_dump_json()]
        process = subprocess.Popen(
            [*command, "--name", name, "--parent", str(os.getpid())],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        slot = Slot(name, process, log)
        self.console.print(f"worker {slot.worker_id} started (log: {self.settings.logs_dir / (name + '.log')})")
        return slot

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            with self._lock:
                for i, slot in enumerate(self.slots):
                    code = slot.process.poll()
                    if code is None or self._stopping.is_set():
                        continue
                    self._lost(slot, code)
                    if time.monotonic() - slot.started < QUICK_DEATH_S:
                        time.sleep(RESTART_DELAY_S)  # a worker that dies at start must not spin
                    self.slots[i] = self._spawn(slot.name)

    def _lost(self, slot: Slot, code: int) -> None:
        slot.log.close()
        # This worker is certainly dead: its job need not wait for the lease to expire.
        requeued = self.store.leases.expire(self.settings.max_attempts, owner=slot.worker_id)
        jobs = f"; job {', '.join(requeued)} re-queued" if requeued else ""
        self.console.print(f"[yellow]worker {slot.worker_id} exited with code {code}{jobs}[/]")

    def stop(self, timeout_s: float) -> None:
        """SIGTERM every worker, wait for them to checkpoint and release their jobs, then SIGKILL stragglers."""
        self._stopping.set()
        with self._lock:
            for slot in self.slots:
                if slot.process.poll() is None:
                    slot.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            for slot in self.slots:
                try:
                    slot.process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    slot.process.kill()
                    slot.process.wait()
                    self.store.leases.expire(self.settings.max_attempts, owner=slot.worker_id)
                slot.log.close()

    def status(self) -> list[dict[str, object]]:
        with self._lock:
            return [{"worker": s.worker_id, "alive": s.process.poll() is None} for s in self.slots]


def serve(settings: ServiceSettings, console: Console, stop_timeout_s: float = 120.0) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(settings.database_url, pool_size=20)
    store.upgrade()
    (settings.data_dir / "service.json").write_text(json.dumps(_describe(settings), indent=1), encoding="utf-8")
    supervisor = _executor(settings, store, console)
    supervisor.start()
    console.print(f"tunelab service on http://{settings.host}:{settings.port}/v1 ({_db_label(settings)})")
    config = uvicorn.Config(
        create_app(settings, store), host=settings.host, port=settings.port, log_level="warning", access_log=False
    )
    # uvicorn re-raises the signal that stopped it once it has shut down; with the default handlers that would kill
    # this process before it stops the workers, so catch both signals here (the finally block does the stopping).
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        console.print("stopping workers (each checkpoints its job first)")
        supervisor.stop(stop_timeout_s)
        store.close()


def _executor(settings: ServiceSettings, store: Store, console: Console) -> Supervisor | RayExecutor:
    if settings.executor == "ray":
        from tunelab.job_service.ray_executor import RayExecutor

        return RayExecutor(settings, store, console)
    return Supervisor(settings, store, console)


def _db_label(settings: ServiceSettings) -> str:
    url = settings.database_url
    return "SQLite " + url.removeprefix("sqlite:///") if url.startswith("sqlite") else url.split("@")[-1]


def _describe(settings: ServiceSettings) -> dict[str, object]:
    """What is running, for people and tests (no secrets: the database password is left out)."""
    url = f"http://{settings.host}:{settings.port}/v1"
    return {"url": url, "database": _db_label(settings), "pid": os.getpid(), "executor": settings.executor}
