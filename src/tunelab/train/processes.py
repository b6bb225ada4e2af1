"""`--nproc auto` (the default of `tunelab train`): one process using every core's threads, or one
single-threaded process per core (DDP, launched for the user), whichever trains the model at hand faster.

The rule, from measurements of `bench/train_throughput.py` on 2-core CPUs: on the embedded 135M model two
single-threaded DDP processes trained 1.13x (Intel, AVX-512) and 1.24x (AMD, AVX2) faster than one process with two
threads. Its matmuls (576 wide) are too small for PyTorch's intra-op threads to keep every core busy, and the
element-wise work between them is single-threaded anyway; DDP's only exchange per step, the all-reduce of the
adapter's gradients (20 MB for LoRA r16), is small. So auto runs one process per core when all of these hold, and
one process otherwise (each reason is printed):
- training on CPU (on GPUs, one process per GPU is yours to ask for: `--nproc N`), on one machine, with 2+ cores;
- no `distributed.strategy` chosen (with one, `--nproc N` says how many);
- a LoRA-family method (full fine-tuning would all-reduce every weight's gradient; QLoRA's 4-bit layers and prompt
  methods are not tested under DDP) and no classification/token head;
- at least MIN_PARAMS parameters: below that, starting the processes and loading the model in each costs more
  than a short run gains (the test suite's 2-layer models stay in one process);
- `train.batch_size` divisible by the processes, so the global batch, and with it the run, stays the same: each
  process takes batch_size / N rows of every micro-batch;
- N copies fit: `tunelab plan`'s estimate for one process, times N, within MEMORY_MARGIN of the available memory.
A resumed run keeps the process count its checkpoint was written with.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tunelab.layout import RunLayout
from tunelab.plan import MEMORY_MARGIN, GiB, Shape, available_memory, estimate, load_config, model_shape
from tunelab.train.checkpoint import latest_checkpoint, saved_world_size

if TYPE_CHECKING:
    from tunelab.config import JobSpec

MIN_PARAMS = 50_000_000
AUTO_METHODS = ("lora", "rslora", "dora", "pissa")


@dataclass(frozen=True)
class Layout:
    processes: int
    reason: str

    def __str__(self) -> str:
        return f"{self.processes} (auto: {self.reason})"

    def overrides(self, batch_size: int) -> list[str]:
        """The `--set` items that make a launch of `processes` train exactly what one process would."""
        if self.processes == 1:
            return []
        return ["distributed.strategy=ddp", f"train.batch_size={batch_size // self.processes}"]


@dataclass(frozen=True)
class Workload:
    """What the rule looks at in a job spec."""

    method: str
    batch_size: int
    seq_len: int
    rank: int = 16
    dropout: float = 0.05
    chunked_loss: bool = True
    strategy: str = "none"
    head: bool = False

    @classmethod
    def of(cls, job: JobSpec) -> Workload:
        return cls(
            job.method.name,
            job.train.batch_size,
            job.train.max_seq_len,
            job.method.r,
            job.method.dropout,
            job.train.chunked_loss,
            job.distributed.strategy,
            job.task.approach == "head",
        )


def choose_layout(shape: Shape, work: Workload, *, processes: int, available: float, gpu: bool) -> Layout:
    """One process per core (`processes` of them) or one process, by the rule in this module's docstring."""
    n = processes
    one = functools.partial(_single, n)
    if gpu:
        return one("a GPU: one process per GPU is --nproc N")
    if n < 2:
        return one("one core")
    if work.strategy != "none":
        return one(f"distributed.strategy {work.strategy} is set: --nproc N says how many processes")
    if work.method not in AUTO_METHODS or work.head:
        what = "a classification/token head" if work.head else f"method {work.method}"
        return one(f"{what}: auto splits only LoRA-family language-model runs into processes")
    if shape.params < MIN_PARAMS:
        return one(f"{shape.params / 1e6:.1f}M parameters, below {MIN_PARAMS / 1e6:.0f}M: processes would cost more")
    if work.batch_size % n:
        return one(f"train.batch_size {work.batch_size} does not split into {n} processes")
    per_process = estimate(
        shape,
        work.method,
        seq_len=work.seq_len,
        batch=work.batch_size // n,
        strategy="ddp",
        rank=work.rank,
        lora_dropout=work.dropout,
        chunked_loss=work.chunked_loss,
    ).total
    if n * per_process > MEMORY_MARGIN * available:
        need, have = n * per_process / GiB, available / GiB
        return one(f"{n} processes would need {need:.1f} GiB of the {have:.1f} GiB available")
    return Layout(
        n,
        f"single-threaded, DDP, {work.batch_size // n} rows of each batch apiece: "
        f"faster than {n} threads on a {shape.params / 1e6:.0f}M-parameter model on CPU",
    )


def _single(cores: int, why: str) -> Layout:
    threads = f"{cores} threads" if cores > 1 else "one thread"
    return Layout(1, f"{threads}; {why}")


def layout_for(job: JobSpec, resume: bool) -> Layout:
    """The layout for `tunelab train` with `--nproc auto` on this machine (a resumed run: its checkpoint's)."""
    saved = _saved_world(job) if resume else None
    processes = saved or len(os.sched_getaffinity(0))
    if saved == 1:
        return _single(len(os.sched_getaffinity(0)), "resuming a checkpoint written by one process")
    try:
        shape = model_shape(load_config(job.model.name))
    except (OSError, ValueError, KeyError, AttributeError) as exc:  # a GGUF file or an unreachable hub id
        return _single(processes, f"the model's size is unknown before loading it ({type(exc).__name__})")
    return choose_layout(
        shape, Workload.of(job), processes=processes, available=available_memory(), gpu=torch.cuda.is_available()
    )


def _saved_world(job: JobSpec) -> int | None:
    """The process count of the checkpoint a resume would continue from, if there is one."""
    latest = latest_checkpoint(RunLayout(Path(job.output_dir)).checkpoints)
    return saved_world_size(latest) if latest is not None else None
