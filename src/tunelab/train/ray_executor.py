"""`tunelab train SPEC --ray`: the same recipe on a Ray cluster, through Ray Train's TorchTrainer.

Ray Train starts N worker processes on whatever nodes the cluster has, joins them in one torch process group (gloo on
CPU, nccl on GPUs) and sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR in their environment, as torchrun does for
`--nproc`. Each worker then runs `run_job`, the function every `--nproc` process runs: the loop, the data slicing,
DDP or DeepSpeed ZeRO and rank 0's evaluation and export are the same code, so the two launches agree step by step.

The run folder (the spec's output_dir) must be a path every node reads and writes (one machine, or a shared
filesystem). A lost worker fails the whole group; Ray restarts it (`max_failures` times) and the new group resumes
from the run folder's last checkpoint, with tunelab's exact resume.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.config import JobSpec
from tunelab.errors import ConfigError, Problem, TunelabError
from tunelab.extras import optional_import
from tunelab.layout import RunLayout, checkpoint_folders
from tunelab.recipe import RunSummary

RAY_FEATURE = "tunelab train --ray (Ray Train)"


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local cluster on this machine
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 0


def check_options(job: JobSpec, options: RayOptions) -> None:
    """Refuse what cannot run, naming the option or field, before any cluster is started or joined."""
    bad = [
        f"{option} {value}: {fix}"
        for option, value, ok, fix in (
            ("--num-workers", options.num_workers, options.num_workers >= 1, "give 1 or more"),
            ("--cpus-per-worker", options.cpus_per_worker, options.cpus_per_worker > 0, "give a number above 0"),
            ("--gpus-per-worker", options.gpus_per_worker, options.gpus_per_worker >= 0, "give 0 or more"),
            ("--max-failures", options.max_failures, options.max_failures >= -1, "give 0 or more (-1: no limit)"),
        )
        if not ok
    ]
    if bad:
        raise TunelabError("; ".join(bad))
    if options.num_workers > 1 and job.distributed.strategy == "none":
        raise ConfigError(
            [
                Problem(
                    "distributed.strategy",
                    f"--num-workers {options.num_workers} needs a strategy",
                    "--set distributed.strategy=ddp (or zero1/zero2/zero3)",
                )
            ]
        )


def run_on_ray(job: JobSpec, resume: bool, options: RayOptions) -> RunSummary:
    """Train `job` on `options.num_workers` Ray workers; return rank 0's summary (read from the run folder)."""
    check_options(job, options)
    ray = optional_import("ray", "ray", RAY_FEATURE)
    ray_train = optional_import("ray.train", "ray", RAY_FEATURE)
    ray_torch = optional_import("ray.train.torch", "ray", RAY_FEATURE)
    if not ray.is_initialized():
        # No address: a local cluster of this machine's cores, gone when the command ends.
        ray.init(address=options.address, log_to_driver=True)
    layout = RunLayout(job.output_dir.resolve())
    config = {
        "job": job,
        "resume": resume,
        "cwd": os.getcwd(),  # relative data paths mean what they meant here (torchrun's workers inherit it too)
        # Checkpoints already there at launch belong to an earlier run; a restarted group resumes only from its own.
        "known": [p.name for p in checkpoint_folders(layout.checkpoints)] if not resume else [],
    }
    resources = {"CPU": options.cpus_per_worker}
    if options.gpus_per_worker:
        resources["GPU"] = options.gpus_per_worker
    trainer = ray_torch.TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ray_train.ScalingConfig(
            num_workers=options.num_workers, use_gpu=options.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=ray_train.RunConfig(
            name="ray",
            storage_path=str(layout.root),  # Ray's own bookkeeping; tunelab's checkpoints are in checkpoints/
            failure_config=ray_train.FailureConfig(max_failures=options.max_failures),
        ),
    )
    trainer.fit()
    return read_summary(layout)


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the process group is up and RANK/WORLD_SIZE are set; run the recipe as `--nproc` does."""
    from tunelab.recipe import run_job

    os.chdir(config["cwd"])
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise look for a GPU
    job: JobSpec = config["job"]
    summary = run_job(job, resume=config["resume"] or restarted(RunLayout(job.output_dir), config["known"]))
    if summary.interrupted:
        raise TunelabError("training was interrupted")


def restarted(layout: RunLayout, known: list[str]) -> bool:
    """Whether this run already wrote a checkpoint: then Ray restarted the worker group and it resumes from it."""
    return any(p.name not in known for p in checkpoint_folders(layout.checkpoints))


def read_summary(layout: RunLayout) -> RunSummary:
    """Rank 0 writes summary.json at the end of run_job; Ray does not hand a worker's return value back."""
    data = json.loads(layout.summary.read_text(encoding="utf-8"))
    for key in ("output_dir", "report", "adapter", "merged"):
        data[key] = Path(data[key]) if data[key] is not None else None
    return RunSummary(**data)
