"""`train.precision: auto`: train in bf16 autocast only where it is faster than fp32 on this machine.

Whether bf16 pays depends on the CPU, not on the code: with AMX a bf16 matmul ran at 3.9x fp32, without it at 0.7x
(2048x576 @ 576x1536, torch 2.13). So `auto` times the model's own MLP matmul in both precisions once per machine
(about a second), caches the answer under the tunelab cache folder, and picks bf16 only when it is clearly
faster: the element-wise work stays in fp32 under autocast and the casts cost time, so a small matmul gain is lost.
Under a launcher rank 0 measures and every process takes its answer, so all of them train in one precision.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tunelab.atomic import write_atomic
from tunelab.errors import TunelabError
from tunelab.train.distributed import World

BF16_MIN_SPEEDUP = 1.15  # below this the autocast casts and fp32 element-wise work eat the matmul gain
TOKENS = 2048  # rows of the timed matmul: a micro-batch of packed tokens
CACHE_FILE = "precision.json"
# Pins what `auto` gives on every machine, e.g. for runs that must compare across machines (the test suite does).
PIN_ENV = "TUNELAB_PRECISION"


@dataclass(frozen=True)
class Choice:
    precision: str  # "fp32" or "bf16": what the run trains in
    reason: str  # for the log: why


@dataclass(frozen=True)
class Timing:
    fp32_s: float
    bf16_s: float

    @property
    def speedup(self) -> float:
        """bf16 autocast over fp32 (above 1: bf16 is faster)."""
        return self.fp32_s / self.bf16_s


def choose_precision(requested: str, model: torch.nn.Module, world: World, cache: Path) -> Choice:
    """The precision to train in: `requested` itself unless it is `auto`."""
    if requested != "auto":
        return Choice(requested, "set in the spec")
    pinned = os.environ.get(PIN_ENV, "")
    if pinned:
        if pinned not in ("fp32", "bf16"):
            raise TunelabError(f"{PIN_ENV}={pinned!r}: set it to fp32 or bf16, or unset it to let auto measure")
        return Choice(pinned, f"auto, pinned by {PIN_ENV}")
    choice = _measured_choice(model, cache) if world.is_main else Choice("", "")
    return _from_rank0(choice, world)


def decide(timing: Timing, key: str) -> Choice:
    faster = timing.speedup >= BF16_MIN_SPEEDUP
    verdict = "bf16" if faster else "fp32"
    return Choice(verdict, f"auto: a bf16 matmul runs at {timing.speedup:.2f}x fp32 here ({key})")


def _measured_choice(model: torch.nn.Module, cache: Path) -> Choice:
    hidden, inner = _mlp_shape(model)
    device = _device()
    key = f"{device} {_processor()}, torch {torch.__version__}, {torch.get_num_threads()} threads, {hidden}x{inner}"
    known = _read_cache(cache)
    if key in known:
        timing = Timing(**known[key])
    else:
        timing = measure(hidden, inner, device)
        _write_cache(cache, known | {key: asdict(timing)})
    return decide(timing, key)


def measure(hidden: int, inner: int, device: str, budget_s: float = 0.3) -> Timing:
    """Seconds per (TOKENS x hidden) @ (hidden x inner) matmul, in fp32 and under bf16 autocast (casts included,
    as in training), each the best of repeated runs for about `budget_s`. A CPU without bf16 kernels takes
    seconds for one such bf16 matmul (50x fp32 on an AVX2 EPYC), so a matmul of an eighth of the rows is timed
    first, and when bf16 loses by 2x there the answer is already known."""
    probe = _timing(TOKENS // 8, hidden, inner, device, budget_s / 4)
    return probe if probe.speedup < 0.5 else _timing(TOKENS, hidden, inner, device, budget_s)


def _timing(tokens: int, hidden: int, inner: int, device: str, budget_s: float) -> Timing:
    x = torch.randn(tokens, hidden, device=device)
    w = torch.randn(hidden, inner, device=device)

    def fp32() -> None:
        torch.matmul(x, w)

    def bf16() -> None:
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            torch.matmul(x, w)

    return Timing(_best_time(fp32, device, budget_s), _best_time(bf16, device, budget_s))


def _best_time(fn: Callable[[], None], device: str, budget_s: float) -> float:
    start = time.perf_counter()
    fn()  # warm-up: first calls allocate and pick kernels
    best = time.perf_counter() - start
    if best >= budget_s:
        return best  # a precision without native kernels (bf16 here took seconds): no need to know how slow exactly
    best = float("inf")
    deadline = time.perf_counter() + budget_s
    while time.perf_counter() < deadline or best == float("inf"):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _mlp_shape(model: torch.nn.Module) -> tuple[int, int]:
    """(hidden, MLP inner) sizes from the model's config; Llama-like defaults when it does not say."""
    config = getattr(model, "config", None)
    hidden = int(getattr(config, "hidden_size", 0) or 576)
    inner = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    return hidden, inner


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _processor() -> str:
    """A name for the CPU (or GPU) model: the cache is per machine kind, not per host."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read_cache(path: Path) -> dict[str, dict[str, float]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # absent or damaged: measure again
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, data: dict[str, dict[str, float]]) -> None:
    with contextlib.suppress(OSError):  # a read-only cache only costs the measurement next time
        write_atomic(path, json.dumps(data, indent=1))  # two runs starting together must not mix their writes


def _from_rank0(choice: Choice, world: World) -> Choice:
    if world.size == 1:
        return choice
    box: list[object] = [asdict(choice)]
    torch.distributed.broadcast_object_list(box, src=0)
    return Choice(**box[0])  # type: ignore[arg-type]
