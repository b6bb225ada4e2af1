"""Service settings: built once by the CLI (or a test) and handed to the app factory and to each worker."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MODEL_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # no ':' — fine-tuned names use it as a separator


class ServiceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path = Field(Path("tunelab-service"), description="Uploaded files, job folders and the SQLite file.")
    database: str | None = Field(None, description="SQLAlchemy URL; default: SQLite (WAL) in data_dir.")
    storage: str | None = Field(
        None,
        pattern=r"^[a-z][a-z0-9+.-]*://.+",
        description="Object storage (s3://bucket/prefix) that keeps uploads, result files and job folders for every "
        "node; data_dir is then each node's local copy.",
    )
    models: dict[str, str] = Field(
        default_factory=dict, description="Base models jobs may use besides 'embedded': name -> folder."
    )
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = Field(1, ge=0, description="Jobs trained at once: local worker processes, or Ray tasks.")
    executor: Literal["local", "ray"] = Field("local", description="Where jobs run: local worker processes, or Ray.")
    ray_address: str | None = Field(None, description="The Ray cluster to join (default: start one on this machine).")
    ray_cpus_per_job: float = Field(1.0, gt=0, description="CPUs a job reserves on the Ray cluster (its default).")
    ray_gpus_per_job: float = Field(0.0, ge=0, description="GPUs a job reserves on the Ray cluster (its default).")
    ray_memory_mb_per_job: int | None = Field(
        None, gt=0, description="Memory (MiB) a job reserves on the Ray cluster (its default; none reserved unset)."
    )
    max_file_bytes: int = Field(100 * 2**20, gt=0, description="Largest upload accepted.")
    max_line_bytes: int = Field(2**20, gt=0, description="Longest JSONL line accepted (one example).")
    min_examples: int = Field(10, gt=0, description="Fewest training examples a job accepts (OpenAI: 10).")
    lease_s: float = Field(30.0, gt=0, description="A job whose worker stopped renewing its lease is re-queued then.")
    heartbeat_s: float = Field(1.0, gt=0, description="How often a worker renews its lease and reports progress.")
    poll_s: float = Field(1.0, gt=0, description="How often an idle worker looks for a queued job.")
    max_attempts: int = Field(3, gt=0, description="Worker losses tolerated per job before it fails.")
    checkpoint_every: int = Field(10, gt=0, description="Default checkpoints.every_steps of a job.")
    keep_checkpoints: int = Field(3, gt=0, description="Checkpoints kept per job (each usable as a model).")
    worker_nice: int = Field(10, ge=0, le=19, description="Workers run at a lower CPU priority than the API.")
    chat_cache: int = Field(2, gt=0, description="Models kept loaded for chat completions.")
    torch_threads: int | None = Field(
        None,
        gt=0,
        description="torch threads of each worker and of the API's chat (default: cores / (workers + 1)).",
    )
    api_threads: int = Field(8, gt=0, description="Threads serving API requests (few: more only fight over the GIL).")

    @field_validator("models")
    @classmethod
    def _names(cls, models: dict[str, str]) -> dict[str, str]:
        for name in models:
            if not MODEL_NAME.fullmatch(name) or name.startswith("ft"):
                raise ValueError(f"model name {name!r}: use letters, digits, '.', '_' or '-' (not starting 'ft')")
        return models

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{(self.data_dir / 'service.db').resolve()}"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    def threads_per_process(self) -> int:
        """The API and each worker get an equal share of the cores. torch's thread pools spin while they wait, so
        oversubscribing the cores is far worse than leaving one idle: tiny-model training was measured 10x slower
        with 2 threads than with 1 on a busy 2-core machine."""
        return self.torch_threads or max(1, (os.cpu_count() or 1) // (self.workers + 1))

    def base_models(self) -> dict[str, str]:
        """Every base model a job or a chat may name, with where it loads from."""
        return {"embedded": "embedded", **self.models}
