"""End to end with the official `openai` client against a live `tunelab service` on loopback (SQLite, and
PostgreSQL when TUNELAB_TEST_POSTGRES_URL is set): the whole job flow on the tiny model, cancel, pause/resume,
a worker SIGKILLed mid-job, a service restart mid-job, and bad files.

The same suite runs with `--executor ray` (on both databases): jobs then run as Ray tasks on a two-node local Ray
cluster (1 CPU per node, through Ray's own test helper), and the killed worker is the Ray worker process running the
job."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest
import torch
from openai import OpenAI
from openai.types.fine_tuning import FineTuningJob
from safetensors.torch import load_file

from ray_cluster import TwoNodes, two_nodes
from service_support import (
    DATABASES,
    FAST,
    NO_EVAL,
    LiveService,
    api_key,
    chat_file,
    live_service,
    postgres_schema_url,
    wait_for,
)
from tunelab.job_service.store import Store
from tunelab.layout import RunLayout

# Long enough (200 steps, ~5 s) that a pause or a kill lands mid-job; same seed, so an interrupted run must agree
# with an uninterrupted one (the `reference` fixture) step by step.
STEPS = 200
LONG = {
    "train": {"max_steps": STEPS, "max_seq_len": 64, "batch_size": 2},
    "checkpoints": {"every_steps": 10},
    **NO_EVAL,
}
SEED = 11


@dataclass
class Live:
    service: LiveService
    database: str | None
    extra: tuple[str, ...]  # the service's executor options
    store: Store
    client: OpenAI
    other: OpenAI  # another project's key
    train: Path

    def job(self, spec: dict[str, Any] | None = None, **kwargs: Any) -> FineTuningJob:
        uploaded = self.client.files.create(file=self.train.open("rb"), purpose="fine-tune")
        return self.client.fine_tuning.jobs.create(
            model="tiny",
            training_file=uploaded.id,
            extra_body={"tunelab": {"spec": spec or {**FAST, **NO_EVAL}}},
            **kwargs,
        )

    def wait(self, job_id: str, done: Any, timeout: float = 120) -> FineTuningJob:
        found: list[FineTuningJob] = []

        def check() -> bool:
            found[:] = [self.client.fine_tuning.jobs.retrieve(job_id)]
            return bool(done(found[0]))

        try:
            wait_for(check, timeout)
        except AssertionError:
            raise AssertionError(f"{found[0].status} {found[0].error}\n{self.service.output()}") from None
        return found[0]

    def metric_steps(self, job_id: str) -> dict[int, float]:
        events = self.client.fine_tuning.jobs.list_events(job_id, limit=1000)
        rows = [e.data for e in events if e.type == "metrics" and isinstance(e.data, dict) and "train_loss" in e.data]
        steps = [int(r["step"]) for r in rows]
        assert len(steps) == len(set(steps)), "a step was reported twice"
        return {int(r["step"]): float(r["train_loss"]) for r in rows}

    def messages(self, job_id: str) -> list[str]:
        return [e.message for e in self.client.fine_tuning.jobs.list_events(job_id, limit=1000)][::-1]


def _database(kind: str, name: str) -> str | None:
    return postgres_schema_url(name) if kind == "postgresql" else None


@contextmanager
def _live(tmp: Path, tiny_llama_dir: Path, database: str | None, extra: tuple[str, ...] = ()) -> Iterator[Live]:
    with live_service(tmp / "svc", {"tiny": tiny_llama_dir}, database, extra=extra) as service:
        store = Store(database or f"sqlite:///{service.data_dir / 'service.db'}", pool_size=2)
        keys = [api_key(service.data_dir, name, database) for name in ("e2e", "other")]
        clients = [OpenAI(base_url=service.url, api_key=key, max_retries=0) for key in keys]
        yield Live(service, database, extra, store, *clients, chat_file(tmp / "train.jsonl"))
        store.close()


NO_RAY = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="the ray extra is not installed")
# The Ray executor on each database: the same parameters as DATABASES, prefixed "ray-".
RAY = [pytest.param(f"ray-{d.values[0]}", id=f"ray-{d.id}", marks=[*d.marks, NO_RAY]) for d in DATABASES]


@pytest.fixture(scope="module")
def ray_nodes() -> Iterator[TwoNodes]:
    """Two Ray nodes of one CPU each (as tests/test_ray.py): the two job slots land one per node."""
    with two_nodes() as nodes:
        yield nodes


@pytest.fixture(scope="module", params=[*DATABASES, *RAY])
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path
) -> Iterator[Live]:
    kind, extra = request.param, ()
    if kind.startswith("ray-"):
        address = request.getfixturevalue("ray_nodes").address
        kind, extra = kind.removeprefix("ray-"), ("--executor", "ray", "--ray-address", address)
    tmp = tmp_path_factory.mktemp(request.param)
    with _live(tmp, tiny_llama_dir, _database(kind, "e2e"), extra) as found:
        yield found


@dataclass
class Reference:
    """An uninterrupted run of the LONG job with SEED, started when first asked for (it trains beside the test's
    own job, on the other worker)."""

    live: Live
    job_id: str

    def losses(self) -> dict[int, float]:
        self.live.wait(self.job_id, lambda j: j.status in ("succeeded", "failed", "cancelled"))
        job = self.live.client.fine_tuning.jobs.retrieve(self.job_id)
        assert job.status == "succeeded", job.error
        messages = self.live.messages(self.job_id)
        assert not [m for m in messages if m.startswith(("Resuming", "Worker lost", "Worker stopping", "Job paused"))]
        losses = self.live.metric_steps(self.job_id)  # each step reported once
        assert sorted(losses) == list(range(1, STEPS + 1))
        return losses


@pytest.fixture(scope="module")
def reference(live: Live) -> Reference:
    return Reference(live, live.job(LONG, seed=SEED).id)


def test_openai_client_flow(live: Live) -> None:
    c = live.client
    uploaded = c.files.create(file=live.train.open("rb"), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.filename == "train.jsonl"
    spec = {**FAST, **NO_EVAL}  # evaluation is covered in test_service_api.py
    job = c.fine_tuning.jobs.create(
        model="tiny",
        training_file=uploaded.id,
        suffix="e2e",
        seed=3,
        metadata={"team": "search"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 2}}},
        extra_body={"tunelab": {"method": "lora", "spec": spec}},
    )
    assert job.id.startswith("ftjob-") and job.status in ("validating_files", "queued")
    done = live.wait(job.id, lambda j: j.status in ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:tiny:e2e:{job.id.removeprefix('ftjob-')}"
    assert done.trained_tokens and done.trained_tokens > 0 and len(done.result_files) == 2
    assert [j.id for j in c.fine_tuning.jobs.list(metadata={"team": "search"})] == [job.id]
    assert c.fine_tuning.jobs.list(metadata={"team": "other"}).data == []
    assert sorted(live.metric_steps(job.id)) == [1, 2, 3, 4, 5, 6]
    events = list(c.fine_tuning.jobs.list_events(job.id, limit=5))
    assert events[0].message == "The job has successfully completed" and events[0].id.startswith("ftevent-")
    checkpoints = list(c.fine_tuning.jobs.checkpoints.list(job.id))
    assert [cp.step_number for cp in checkpoints] == [6, 4, 2] and checkpoints[0].id.startswith("ftckpt-")
    # The client's auto-pagination follows the cursor (`after` = the page's last id) until has_more is false.
    assert [cp.id for cp in c.fine_tuning.jobs.checkpoints.list(job.id, limit=1)] == [cp.id for cp in checkpoints]
    paged = [e.id for e in c.fine_tuning.jobs.list_events(job.id, limit=3)]
    assert paged == [e.id for e in c.fine_tuning.jobs.list_events(job.id, limit=1000)] and len(paged) > 10
    assert c.files.content(done.result_files[0]).text.startswith("step,train_loss,valid_loss")
    assert done.fine_tuned_model in [m.id for m in c.models.list()]
    _chat(c, done.fine_tuned_model)
    _chat(c, checkpoints[-1].fine_tuned_model_checkpoint)
    with pytest.raises(openai.BadRequestError) as caught:  # refused before the stream starts: a plain 400
        long: Any = [{"role": "user", "content": "word " * 600}]
        c.chat.completions.create(model=done.fine_tuned_model, messages=long, max_tokens=4, stream=True)
    assert (caught.value.code, caught.value.param) == ("context_length_exceeded", "messages")
    with pytest.raises(openai.NotFoundError):
        live.other.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        _chat(live.other, done.fine_tuned_model)


def test_dpo_job_with_the_openai_client(live: Live, tmp_path: Path) -> None:
    """OpenAI's DPO request shape trains the preference scenario; its events carry the DPO statistics."""
    pairs = tmp_path / "pairs.jsonl"
    row = {
        "input": {"messages": [{"role": "user", "content": "Can pigs fly?"}]},
        "preferred_output": [{"role": "assistant", "content": "No, pigs cannot fly."}],
        "non_preferred_output": [{"role": "assistant", "content": "Yes, at night."}],
    }
    pairs.write_text("".join(json.dumps(row) + "\n" for _ in range(12)), encoding="utf-8")
    bad = tmp_path / "bad_pairs.jsonl"
    bad.write_text(json.dumps({**row, "preferred_output": []}) + "\n", encoding="utf-8")
    c = live.client
    rejected = c.files.create(file=bad.open("rb"), purpose="fine-tune")
    wait_for(lambda: c.files.retrieve(rejected.id).status == "error")
    assert "exactly one assistant message" in (c.files.retrieve(rejected.id).status_details or "")
    uploaded = c.files.create(file=pairs.open("rb"), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(
        model="tiny",
        training_file=uploaded.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 4}}},
        extra_body={"tunelab": {"spec": {"train": {"max_steps": 3, "max_seq_len": 64}, **NO_EVAL}}},
    )
    assert job.method.type == "dpo" and job.method.dpo is not None
    assert job.method.dpo.hyperparameters.beta == 0.2
    done = live.wait(job.id, lambda j: j.status in ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    events = c.fine_tuning.jobs.list_events(job.id, limit=1000)
    steps = [e.data for e in events if e.type == "metrics" and isinstance(e.data, dict) and "step" in e.data]
    assert steps and all({"reward_accuracy", "reward_margin", "logp_chosen", "logp_rejected"} <= set(d) for d in steps)
    assert c.fine_tuning.jobs.retrieve(job.id).tunelab["scenario"] == "preference"  # type: ignore[attr-defined]


def _chat(client: OpenAI, model: str) -> None:
    messages: Any = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
    text = reply.choices[0].message.content
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 6
    streamed = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices]
    assert "".join(pieces).strip() == (text or "").strip()  # greedy: the stream says the same


def test_cancel_a_running_job(live: Live) -> None:
    job = live.job({**LONG, "train": {**LONG["train"], "max_steps": 5000}})
    live.wait(job.id, lambda j: j.status == "running" and j.tunelab["step"] >= 5)  # type: ignore[attr-defined]
    live.client.fine_tuning.jobs.cancel(job.id)
    done = live.wait(job.id, lambda j: j.status == "cancelled")
    assert done.finished_at is not None and done.fine_tuned_model is None
    assert any(m.startswith("Job cancelled at step") for m in live.messages(job.id))


def test_pause_and_resume_continue_exactly(live: Live, reference: Reference) -> None:
    job = live.job(LONG, seed=SEED)
    live.wait(job.id, lambda j: j.status == "running" and j.tunelab["step"] >= 10)  # type: ignore[attr-defined]
    assert live.client.fine_tuning.jobs.pause(job.id).status == "paused"  # where it is bound
    paused = live.wait(job.id, lambda j: j.status == "paused")
    step = paused.tunelab["step"]  # type: ignore[attr-defined]
    assert step in [cp.step_number for cp in live.client.fine_tuning.jobs.checkpoints.list(job.id)]
    assert live.client.fine_tuning.jobs.resume(job.id).status == "queued"
    live.wait(job.id, lambda j: j.status == "succeeded")
    assert f"Resuming from checkpoint step-{step:06d}" in live.messages(job.id)
    _same_as_uninterrupted(live, job.id, reference)


def _same_as_uninterrupted(live: Live, job_id: str, reference: Reference) -> None:
    """Every step reported once, with the loss the uninterrupted run had at that step: exact resume."""
    assert job_id != reference.job_id
    losses = live.metric_steps(job_id)  # asserts that no step was reported twice
    assert sorted(losses) == list(range(1, STEPS + 1))
    expected = reference.losses()
    differ = {s: (losses[s], expected[s]) for s in expected if abs(losses[s] - expected[s]) > 1e-5}
    assert not differ, f"{len(differ)} steps differ from the uninterrupted run, e.g. {list(differ.items())[:3]}"
    ours, theirs = _adapter(live, job_id), _adapter(live, reference.job_id)
    assert ours.keys() == theirs.keys() and ours
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) < 1e-5, "the final adapters differ"


def _adapter(live: Live, job_id: str) -> dict[str, torch.Tensor]:
    job = live.store.jobs.by_id(job_id)
    assert job is not None
    return load_file(str(RunLayout(Path(job.spec["output_dir"])).adapter / "adapter_model.safetensors"))


def test_worker_killed_mid_job_resumes_from_its_checkpoint(live: Live, reference: Reference) -> None:
    job = live.job(LONG, seed=SEED)
    live.wait(job.id, lambda j: j.status == "running" and j.tunelab["step"] >= 15)  # type: ignore[attr-defined]
    os.kill(_worker_pid(live, job.id), signal.SIGKILL)
    live.wait(job.id, lambda j: j.status == "succeeded")
    messages = live.messages(job.id)
    assert any(m.startswith("Worker lost; the job is queued again") for m in messages)
    resumed = [m for m in messages if m.startswith("Resuming from checkpoint step-")]
    assert resumed and int(resumed[0].rsplit("-", 1)[1]) >= 10
    _same_as_uninterrupted(live, job.id, reference)


def test_a_lost_ray_node_requeues_its_job_and_the_node_left_resumes_it(
    live: Live, reference: Reference, request: pytest.FixtureRequest
) -> None:
    """A machine that dies: the whole Ray node running a job (its raylet, object store and workers) is killed. The
    job is queued again and resumes from its last checkpoint on the node left, with the per-step losses and the
    adapter of an uninterrupted run."""
    if not live.extra:
        pytest.skip("Ray nodes exist with --executor ray only (a local worker's death is the test above)")
    nodes: TwoNodes = request.getfixturevalue("ray_nodes")
    reference.losses()  # the uninterrupted run ends first: both nodes are free
    # The head holds the cluster's state and cannot go: a long job fills its one CPU first (Ray places a task on
    # the node its caller is attached to while that node has room), and the job under test gets the other node.
    blocker = live.job({**LONG, "train": {**LONG["train"], "max_steps": 5000}})
    live.wait(blocker.id, lambda j: j.status == "running" and j.tunelab["step"] >= 1)  # type: ignore[attr-defined]
    assert nodes.on_head(_worker_pid(live, blocker.id)), "the first job was not placed on the head node"
    job = live.job(LONG, seed=SEED)
    live.wait(job.id, lambda j: j.status == "running" and j.tunelab["step"] >= 15)  # type: ignore[attr-defined]
    try:
        nodes.kill_node_of(_worker_pid(live, job.id))
        live.wait(job.id, lambda j: j.status == "queued")
        live.client.fine_tuning.jobs.cancel(blocker.id)  # frees the head for the job
        live.wait(job.id, lambda j: j.status == "succeeded")
    finally:
        nodes.add_node()  # the module's later tests run on two nodes again
    messages = live.messages(job.id)
    assert any(m.startswith("Worker lost; the job is queued again") for m in messages)
    resumed = [m for m in messages if m.startswith("Resuming from checkpoint step-")]
    assert resumed and int(resumed[0].rsplit("-", 1)[1]) >= 10
    _same_as_uninterrupted(live, job.id, reference)
    assert live.wait(blocker.id, lambda j: j.status == "cancelled")


def test_a_job_reserves_the_resources_it_asks_for(live: Live) -> None:
    """`tunelab.resources` is checked and kept with the job. On Ray it is what the job's task reserves: a job asking
    for more CPUs than any node has (1 each here) stays queued, holding no lease, while a later job runs beside it,
    and cancelling it frees its slot."""
    uploaded = live.client.files.create(file=live.train.open("rb"), purpose="fine-tune")
    body: dict[str, Any] = {"spec": {**FAST, **NO_EVAL}, "resources": {"cpus": 0}}
    with pytest.raises(openai.BadRequestError) as caught:
        live.client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id, extra_body={"tunelab": body})
    assert caught.value.param == "tunelab.resources.cpus", caught.value.message
    body["resources"] = {"cpus": 2}
    big = live.client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id, extra_body={"tunelab": body})
    assert big.tunelab["resources"] == {"cpus": 2.0}  # type: ignore[attr-defined]
    if not live.extra:
        live.wait(big.id, lambda j: j.status == "succeeded")  # local workers take what their process has
        return
    small = live.job()
    assert live.wait(small.id, lambda j: j.status in ("succeeded", "failed")).status == "succeeded"
    waiting = live.store.jobs.by_id(big.id)
    assert waiting is not None and waiting.status == "queued" and waiting.lease_owner is None
    live.client.fine_tuning.jobs.cancel(big.id)
    live.wait(big.id, lambda j: j.status == "cancelled")
    both = [live.job({**LONG, "train": {**LONG["train"], "max_steps": 5000}}) for _ in range(2)]
    wait_for(lambda: all(live.client.fine_tuning.jobs.retrieve(j.id).status == "running" for j in both))
    for job in both:  # both ran at once: the cancelled job's slot is free again
        live.client.fine_tuning.jobs.cancel(job.id)
        live.wait(job.id, lambda j: j.status == "cancelled")


def _worker_pid(live: Live, job_id: str) -> int:
    """The process running the job: a local worker's id ends with its pid; a Ray task says where it runs in its
    start event (a Ray worker process, started by the cluster's raylet, not by the service)."""
    running = live.store.jobs.by_id(job_id)
    assert running is not None and running.lease_owner
    if not live.extra:
        return int(running.lease_owner.rsplit("-", 1)[1])
    events = live.client.fine_tuning.jobs.list_events(job_id, limit=1000)
    started = [e.data for e in events if isinstance(e.data, dict) and e.data.get("worker") == running.lease_owner]
    assert started, "no start event from the running task"
    pid = int(started[0]["pid"])
    assert psutil.Process(pid).cmdline()[0].startswith("ray::"), psutil.Process(pid).cmdline()
    return pid


BROKEN = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [\n'


def test_bad_files_fail_their_job_with_a_code(live: Live, tmp_path: Path) -> None:
    (tmp_path / "broken.jsonl").write_bytes(BROKEN)
    uploaded = live.client.files.create(file=(tmp_path / "broken.jsonl").open("rb"), purpose="fine-tune")
    wait_for(lambda: live.client.files.retrieve(uploaded.id).status == "error")
    job = live.client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id)
    failed = live.wait(job.id, lambda j: j.status == "failed")
    assert failed.error is not None and failed.error.code == "invalid_file_format"
    assert "line 2: [invalid_json]" in failed.error.message and failed.error.param == "training_file"
    few = live.client.files.create(file=("few.jsonl", BROKEN.splitlines()[0] * 1), purpose="fine-tune")
    job = live.client.fine_tuning.jobs.create(model="tiny", training_file=few.id)
    failed = live.wait(job.id, lambda j: j.status == "failed")
    assert failed.error is not None and failed.error.code == "invalid_n_examples"


def test_restart_loses_nothing_and_the_job_resumes(live: Live, tiny_llama_dir: Path) -> None:
    """Runs last in the module: it stops the module's service mid-job (SIGTERM) and starts another on its data."""
    spec = {**LONG, "checkpoints": {"every_steps": 10, "keep_last": 100}}
    job = live.job(spec)
    live.wait(job.id, lambda j: j.status == "running" and j.tunelab["step"] >= 15)  # type: ignore[attr-defined]
    before = _snapshot(live.client, job.id)
    assert live.service.stop() == 0  # the worker checkpoints and queues the job again before the service exits
    stored = live.store.jobs.by_id(job.id)
    assert stored is not None and stored.status == "queued"
    with live_service(live.service.data_dir, {"tiny": tiny_llama_dir}, live.database, extra=live.extra) as service:
        again = OpenAI(base_url=service.url, api_key=live.client.api_key, max_retries=0)
        wait_for(lambda: again.fine_tuning.jobs.retrieve(job.id).status == "succeeded", 120)
        after = _snapshot(again, job.id)
        messages = [e.message for e in again.fine_tuning.jobs.list_events(job.id, limit=1000)]
    for name, ids in before.items():
        assert ids <= after[name], name
    assert any(m.startswith("Worker stopping: job queued again at step") for m in messages)
    assert any(m.startswith("Resuming from checkpoint step-") for m in messages)


def _snapshot(c: OpenAI, job_id: str) -> dict[str, set[str]]:
    return {
        "files": {f.id for f in c.files.list()},
        "jobs": {j.id for j in c.fine_tuning.jobs.list()},
        "events": {e.id for e in c.fine_tuning.jobs.list_events(job_id, limit=1000)},
        "checkpoints": {cp.id for cp in c.fine_tuning.jobs.checkpoints.list(job_id, limit=100)},
    }
