"""The job service probed as a hostile client would (issue 15): each probe that once broke it, as a table, on SQLite
and (when TUNELAB_TEST_POSTGRES_URL is set) PostgreSQL. Every refusal is a 400 (413 for size) naming its field;
no probe may reach the database or the trainer."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient
from httpx import Response

from service_support import DATABASES, FAST, NO_EVAL, chat_file, free_port, fresh_store
from tunelab.job_service import files as files_module
from tunelab.job_service.api import create_app
from tunelab.job_service.files import validate_uploaded
from tunelab.job_service.settings import ServiceSettings
from tunelab.job_service.store import Event, Store

SPEC = {**FAST, **NO_EVAL}
HYPER = "method.supervised.hyperparameters"


@dataclass
class Hostile:
    client: TestClient
    settings: ServiceSettings
    store: Store
    key: str
    file_id: str

    def send(self, method: str, path: str, body: str | None = None) -> Response:
        """The body as raw JSON text: httpx's own encoder refuses NaN and lone surrogates, a hostile client not."""
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        content = body.encode("utf-8", "surrogatepass") if body is not None else None
        return self.client.request(method, f"/v1{path}", headers=headers, content=content)

    def job(self, **fields: Any) -> Response:
        body = {"model": "tiny", "training_file": self.file_id, "tunelab": {"spec": SPEC}} | fields
        return self.send("POST", "/fine_tuning/jobs", json.dumps(body))

    def upload(self, content: bytes) -> dict[str, Any]:
        files = {"file": ("f.jsonl", content, "application/jsonl")}
        headers = {"Authorization": f"Bearer {self.key}"}
        response = self.client.post("/v1/files", headers=headers, files=files, data={"purpose": "fine-tune"})
        assert response.status_code == 200, response.text
        return dict(self.client.get(f"/v1/files/{response.json()['id']}", headers=headers).json())


def hostile_api(tmp: Path, tiny_llama_dir: Path, kind: str, **more: Any) -> Iterator[Hostile]:
    models = {"tiny": str(tiny_llama_dir), "gone": str(tmp / "no-such-model")}
    settings = ServiceSettings(data_dir=tmp / "svc", models=models, max_line_bytes=500_000, **more)
    store = fresh_store(kind, tmp)
    with TestClient(create_app(settings, store)) as client:
        key = store.keys.create("a")[1]
        api = Hostile(client, settings, store, key, "")
        api.file_id = api.upload(chat_file(tmp / "train.jsonl").read_bytes())["id"]
        yield api
    store.close()


@pytest.fixture(params=DATABASES)
def api(request: pytest.FixtureRequest, tmp_path: Path, tiny_llama_dir: Path) -> Iterator[Hostile]:
    yield from hostile_api(tmp_path, tiny_llama_dir, request.param)


def _spec(section: str, **values: Any) -> dict[str, Any]:
    return {"spec": {**SPEC, section: {**SPEC.get(section, {}), **values}}}


def _hyper(**values: Any) -> dict[str, Any]:
    return {"method": {"type": "supervised", "supervised": {"hyperparameters": values}}}


# (id, job request fields as JSON text or a dict, the param the 400 names)
JOB_PROBES: list[tuple[str, dict[str, Any] | str, str]] = [
    ("n_epochs_2**63", _hyper(n_epochs=2**63), f"{HYPER}.n_epochs"),
    ("n_epochs_1e6", _hyper(n_epochs=10**6), f"{HYPER}.n_epochs"),
    ("n_epochs_string", _hyper(n_epochs="3"), f"{HYPER}.n_epochs"),
    ("batch_size_2**70", _hyper(batch_size=2**70), f"{HYPER}.batch_size"),
    ("batch_size_true", _hyper(batch_size=True), f"{HYPER}.batch_size"),
    (
        "lr_multiplier_1e309",
        '"method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": 1e309}}}',
        f"{HYPER}.learning_rate_multiplier",
    ),
    (
        "lr_multiplier_Infinity",
        '"method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": Infinity}}}',
        f"{HYPER}.learning_rate_multiplier",
    ),
    (
        "lr_multiplier_NaN",
        '"hyperparameters": {"learning_rate_multiplier": NaN}',
        "hyperparameters.learning_rate_multiplier",
    ),
    ("seed_2**63", {"seed": 2**63}, "seed"),
    ("seed_2**40", {"seed": 2**40}, "seed"),
    ("seed_string", {"seed": "7"}, "seed"),
    ("spec_seed_2**63", {"tunelab": _spec("train", seed=2**63)}, "tunelab.spec.train.seed"),
    ("spec_seed_x", {"tunelab": _spec("train", seed="x")}, "tunelab.spec.train.seed"),
    ("spec_batch_size_string", {"tunelab": _spec("train", batch_size="8")}, "tunelab.spec.train.batch_size"),
    ("spec_batch_size_2**70", {"tunelab": _spec("train", batch_size=2**70)}, "tunelab.spec.train.batch_size"),
    ("spec_batch_size_1e5", {"tunelab": _spec("train", batch_size=10**5)}, "tunelab.spec.train.batch_size"),
    ("spec_max_steps_2**40", {"tunelab": _spec("train", max_steps=2**40)}, "tunelab.spec.train.max_steps"),
    ("spec_max_seq_len_1e9", {"tunelab": _spec("train", max_seq_len=10**9)}, "tunelab.spec.train.max_seq_len"),
    ("spec_lr_1e6", {"tunelab": _spec("train", lr=1e6)}, "tunelab.spec.train.lr"),
    ("spec_r_1e9", {"tunelab": _spec("method", r=10**9)}, "tunelab.spec.method.r"),
    ("spec_keep_last_true", {"tunelab": _spec("checkpoints", keep_last=True)}, "tunelab.spec"),
    ("spec_instruction_20k", {"tunelab": _spec("task", instruction="x" * 20_000)}, "tunelab.spec.task.instruction"),
    (
        "target_modules_nope",
        {"tunelab": _spec("method", target_modules=["nope"])},
        "tunelab.spec.method.target_modules",
    ),
    ("model_files_missing", {"model": "gone"}, "model"),
    ("training_file_surrogate", '"training_file": "\\ud800"', "training_file"),
    ("training_file_nul", {"training_file": "file-\x00"}, "training_file"),
    ("training_file_long", {"training_file": "f" * 100_000}, "training_file"),
    ("metadata_key_nul", {"metadata": {"k\x00": "v"}}, "metadata.k\\x00"),
    ("metadata_value_nul", {"metadata": {"k": "v\x00"}}, "metadata.k"),
    ("suffix_surrogate", '"suffix": "a\\udfff"', "suffix"),
    ("spec_surrogate", {"tunelab": _spec("task", instruction="\ud83d")}, "tunelab.spec.task.instruction"),
    ("nested_spec", {"tunelab": {"spec": {"eval": {"x": json.loads("[" * 40 + "]" * 40)}}}}, "tunelab.spec.eval.x"),
]


def _body(fields: dict[str, Any] | str, file_id: str) -> str:
    """The request as JSON text; a str entry is spliced in raw (Infinity, NaN, \\ud800 as a hostile client sends)."""
    if isinstance(fields, str):
        return f'{{"model": "tiny", "training_file": "{file_id}", {fields}}}'  # a repeated key: the last wins
    return json.dumps({"model": "tiny", "training_file": file_id, "tunelab": {"spec": SPEC}} | fields)


@pytest.mark.parametrize(("fields", "param"), [p[1:] for p in JOB_PROBES], ids=[p[0] for p in JOB_PROBES])
def test_a_hostile_job_request_is_a_400_naming_its_field(api: Hostile, fields: Any, param: str) -> None:
    response = api.send("POST", "/fine_tuning/jobs", _body(fields, api.file_id))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] and error["param"] is not None and error["param"].startswith(param), error
    assert api.store.jobs.page(api.store.keys.project_for(api.key).id, None, 10, {}, False).items == []  # type: ignore[union-attr]


def test_a_30_mib_field_is_refused_before_it_is_parsed(api: Hostile) -> None:
    response = api.job(tunelab=_spec("task", instruction="x" * (30 * 2**20)))
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


# (id, method, path, body, param)
ROUTE_PROBES: list[tuple[str, str, str, str | None, str]] = [
    ("nul_in_path", "GET", "/fine_tuning/jobs/ftjob-%00", None, "job_id"),
    ("nul_in_file_path", "GET", "/files/file-%00/content", None, "file_id"),
    ("nul_in_cursor", "GET", "/fine_tuning/jobs?after=ftjob-%00", None, "after"),
    ("nul_in_metadata_filter", "GET", "/fine_tuning/jobs?metadata%5Bk%5D=%00", None, "metadata[k]"),
    ("nul_in_events_cursor", "GET", "/fine_tuning/jobs/ftjob-x/events?after=%00", None, "after"),
    ("chat_content_surrogate", "POST", "/chat/completions",
     '{"model": "tiny", "messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages[0].content"),
    ("chat_seed_2**80", "POST", "/chat/completions",
     '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": ' + str(2**80) + "}", "seed"),
    ("chat_temperature_nan", "POST", "/chat/completions",
     '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
    ("deep_body", "POST", "/fine_tuning/jobs", "[" * 100_000 + "]" * 100_000, ""),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "body", "param"), [p[1:] for p in ROUTE_PROBES], ids=[p[0] for p in ROUTE_PROBES]
)
def test_hostile_paths_queries_and_chats_are_400s(
    api: Hostile, method: str, path: str, body: str | None, param: str
) -> None:
    response = api.send(method, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] in ("invalid_value", "string_too_long", "invalid_json") and (error["param"] or "") == param, (
        error
    )


def test_error_params_name_the_field_not_the_union_member(api: Hostile) -> None:
    response = api.job(**_hyper(n_epochs="many"))
    assert response.json()["error"]["param"] == f"{HYPER}.n_epochs"


def test_an_unexpected_error_is_an_openai_500_and_the_app_goes_on(
    api: Hostile, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("tunelab.job_service.jobs.list_jobs", broken)
    # The TestClient re-raises what reaches the server; a response means the app answered it in full.
    response = api.send("GET", "/fine_tuning/jobs")
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    assert api.send("GET", f"/files/{api.file_id}").status_code == 200


# Files: (id, content, status, first problem's code, its line)
FILE_PROBES: list[tuple[str, bytes, str, str | None, int | None]] = [
    ("nested_brackets", b"[" * 200_000 + b"]" * 200_000 + b"\n", "error", "json_too_deep", 1),
    ("lone_surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}, '
     b'{"role": "assistant", "content": "x"}]}\n', "error", "invalid_encoding", 1),
]  # fmt: skip


@pytest.mark.parametrize(
    ("content", "status", "code", "line"), [p[1:] for p in FILE_PROBES], ids=[p[0] for p in FILE_PROBES]
)
def test_hostile_files_end_validated(
    api: Hostile, content: bytes, status: str, code: str | None, line: int | None
) -> None:
    row = api.store.files.get(api.store.keys.project_for(api.key).id, api.upload(content)["id"])  # type: ignore[union-attr]
    assert row is not None and row.status == status, row.status_details if row else None
    if code is not None:
        assert row.problems and row.problems[0]["code"] == code and row.problems[0]["line"] == line


def test_a_utf8_bom_is_not_content(api: Hostile, tmp_path: Path) -> None:
    content = b"\xef\xbb\xbf" + chat_file(tmp_path / "bom.jsonl").read_bytes()
    assert api.upload(content)["status"] == "processed"


def test_a_crash_while_validating_is_the_files_error_and_the_next_file_goes_on(
    api: Hostile, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    project = api.store.keys.project_for(api.key)
    assert project is not None
    good = chat_file(tmp_path / "good.jsonl").read_bytes()
    rows = [
        files_module.save_upload(api.settings, api.store, project.id, _stream(good), f"{i}.jsonl", "fine-tune")
        for i in range(2)
    ]
    real = files_module.check_file

    def crashes_on_first(path: Path, limit: int) -> Any:
        if path.name.startswith(rows[0].id):
            raise RecursionError("maximum recursion depth exceeded")
        return real(path, limit)

    monkeypatch.setattr(files_module, "check_file", crashes_on_first)
    validate_uploaded(api.settings, api.store, rows)  # as the catch-up after a restart does
    first, second = (api.store.files.get(project.id, r.id) for r in rows)
    assert first is not None and first.status == "error" and first.problems
    assert first.problems[0]["code"] == "validation_failed"
    assert second is not None and second.status == "processed"


def _stream(content: bytes) -> Any:
    import io

    return io.BytesIO(content)


@pytest.mark.parametrize(
    ("verb", "control", "status"), [("cancel", "cancel", "cancelled"), ("pause", "pause", "paused")]
)
def test_cancel_and_pause_of_a_running_job_answer_the_state_it_is_bound_for(
    api: Hostile, verb: str, control: str, status: str
) -> None:
    created = api.job()
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    assert api.store.leases.claim("w1", 60) is not None
    answer = api.send("POST", f"/fine_tuning/jobs/{job_id}/{verb}")
    assert answer.status_code == 200 and answer.json()["status"] == status
    row = api.store.jobs.by_id(job_id)
    assert row is not None and row.status == "running" and row.control == control  # the worker stops it


def test_pause_and_resume_cost_no_crash_allowance(api: Hostile) -> None:
    job_id = api.job().json()["id"]
    for cycle in range(3):  # three pause/resume cycles, each a claim and a release as the worker does them
        assert api.store.leases.claim(f"w{cycle}", 60) is not None
        assert api.store.leases.release(job_id, f"w{cycle}", "paused", [Event("Job paused")])
        assert api.send("POST", f"/fine_tuning/jobs/{job_id}/resume").status_code == 200
    assert api.store.leases.claim("w9", 60) is not None
    assert api.store.leases.expire(api.settings.max_attempts, owner="w9") == [job_id]  # one lost worker
    row = api.store.jobs.by_id(job_id)
    assert row is not None and row.status == "queued" and row.attempts == 1


def test_a_500_keeps_the_keep_alive_connection(api: Hostile, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a real socket: Starlette's own last-resort handler answered, then re-raised, and uvicorn reset the
    connection, so the client's next request on it failed."""

    def broken(*_: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("tunelab.job_service.jobs.list_jobs", broken)
    server = uvicorn.Server(uvicorn.Config(create_app(api.settings, api.store), port=free_port(), log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        connection = http.client.HTTPConnection("127.0.0.1", server.config.port, timeout=10)
        for _ in range(2):  # the same connection both times
            connection.request("GET", "/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {api.key}"})
            answer = connection.getresponse()
            assert answer.status == 500 and json.loads(answer.read())["error"]["code"] == "internal_error"
    finally:
        server.should_exit = True
        thread.join(10)
