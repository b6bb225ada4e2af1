"""Load on the service API while a job trains: N concurrent clients poll a job and its events.

Starts `tunelab service` (SQLite, one worker) on a free loopback port, creates a key, uploads chat data, starts a
fine-tuning job on the embedded model (long enough to outlast the bench), waits until it trains, then runs the
clients for DURATION seconds and prints p50/p90/p99/max latency, errors, requests/s, and how far training got
meanwhile. The job is cancelled and the service stopped at the end. Goal: p99 < 50 ms, 0 errors.

    .venv/bin/python bench/service_load.py                # 100 clients, 60 s, each polling every 0.5 s
    .venv/bin/python bench/service_load.py --clients 100 --duration 60 --interval 0.5 --model embedded
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).parents[1]
CHAT = ROOT / "data" / "chat" / "train.jsonl"


@dataclass
class Stats:
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_service(data_dir: Path, port: int, model_args: list[str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "tunelab.job_service.cli", "--data-dir", str(data_dir), "--port", str(port)]
    log = (data_dir / "service.log").open("wb")
    return subprocess.Popen([*command, "--workers", "1", *model_args], stdout=log, stderr=subprocess.STDOUT)


def create_key(data_dir: Path) -> str:
    command = [sys.executable, "-m", "tunelab.job_service.cli", "keys", "create", "--project", "bench"]
    done = subprocess.run([*command, "--data-dir", str(data_dir)], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def wait_healthy(base: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the service exited; see its log")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("the service did not start")


def start_job(client: httpx.Client, model: str, examples: int, data_dir: Path) -> str:
    train = data_dir / "train.jsonl"
    train.write_text("\n".join(CHAT.read_text(encoding="utf-8").splitlines()[:examples]) + "\n", encoding="utf-8")
    uploaded = client.post("/files", files={"file": train.open("rb")}, data={"purpose": "fine-tune"}).json()
    # Many steps and no evaluation: the job must still be training when the bench ends (it is cancelled then).
    spec = {"train": {"max_steps": 100_000, "batch_size": 4, "max_seq_len": 256}, "eval": {"enabled": False}}
    body = {"model": model, "training_file": uploaded["id"], "tunelab": {"spec": spec}}
    job = client.post("/fine_tuning/jobs", json=body).json()
    return str(job["id"])


def wait_training(client: httpx.Client, job_id: str, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/fine_tuning/jobs/{job_id}").json()
        if job["status"] == "failed":
            raise SystemExit(f"the job failed: {job['error']}")
        if job["tunelab"]["step"] >= 1:
            return int(job["tunelab"]["step"])
        time.sleep(1)
    raise SystemExit("the job did not start training")


class Connection:
    """One keep-alive HTTP/1.1 connection, written for this bench: a general client (httpx) spent as much CPU per
    request as the server, and on 2 cores the load generator must not be what is measured."""

    def __init__(self, host: str, port: int, key: str) -> None:
        self.host, self.port = host, port
        self.headers = f"Host: {host}:{port}\r\nAuthorization: Bearer {key}\r\n\r\n"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"GET {path} HTTP/1.1\r\n{self.headers}".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def poller(conn: Connection, job_id: str, until: float, interval: float, stats: Stats) -> None:
    paths = [f"/v1/fine_tuning/jobs/{job_id}", f"/v1/fine_tuning/jobs/{job_id}/events?limit=20"]
    try:
        while time.monotonic() < until:
            for path in paths:
                started = time.perf_counter()
                try:
                    status, body = await asyncio.wait_for(conn.get(path), timeout=10)
                    json.loads(body)
                except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, StopIteration) as exc:
                    stats.error(type(exc).__name__)
                    conn.close()
                    conn.reader = conn.writer = None
                    continue
                stats.latencies_ms.append((time.perf_counter() - started) * 1000)
                if status != 200:
                    stats.error(f"HTTP {status}")
            await asyncio.sleep(interval)
    finally:
        conn.close()


async def run_clients(host: str, port: int, key: str, job_id: str, args: argparse.Namespace) -> Stats:
    stats = Stats()
    until = time.monotonic() + args.duration
    tasks = []
    for _ in range(args.clients):
        await asyncio.sleep(args.interval / args.clients)  # clients start spread over one interval, as real ones
        conn = Connection(host, port, key)
        tasks.append(asyncio.create_task(poller(conn, job_id, until, args.interval, stats)))
    await asyncio.gather(*tasks)
    return stats


def _run(coro: Any) -> Stats:
    try:
        import uvloop  # the faster event loop, when installed (uvicorn's "standard" extra brings it)

        return uvloop.run(coro)  # type: ignore[no-any-return]
    except ImportError:
        return asyncio.run(coro)  # type: ignore[no-any-return]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")


def report(stats: Stats, args: argparse.Namespace, steps: tuple[int, int], elapsed: float) -> dict[str, Any]:
    lat = stats.latencies_ms
    result = {
        "clients": args.clients,
        "duration_s": round(elapsed, 1),
        "interval_s": args.interval,
        "requests": len(lat),
        "requests_per_s": round(len(lat) / elapsed, 1),
        "p50_ms": round(percentile(lat, 50), 2),
        "p90_ms": round(percentile(lat, 90), 2),
        "p99_ms": round(percentile(lat, 99), 2),
        "max_ms": round(max(lat, default=float("nan")), 2),
        "errors": sum(stats.errors.values()),
        "error_kinds": stats.errors,
        "training_steps_during_bench": steps[1] - steps[0],
        "load_average_1min_after": round(os.getloadavg()[0], 2),  # other work on the machine skews the figures
        "cpu_count": os.cpu_count(),
    }
    result["goal_met"] = result["p99_ms"] < 50 and result["errors"] == 0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=0.5, help="Pause between a client's polls (s).")
    parser.add_argument("--model", default="embedded", help="'embedded' or NAME=PATH of a local model folder.")
    parser.add_argument("--examples", type=int, default=200, help="Training examples uploaded.")
    parser.add_argument("--keep", action="store_true", help="Keep the service's data folder.")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="tunelab-bench-"))
    model_args, model = (["--model", args.model], args.model.split("=")[0]) if "=" in args.model else ([], args.model)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = start_service(data_dir, port, model_args)
    try:
        wait_healthy(base, process)
        key = create_key(data_dir)
        with httpx.Client(base_url=base + "/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
            job_id = start_job(client, model, args.examples, data_dir)
            first = wait_training(client, job_id)
            started = time.monotonic()
            stats = _run(run_clients("127.0.0.1", port, key, job_id, args))
            elapsed = time.monotonic() - started
            last = int(client.get(f"/fine_tuning/jobs/{job_id}").json()["tunelab"]["step"])
            client.post(f"/fine_tuning/jobs/{job_id}/cancel")
        print(json.dumps(report(stats, args, (first, last), elapsed), indent=1))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(180)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(data_dir)], check=False)
        else:
            print(f"data kept in {data_dir}", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
