"""`tunelab service --storage s3://...` against a real S3 API on loopback (moto's server), with the official `openai`
client, with local workers and on a Ray cluster (`--executor ray`). Every node's `--data-dir` is then only a local
copy: the test deletes this node's copies (as a node that replaced a dead one would lack them) and the service must
fetch them from the bucket.

A job whose worker is SIGKILLed mid-way, with its local folder and its training file deleted, resumes from the
checkpoint in the bucket and ends with the losses and adapter of an uninterrupted run; its checkpoints, adapter and
result file are in the bucket; the result file downloads and the fine-tuned model chats with no local copy; deleting
the file and the model deletes them from the bucket."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from openai import OpenAI
from openai.types.fine_tuning import FineTuningJob
from safetensors.torch import load_file

from ray_cluster import two_nodes
from s3_support import moto_bucket
from service_support import NO_EVAL, LiveService, api_key, chat_file, live_service, wait_for

STEPS = 120
LONG = {"train": {"max_steps": STEPS, "max_seq_len": 64, "batch_size": 2}, "checkpoints": {"every_steps": 10}}


@dataclass
class Live:
    service: LiveService
    client: OpenAI
    bucket: Any
    prefix: str  # bucket/prefix: the service's --storage without s3://
    train: Path

    def job(self, seed: int = 5) -> FineTuningJob:
        uploaded = self.client.files.create(file=self.train.open("rb"), purpose="fine-tune")
        spec = {**LONG, **NO_EVAL}
        return self.client.fine_tuning.jobs.create(
            model="tiny", training_file=uploaded.id, seed=seed, extra_body={"tunelab": {"spec": spec}}
        )

    def wait(self, job_id: str, done: Any, timeout: float = 180) -> FineTuningJob:
        found: list[FineTuningJob] = []

        def check() -> bool:
            found[:] = [self.client.fine_tuning.jobs.retrieve(job_id)]
            return bool(done(found[0]))

        try:
            wait_for(check, timeout)
        except AssertionError:
            raise AssertionError(f"{found[0].status} {found[0].error}\n{self.service.output()}") from None
        return found[0]

    def losses(self, job_id: str) -> dict[int, float]:
        events = self.client.fine_tuning.jobs.list_events(job_id, limit=1000)
        rows = [e.data for e in events if e.type == "metrics" and isinstance(e.data, dict) and "train_loss" in e.data]
        assert len(rows) == len({r["step"] for r in rows}), "a step was reported twice"
        return {int(r["step"]): float(r["train_loss"]) for r in rows}

    def messages(self, job_id: str) -> list[str]:
        return [e.message for e in self.client.fine_tuning.jobs.list_events(job_id, limit=1000)][::-1]

    def worker_pid(self, job_id: str) -> int:
        """The process running the job (a local worker, or a Ray worker process), from its start event."""
        events = self.client.fine_tuning.jobs.list_events(job_id, limit=1000)
        return next(int(e.data["pid"]) for e in events if isinstance(e.data, dict) and "pid" in e.data)

    def local(self, *parts: str) -> Path:
        return self.service.data_dir.joinpath(*parts)


NO_RAY = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="the ray extra is not installed")


@pytest.fixture(scope="module", params=["local", pytest.param("ray", marks=NO_RAY)])
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path
) -> Iterator[Live]:
    """The service with local workers, and on a two-node local Ray cluster (`--executor ray`), as scale-out.md runs
    it. The moto server starts first: the service and the Ray nodes inherit its endpoint and credentials."""
    tmp = tmp_path_factory.mktemp(f"storage-{request.param}")
    with contextlib.ExitStack() as stack:
        # moto keeps its buckets per process, not per server: a bucket each keeps the two services apart.
        name = f"tunelab-{request.param}"
        bucket = stack.enter_context(moto_bucket(name))
        extra: tuple[str, ...] = ("--storage", f"s3://{name}/svc")
        if request.param == "ray":
            extra += ("--executor", "ray", "--ray-address", stack.enter_context(two_nodes()).address)
        service = stack.enter_context(live_service(tmp / "svc", {"tiny": tiny_llama_dir}, extra=extra))
        client = OpenAI(base_url=service.url, api_key=api_key(service.data_dir, "s3"), max_retries=0)
        yield Live(service, client, bucket, f"{name}/svc", chat_file(tmp / "train.jsonl"))


def test_a_job_moved_to_a_node_without_its_files_resumes_from_the_bucket(live: Live) -> None:
    reference = live.job()
    job = live.job()
    training_file = f"{job.training_file}.jsonl"
    assert live.bucket.exists(f"{live.prefix}/files/{training_file}"), "the upload is in the bucket"
    live.wait(job.id, lambda j: j.status == "running" and j.tunelab["step"] >= 25)
    assert live.bucket.ls(f"{live.prefix}/jobs/{job.id}/checkpoints"), "checkpoints go up as they are saved"
    os.kill(live.worker_pid(job.id), signal.SIGKILL)
    shutil.rmtree(live.local("jobs", job.id))  # the other worker now stands for a node with none of the job's files
    live.local("files", training_file).unlink()
    live.wait(job.id, lambda j: j.status == "succeeded")
    resumed = [m for m in live.messages(job.id) if m.startswith("Resuming from checkpoint step-")]
    assert resumed and int(resumed[0].rsplit("-", 1)[1]) >= 20, live.messages(job.id)

    live.wait(reference.id, lambda j: j.status == "succeeded")
    ours, theirs = live.losses(job.id), live.losses(reference.id)
    assert sorted(ours) == sorted(theirs) == list(range(1, STEPS + 1))
    assert max(abs(ours[s] - theirs[s]) for s in ours) < 1e-5, "the resumed run differs from the uninterrupted one"
    ours_adapter, theirs_adapter = _adapter(live, job.id), _adapter(live, reference.id)
    assert max(float((ours_adapter[k] - theirs_adapter[k]).abs().max()) for k in theirs_adapter) < 1e-5

    kept = {f"step-{c.step_number:06d}" for c in live.client.fine_tuning.jobs.checkpoints.list(job.id)}
    remote = {p.rsplit("/", 1)[1] for p in live.bucket.ls(f"{live.prefix}/jobs/{job.id}/checkpoints")}
    assert remote == kept and len(kept) == 3, "the bucket keeps the checkpoints the API lists, no more"


def test_results_download_and_the_model_chats_with_no_local_copy(live: Live) -> None:
    job = live.wait(live.job(seed=7).id, lambda j: j.status == "succeeded")
    result = job.result_files[0]  # step_metrics.csv (then the report)
    assert live.bucket.exists(f"{live.prefix}/files/{result}.csv")
    shutil.rmtree(live.local("jobs", job.id))
    live.local("files", f"{result}.csv").unlink()

    table = live.client.files.content(result).text
    assert table.splitlines()[0].startswith("step,train_loss") and len(table.splitlines()) == STEPS + 1
    assert job.fine_tuned_model is not None
    reply = live.client.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert reply.choices[0].message.content is not None

    live.client.files.delete(result)
    assert not live.bucket.exists(f"{live.prefix}/files/{result}.csv")
    live.client.models.delete(job.fine_tuned_model)
    assert not live.bucket.exists(f"{live.prefix}/jobs/{job.id}/adapter"), "the model's folder left the bucket"


def _adapter(live: Live, job_id: str) -> dict[str, torch.Tensor]:
    """The job's final adapter as the bucket holds it."""
    target = live.local("downloads", job_id, "adapter_model.safetensors")
    target.parent.mkdir(parents=True, exist_ok=True)
    live.bucket.get_file(f"{live.prefix}/jobs/{job_id}/adapter/adapter_model.safetensors", str(target))
    return load_file(str(target))
