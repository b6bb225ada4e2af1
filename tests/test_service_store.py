"""The store on SQLite and (with TUNELAB_TEST_POSTGRES_URL) PostgreSQL: leases, re-queueing, pagination,
metadata filters, project scoping, hashed keys."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from service_support import DATABASES, fresh_store
from tunelab.job_service.db import FileRow, JobRow
from tunelab.job_service.ids import new_id, now
from tunelab.job_service.store import Event, Progress, Store


@pytest.fixture(params=DATABASES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    s = fresh_store(request.param, tmp_path)
    yield s  # type: ignore[misc]
    s.close()


def _file(store: Store, project: str) -> FileRow:
    row = FileRow(
        id=new_id("file"),
        project_id=project,
        filename="a.jsonl",
        purpose="fine-tune",
        bytes=1,
        created_at=now(),
        status="processed",
        path="/dev/null",
        deleted=False,
    )
    return store.files.add(row)


def _job(store: Store, project: str, status: str = "queued", meta: dict[str, str] | None = None) -> JobRow:
    row = JobRow(
        id=new_id("ftjob"),
        project_id=project,
        model="tiny",
        training_file="file-x",
        seed=0,
        meta=meta,
        hyperparameters={},
        spec={},
        status=status,
        created_at=now(),
        result_files=[],
        attempts=0,
        last_step=0,
        keep_checkpoints=3,
    )
    return store.jobs.add(row, [Event("created")])


def test_keys_are_stored_hashed_and_map_to_their_project(store: Store) -> None:
    project, key = store.keys.create("alpha")
    again, key2 = store.keys.create("alpha")
    other, _ = store.keys.create("beta")
    assert again.id == project.id and other.id != project.id and key != key2
    found = store.keys.project_for(key)
    assert found is not None and found.id == project.id
    assert store.keys.project_for(key + "x") is None
    with store.db.engine.connect() as conn:
        stored = [row[0] for row in conn.execute(text("SELECT key_hash FROM api_keys"))]
    assert key not in stored and all(len(h) == 64 for h in stored)
    key_id = next(k.id for k, p in store.keys.all() if p.id == other.id)
    assert store.keys.revoke(key_id) and not store.keys.revoke(key_id)


def test_one_claim_per_job_even_when_workers_race(store: Store) -> None:
    jobs = {_job(store, "p").id for _ in range(4)}
    claimed: list[str] = []

    def worker(name: str) -> None:
        while (job := store.leases.claim(name, 30)) is not None:
            claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(jobs)  # each job exactly once


def test_expired_lease_requeues_then_fails_after_max_attempts(store: Store) -> None:
    job = _job(store, "p")
    for attempt in (1, 2):
        claimed = store.leases.claim(f"w{attempt}", lease_s=0.05)
        # attempts counts lost workers: a claim is not one
        assert claimed is not None and claimed.id == job.id and claimed.attempts == attempt - 1
        assert store.leases.expire(max_attempts=2) == []  # not expired yet
        time.sleep(0.1)
        assert store.leases.expire(max_attempts=2) == [job.id]
    final = store.jobs.by_id(job.id)
    assert final is not None and final.status == "failed" and final.finished_at is not None
    assert final.error is not None and final.error["code"] == "worker_lost" and final.error["message"]
    messages = [e.message for e in store.jobs.events("p", job.id, None, 10).items]
    assert any("queued again" in m for m in messages) and any("failed" in m for m in messages)


def test_heartbeat_renews_reports_control_and_detects_a_lost_lease(store: Store) -> None:
    job = _job(store, "p")
    assert store.leases.claim("w1", 30) is not None
    held, control = store.leases.heartbeat(job.id, "w1", 30, Progress([Event("step", type="metrics")], last_step=3))
    assert held and control is None
    assert store.jobs.request_control(job.id, "pause", Event("pause requested"))
    assert store.leases.heartbeat(job.id, "w1", 30, Progress()) == (True, "pause")
    assert store.leases.heartbeat(job.id, "intruder", 30, Progress()) == (False, None)
    # The worker dies with a pause pending: the job is paused, not re-run.
    assert store.leases.expire(3, owner="w1") == [job.id]
    paused = store.jobs.by_id(job.id)
    assert paused is not None and paused.status == "paused" and paused.last_step == 3


def test_a_ray_task_claims_its_own_job_and_is_asked_to_stop_through_the_database(store: Store) -> None:
    """What the Ray executor relies on: a task claims the job it was submitted for, not the oldest one; a stop
    request reaches only that task's job, and never replaces a pending cancel."""
    first, second = _job(store, "p"), _job(store, "p")
    assert [j.id for j in store.leases.queued(5)] == [first.id, second.id]
    claimed = store.leases.claim("ray-s1-a", 30, job_id=second.id)
    assert claimed is not None and claimed.id == second.id
    assert store.leases.claim("ray-s0-b", 30, job_id=second.id) is None  # taken: never twice at once
    assert [j.id for j in store.leases.queued(5)] == [first.id]
    assert store.leases.claim("ray-s0-b", 30, job_id=first.id) is not None
    assert store.jobs.request_control(first.id, "cancel", Event("cancel requested"))
    assert store.leases.request_shutdown("ray-s1-a") and not store.leases.request_shutdown("ray-s0-b")
    assert store.leases.heartbeat(second.id, "ray-s1-a", 30, Progress()) == (True, "shutdown")
    assert store.leases.heartbeat(first.id, "ray-s0-b", 30, Progress()) == (True, "cancel")
    assert not store.leases.request_shutdown("nobody")


def test_release_is_only_for_the_lease_holder(store: Store) -> None:
    job = _job(store, "p")
    store.leases.claim("w1", 30)
    assert not store.leases.release(job.id, "w2", "succeeded", [])
    assert store.leases.release(job.id, "w1", "succeeded", [Event("done")], fine_tuned_model="ft:x")
    done = store.jobs.by_id(job.id)
    assert done is not None and done.status == "succeeded" and done.lease_owner is None


def test_pages_follow_the_cursor_without_gaps_or_repeats(store: Store) -> None:
    ids = [_job(store, "p").id for _ in range(7)]
    _job(store, "other")
    seen: list[str] = []
    after = None
    while True:
        page = store.jobs.page("p", after, 3, None, False)
        seen += [j.id for j in page.items]
        if not page.has_more:
            break
        after = page.items[-1].id
    assert seen == ids[::-1]  # newest first, as OpenAI lists jobs
    foreign = _job(store, "other").id
    assert store.jobs.page("p", foreign, 3, None, False).items == []  # another project's cursor gives nothing


def test_metadata_filter(store: Store) -> None:
    a = _job(store, "p", meta={"team": "x", "env": "prod"})
    b = _job(store, "p", meta={"team": "y"})
    c = _job(store, "p")
    assert [j.id for j in store.jobs.page("p", None, 10, {"team": "x"}, False).items] == [a.id]
    assert [j.id for j in store.jobs.page("p", None, 10, {"team": "x", "env": "dev"}, False).items] == []
    assert [j.id for j in store.jobs.page("p", None, 10, {"team": "y"}, False).items] == [b.id]
    assert [j.id for j in store.jobs.page("p", None, 10, None, True).items] == [c.id]


def test_objects_are_scoped_to_their_project(store: Store) -> None:
    mine = _file(store, "p")
    assert store.files.get("p", mine.id) is not None
    assert store.files.get("q", mine.id) is None
    assert store.files.delete("q", mine.id) is None
    job = _job(store, "p")
    assert store.jobs.get("q", job.id) is None and store.jobs.get("p", job.id) is not None
    assert store.files.page("q", None, False, None, 10).items == []
