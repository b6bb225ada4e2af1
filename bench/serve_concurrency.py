"""`tunelab serve` under concurrent streaming clients: total tokens/s and time to first token, 1 client against many.

Starts `tunelab serve` (PyTorch engine, continuous batching) on a free loopback port in its own process, so the
clients do not share the server's interpreter, then for each client count C runs C clients at once, each sending
`--requests` streaming chat requests one after another (different questions, greedy, `--max-tokens` each). It
prints, per C: completion tokens per second in total (tokens / wall time), p50 and p90 time to first content token,
and the ratio of tokens/s against the 1-client run of the same invocation. `--unbatched` adds the highest client
count once more against a server started with `--max-batch 1` (requests take turns, as before batching).
Goal: 16 clients >= 4x the total tokens/s of one.

    .venv/bin/python bench/serve_concurrency.py --max-tokens 32              # the embedded SmolLM2-135M
    .venv/bin/python bench/serve_concurrency.py --model tiny --max-tokens 32 # the tests' tiny Llama, a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).parents[1]
QUESTIONS = [
    "what is your name",
    "write a short poem about the sea",
    "how do I boil an egg?",
    "explain what a neural network is in two sentences",
    "list three colours",
    "what is the capital of France and why is it famous",
    "tell me a joke",
    "give me a tip for learning Python",
]


@dataclass
class Level:
    clients: int
    tokens: int = 0
    wall_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = info.splitlines()
    name = next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor()
    )
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    shown = [f for f in ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return (
        f"{name}; {os.cpu_count()} logical cores; flags {' '.join(shown) or 'none of avx*'}; OMP_NUM_THREADS={threads}"
    )


def tiny_model(folder: Path) -> str:
    """The tests' tiny Llama (tests/tiny.py), built into `folder`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import build_tiny_llama, build_tiny_tokenizer

    return str(build_tiny_llama(folder / "model", build_tiny_tokenizer(folder / "tokenizer")))


def start_server(model: str, port: int, max_batch: int, log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "tunelab.inference_server.cli", "--model", model, "--name", "bench"]
    command += ["--port", str(port), "--max-batch", str(max_batch)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)


async def wait_ready(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(1200):
            if server.poll() is not None:
                raise SystemExit(f"the server exited:\n{log.read_text()[-2000:]}")
            try:
                if (await client.get(f"{url}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.25)
    raise SystemExit("the server did not start within 5 minutes")


async def one_request(client: httpx.AsyncClient, url: str, question: str, max_tokens: int) -> tuple[int, float]:
    """Streams one chat completion: (completion tokens, seconds to the first content token)."""
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    return tokens, first if first is not None else time.perf_counter() - started


async def run_level(url: str, clients: int, requests: int, max_tokens: int) -> Level:
    level = Level(clients)

    async def client_loop(index: int, client: httpx.AsyncClient) -> None:
        for r in range(requests):
            tokens, ttft = await one_request(client, url, QUESTIONS[(index + r) % len(QUESTIONS)], max_tokens)
            level.tokens += tokens
            level.ttft_s.append(ttft)

    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
        level.wall_s = time.perf_counter() - started
    return level


async def bench_server(
    model: str, max_batch: int, counts: list[int], args: argparse.Namespace, tmp: Path
) -> list[Level]:
    port, log = free_port(), tmp / f"serve-batch{max_batch}.log"
    server = start_server(model, port, max_batch, log)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url, server, log)
        await run_level(url, 1, 1, 4)  # warm-up: first-call costs are not the baseline's
        return [await run_level(url, c, args.requests, args.max_tokens) for c in counts]
    finally:
        server.terminate()
        server.wait(timeout=30)


def report(levels: list[Level], baseline: float, label: str) -> None:
    for level in levels:
        ttft = sorted(level.ttft_s)
        p50, p90 = statistics.median(ttft), ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))]
        print(
            f"| {label} | {level.clients} | {level.tokens} | {level.wall_s:.1f} | {level.tokens_per_s:.1f} "
            f"| {level.tokens_per_s / baseline:.2f}x | {p50 * 1000:.0f} | {p90 * 1000:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="'embedded', 'tiny' (the tests' model) or a model folder")
    parser.add_argument("--clients", default="1,4,16", help="client counts, comma-separated; the first is the base")
    parser.add_argument("--requests", type=int, default=2, help="requests each client sends, one after another")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--unbatched", action="store_true", help="also the highest count against --max-batch 1")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as folder:
        tmp = Path(folder)
        model = tiny_model(tmp) if args.model == "tiny" else args.model
        print(f"machine: {machine()}")
        print(
            f"model: {args.model}; {args.requests} streaming requests per client, max_tokens {args.max_tokens}, greedy"
        )
        levels = asyncio.run(bench_server(model, args.max_batch, counts, args, tmp))
        baseline = levels[0].tokens_per_s
        print("\n| server | clients | tokens | wall s | tokens/s | vs 1 client | TTFT p50 ms | TTFT p90 ms |")
        print("|---|---|---|---|---|---|---|---|")
        report(levels, baseline, f"--max-batch {args.max_batch}")
        if args.unbatched:
            report(asyncio.run(bench_server(model, 1, counts[-1:], args, tmp)), baseline, "--max-batch 1")


if __name__ == "__main__":
    main()
