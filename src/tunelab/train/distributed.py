"""Several processes, one job: who am I (rank/world), how to launch, and the DeepSpeed config made from the spec.

`tunelab train SPEC --nproc N` re-runs the same command under torchrun, which starts N processes per machine and
sets RANK/WORLD_SIZE/MASTER_ADDR in their environment. Every process builds the same model and takes its slice of
each global micro-batch; rank 0 alone evaluates, writes the report and exports.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch.utils import cpp_extension

from tunelab.config import DistributedSpec, TrainSpec
from tunelab.errors import ConfigError, Problem
from tunelab.extras import optional_import

ZERO_FEATURE = "distributed.strategy zero1/zero2/zero3 (DeepSpeed ZeRO)"


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def current_world() -> World:
    """The process's place in a torchrun/deepspeed launch (rank 0 of 1 when run directly)."""
    return World(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


def init_process_group(spec: DistributedSpec, world: World) -> None:
    """Join the other processes (gloo on CPU, nccl on GPUs). A no-op for one process."""
    if world.size == 1 or torch.distributed.is_initialized():
        return
    if spec.strategy == "none":
        raise ConfigError(
            [
                Problem(
                    "distributed.strategy",
                    f"{world.size} processes were launched but strategy is none",
                    "set distributed.strategy: ddp (or zero1/zero2/zero3)",
                )
            ]
        )
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise look for a GPU
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def barrier(world: World) -> None:
    if world.size > 1:
        torch.distributed.barrier()


@contextmanager
def all_cores(world: World) -> Iterator[None]:
    """Let rank 0 use its machine's cores while the other processes wait for it (evaluation, export): torchrun
    gives each process one thread, so the evaluation would otherwise run on one core."""
    threads = torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(threads, min(os.cpu_count() or 1, threads * local)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def deepspeed_config(train: TrainSpec, dist: DistributedSpec, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for this spec. Batch sizes are checked here, so a mismatch is a clear error naming the
    fields instead of an assertion deep inside DeepSpeed."""
    check_batch(train, world_size)
    zero: dict[str, Any] = {"stage": int(dist.strategy.removeprefix("zero"))}
    if dist.offload in ("optimizer", "parameters"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if dist.offload == "parameters":
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        # tunelab passes a torch AdamW: DeepSpeed's own CPU Adam needs a C++ build (minutes) on first use.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


def check_batch(train: TrainSpec, world_size: int) -> None:
    """global batch = micro-batch x accumulation x processes; a user-given global batch must agree."""
    product = train.batch_size * train.grad_accum * world_size
    if train.global_batch_size is None or train.global_batch_size == product:
        return
    per_process = train.batch_size * world_size
    hint = (
        f"set train.grad_accum: {train.global_batch_size // per_process}"
        if train.global_batch_size % per_process == 0
        else f"make it a multiple of batch_size x processes = {per_process}"
    )
    raise ConfigError(
        [
            Problem(
                "train.global_batch_size",
                f"{train.global_batch_size} != batch_size {train.batch_size} x grad_accum {train.grad_accum} "
                f"x processes {world_size} = {product}",
                hint,
            )
        ]
    )


def prebuild_deepspeed_ops() -> None:
    """DeepSpeed compiles a C++ shared-memory op the first time a process joins a CPU group (a minute or two here);
    two processes compiling at once can leave a stale lock that hangs every later run. Build it once, here, before
    the processes start; it is cached (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    accelerator = optional_import("deepspeed.accelerator", "deepspeed", ZERO_FEATURE)

    builder = accelerator.get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and builder.is_compatible(verbose=False):
        clear_stale_build_locks(builder.name)
        builder.load(verbose=False)


STALE_LOCK_S = 30 * 60  # the op compiles in minutes; a lock this old was left by a build that was killed


def clear_stale_build_locks(name: str, max_age_s: float = STALE_LOCK_S) -> list[Path]:
    """torch waits forever on the lock file of a build that was interrupted (Ctrl-C, a killed job): remove the
    locks of op `name` older than `max_age_s`, saying so, so the build is redone instead of hanging silently."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    stale = [lock for lock in root.glob(f"*/{name}/lock") if time.time() - lock.stat().st_mtime > max_age_s]
    for lock in stale:
        print(f"tunelab: removing a stale build lock left by an interrupted build: {lock}", file=sys.stderr)
        lock.unlink(missing_ok=True)
    return stale


def free_port() -> int:
    """A TCP port free on this machine now, for a launch's rendezvous (tests and benchmarks run several)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


LAUNCHED_ENV = "TUNELAB_LAUNCHED"  # set in the processes `tunelab train --nproc` starts


def run_launch(command: list[str], extra_env: dict[str, str] | None = None) -> int:
    """Run a torchrun command; Ctrl-C then means what it means for one process: finish the step, save a
    checkpoint, stop (a second one: stop now). torchrun runs in its own session, so the terminal's SIGINT reaches
    this process alone, which passes one SIGINT to each training process; otherwise each would get two (the
    terminal's and torchrun's own forward), and a second SIGINT means stop at once, without a checkpoint. SIGTERM
    and SIGHUP go to torchrun, which stops the processes."""
    import psutil  # accelerate's dependency

    # torchrun gives each process one thread; set here, it does not print a banner saying so. LAUNCHED_ENV: a
    # process stopped by Ctrl-C exits 0 (its checkpoint is saved), or torchrun would report it as a failure.
    env = {"OMP_NUM_THREADS": "1", **os.environ, LAUNCHED_ENV: "1"} | (extra_env or {})
    launch = subprocess.Popen(command, env=env, start_new_session=True)
    interrupted = False

    def to_workers(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupted
        interrupted = True
        for worker in psutil.Process(launch.pid).children():
            os.kill(worker.pid, signal.SIGINT)

    def to_torchrun(signum: int, frame: FrameType | None) -> None:
        launch.send_signal(signum)

    handlers = {signal.SIGINT: to_workers, signal.SIGTERM: to_torchrun, signal.SIGHUP: to_torchrun}
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        code = launch.wait()
        return 130 if interrupted and code == 0 else code  # 130: the shell's code for "stopped by Ctrl-C"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def launch_command(
    argv: list[str], nproc: int, nnodes: int, node_rank: int, master_addr: str, master_port: int
) -> list[str]:
    """The torchrun command that re-runs this `tunelab train` invocation in `nproc` processes per machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--nnodes={nnodes}",
        f"--node_rank={node_rank}",
        f"--master_addr={master_addr}",
        f"--master_port={master_port}",
        "-m",
        "tunelab.cli",
        *argv,
    ]
