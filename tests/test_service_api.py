"""The HTTP API in-process (FastAPI TestClient): file validation codes, job request errors, the job state machine,
pagination, chat request checks and stop strings, and tenant isolation on every route. One job runs to completion
in-process on the tiny model."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from openai.types.fine_tuning import FineTuningJob
from transformers import AutoTokenizer

from service_support import DATABASES, FAST, NO_EVAL, chat_file, fresh_store
from tiny import CHAT_TEMPLATE
from tunelab.job_service.api import create_app
from tunelab.job_service.errors import ApiError
from tunelab.job_service.files import sanitise_filename, save_upload
from tunelab.job_service.settings import ServiceSettings
from tunelab.job_service.store import Store
from tunelab.job_service.worker import Worker


@dataclass
class Api:
    client: TestClient
    settings: ServiceSettings
    store: Store
    keys: dict[str, str]

    def call(self, method: str, path: str, who: str | None = "a", **kwargs: Any) -> Response:
        headers = {"Authorization": f"Bearer {self.keys[who]}"} if who else {}
        return self.client.request(method, f"/v1{path}", headers=headers, **kwargs)

    def upload(self, content: bytes, who: str = "a", name: str = "train.jsonl") -> dict[str, Any]:
        files = {"file": (name, content, "application/jsonl")}
        response = self.call("POST", "/files", who, files=files, data={"purpose": "fine-tune"})
        assert response.status_code == 200, response.text
        return dict(response.json())

    def create_job(self, file_id: str, who: str = "a", **body: Any) -> Response:
        body = {"model": "tiny", "training_file": file_id, **body}
        body.setdefault("tunelab", {"spec": {**FAST, **NO_EVAL}})
        return self.call("POST", "/fine_tuning/jobs", who, json=body)


def _api(tmp: Path, tiny_llama_dir: Path, kind: str, more_models: dict[str, Path] | None = None) -> Iterator[Api]:
    models = {"tiny": str(tiny_llama_dir), **{name: str(path) for name, path in (more_models or {}).items()}}
    settings = ServiceSettings(data_dir=tmp / "svc", models=models, max_line_bytes=4096, max_file_bytes=300_000)
    store = fresh_store(kind, tmp)
    with TestClient(create_app(settings, store)) as client:
        keys = {name: store.keys.create(name)[1] for name in ("a", "b")}
        yield Api(client, settings, store, keys)
    store.close()


@pytest.fixture(params=DATABASES)
def api(request: pytest.FixtureRequest, tmp_path: Path, tiny_llama_dir: Path) -> Iterator[Api]:
    yield from _api(tmp_path, tiny_llama_dir, request.param)


@pytest.fixture
def good_file(tmp_path: Path) -> bytes:
    return chat_file(tmp_path / "train.jsonl").read_bytes()


def _error(response: Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return dict(response.json()["error"])


def test_file_upload_list_content_delete(api: Api, good_file: bytes) -> None:
    created = api.upload(good_file, name="../../etc/my data;rm -rf.jsonl")
    assert created["id"].startswith("file-") and created["filename"] == "my data_rm -rf.jsonl"
    got = api.call("GET", f"/files/{created['id']}").json()
    assert got["status"] == "processed" and got["status_details"] == "40 valid examples"
    assert api.call("GET", f"/files/{created['id']}/content").content == good_file
    assert [f["id"] for f in api.call("GET", "/files").json()["data"]] == [created["id"]]
    assert api.call("GET", "/files", params={"purpose": "fine-tune-results"}).json()["data"] == []
    deleted = api.call("DELETE", f"/files/{created['id']}").json()
    assert deleted == {"id": created["id"], "object": "file", "deleted": True}
    assert _error(api.call("GET", f"/files/{created['id']}"), 404)["code"] == "file_not_found"
    assert list((api.settings.files_dir).iterdir()) == []


def test_upload_purpose_other_than_fine_tune(api: Api, good_file: bytes) -> None:
    files = {"file": ("train.jsonl", good_file, "application/jsonl")}
    for purpose in ("assistants", "batch", "fine-tune-results"):
        error = _error(api.call("POST", "/files", files=files, data={"purpose": purpose}), 400)
        assert (error["code"], error["param"]) == ("invalid_purpose", "purpose"), (purpose, error)
        assert "use 'fine-tune'" in error["message"]
    assert api.call("GET", "/files").json()["data"] == [] and not list(api.settings.files_dir.glob("*"))


def test_sanitised_names() -> None:
    assert sanitise_filename("C:\\Users\\x\\..\\évil\x00name.jsonl") == "évil_name.jsonl"
    assert sanitise_filename("../..") == "upload.jsonl"
    assert sanitise_filename(None) == "upload.jsonl"


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
BAD_FILES = {
    "broken_json": (f'{GOOD}\n{GOOD}\n{{"messages": [\n'.encode(), "invalid_json", 3),
    "wrong_role": (f"{GOOD}\n{GOOD.replace('user', 'robot')}\n".encode(), "unknown_role", 2),
    "not_utf8": (f"{GOOD}\n".encode() + b'{"messages": "\xff\xfe"}\n', "invalid_encoding", 2),
    "huge_line": (f"{GOOD}\n".encode() + GOOD.replace("hello", "x" * 5000).encode() + b"\n", "line_too_long", 2),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_rejected_with_its_code_and_line(api: Api, case: str) -> None:
    content, code, line = BAD_FILES[case]
    uploaded = api.upload(content * 1)
    got = api.call("GET", f"/files/{uploaded['id']}").json()
    assert got["status"] == "error" and f"line {line}: [{code}]" in got["status_details"]
    job = api.create_job(uploaded["id"]).json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_file_format" and job["error"]["param"] == "training_file"
    assert f"line {line}: [{code}]" in job["error"]["message"]


def test_too_few_examples(api: Api) -> None:
    uploaded = api.upload(f"{GOOD}\n{GOOD}\n{GOOD}\n".encode())
    assert api.call("GET", f"/files/{uploaded['id']}").json()["status"] == "processed"
    job = api.create_job(uploaded["id"]).json()
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_n_examples"
    assert job["error"]["message"] == "Training file has 3 example(s), but must have at least 10 examples"


def test_too_large_file(api: Api, tmp_path: Path) -> None:
    files = {"file": ("big.jsonl", b"x" * 400_000, "application/jsonl")}
    response = api.call("POST", "/files", files=files, data={"purpose": "fine-tune"})
    assert _error(response, 413)["code"] == "file_too_large"
    with pytest.raises(ApiError) as caught:  # uploads without a length are cut off while copying
        save_upload(api.settings, api.store, "p", io.BytesIO(b"x" * 400_000), "big.jsonl", "fine-tune")
    assert caught.value.status == 413 and not any(api.settings.files_dir.iterdir())


def test_job_request_errors(api: Api, good_file: bytes) -> None:
    file_id = api.upload(good_file)["id"]
    cases: list[tuple[dict[str, Any], str, str | None]] = [
        ({"model": "gpt-4o"}, "model_not_available", "model"),
        ({"method": {"type": "reinforcement"}}, "unsupported_method", "method.type"),
        ({"method": {"type": "dpo"}, "tunelab": {"scenario": "chat"}}, "invalid_request", "tunelab.scenario"),
        ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}}, "invalid_value", None),
        ({"tunelab": {"method": "lorra"}}, "invalid_spec", "tunelab.method"),
        ({"tunelab": {"spec": {"train": {"lrr": 1}}}}, "invalid_spec", "tunelab.spec.train.lrr"),
        ({"tunelab": {"spec": {"data": {}}}}, "invalid_spec", "tunelab.spec.data"),
        (
            {
                "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
                "tunelab": {"spec": {"train": {"epochs": 3}}},
            },
            "invalid_request",
            "method.supervised.hyperparameters.n_epochs",
        ),
        ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}}, "invalid_value", None),
        ({"suffix": "x" * 65}, "invalid_value", "suffix"),
        ({"suffix": "a:b"}, "invalid_value", "suffix"),
        ({"suffix": "my model"}, "invalid_value", "suffix"),
        ({"suffix": "team/model"}, "invalid_value", "suffix"),
        ({"suffix": "tab\there"}, "invalid_value", "suffix"),
        ({"suffix": "line-end\n"}, "invalid_value", "suffix"),
    ]
    for body, code, param in cases:
        error = _error(api.create_job(file_id, **body), 400)
        assert error["code"] == code, (body, error)
        if param:
            assert error["param"] == param, (body, error)
    assert (
        "did you mean 'lr'" in _error(api.create_job(file_id, tunelab={"spec": {"train": {"lrr": 1}}}), 400)["message"]
    )
    assert "Invalid suffix 'a:b'" in _error(api.create_job(file_id, suffix="a:b"), 400)["message"]
    missing = api.call("POST", "/fine_tuning/jobs", json={"model": "tiny"})
    assert _error(missing, 400) == {
        "code": "missing_required_parameter",
        "message": "Missing required parameter: 'training_file'.",
        "param": "training_file",
        "type": "invalid_request_error",
    }


def test_suffixes_that_keep_the_model_name_unambiguous(api: Api, good_file: bytes) -> None:
    file_id = api.upload(good_file)["id"]
    for suffix in ("chat", "v1.2-beta_3", "x" * 64, ""):
        response = api.create_job(file_id, suffix=suffix)
        assert response.status_code == 200, (suffix, response.text)


@pytest.mark.parametrize("param", ["training_file", "validation_file"])
def test_a_missing_or_other_projects_file_is_not_found(api: Api, good_file: bytes, param: str) -> None:
    """Another project's file answers exactly as a file that does not exist: 404, naming the field."""
    own = api.upload(good_file)["id"]
    theirs = api.upload(good_file, who="b")["id"]
    errors = {}
    for file_id in ("file-doesnotexist00000000000", theirs):
        errors[file_id] = error = _error(api.create_job(own, **{param: file_id}), 404)
        assert (error["code"], error["param"], error["type"]) == ("file_not_found", param, "invalid_request_error")
    shown = {error["message"].replace(file_id, "<id>") for file_id, error in errors.items()}
    assert len(shown) == 1, shown  # the same words for both: whether the id exists does not leak
    assert api.call("GET", "/fine_tuning/jobs", who="a").json()["data"] == []  # no job was created
    assert api.create_job(theirs, who="b").status_code == 200  # the file itself is fine for its owner


def test_hyperparameters_resolve_into_the_spec(api: Api, good_file: bytes) -> None:
    file_id = api.upload(good_file)["id"]
    hyper = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}
    job = api.create_job(
        file_id, seed=7, method={"type": "supervised", "supervised": {"hyperparameters": hyper}}, tunelab={}
    ).json()
    assert job["hyperparameters"] == hyper and job["seed"] == 7
    train = job["tunelab"]["spec"]["train"]
    assert (train["epochs"], train["batch_size"], train["lr"], train["seed"]) == (2, 4, 1e-4, 7)
    assert job["tunelab"]["spec"]["checkpoints"] == {"every_steps": 10, "keep_last": 3}


def test_state_machine_without_workers(api: Api, good_file: bytes) -> None:
    job = api.create_job(api.upload(good_file)["id"]).json()
    assert job["status"] == "queued"
    path = f"/fine_tuning/jobs/{job['id']}"
    assert api.call("POST", f"{path}/pause").json()["status"] == "paused"
    assert api.call("POST", f"{path}/resume").json()["status"] == "queued"
    cancelled = api.call("POST", f"{path}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert _error(api.call("POST", f"{path}/resume"), 400)["code"] == "invalid_job_state"
    events = [e["message"] for e in api.call("GET", f"{path}/events").json()["data"]]
    assert events[0] == "Job cancelled" and events[-1].startswith("Validating training file")


def test_a_file_is_deletable_once_no_unfinished_job_uses_it(api: Api, good_file: bytes) -> None:
    file_id = api.upload(good_file)["id"]
    job = api.create_job(file_id).json()
    assert _error(api.call("DELETE", f"/files/{file_id}"), 400)["code"] == "file_in_use"
    assert _error(api.call("DELETE", f"/files/{file_id}", who="b"), 404)["code"] == "file_not_found"
    api.call("POST", f"/fine_tuning/jobs/{job['id']}/cancel")
    assert api.call("DELETE", f"/files/{file_id}").json()["deleted"] is True
    assert api.call("GET", f"/files/{file_id}").status_code == 404


def test_list_jobs_pages_and_filters(api: Api, good_file: bytes) -> None:
    file_id = api.upload(good_file)["id"]
    ids = [api.create_job(file_id, metadata={"n": str(i % 2)}).json()["id"] for i in range(5)]
    page = api.call("GET", "/fine_tuning/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = api.call("GET", "/fine_tuning/jobs", params={"limit": 10, "after": page["last_id"]}).json()
    assert [j["id"] for j in rest["data"]] == ids[::-1][2:] and not rest["has_more"]
    odd = api.call("GET", "/fine_tuning/jobs", params={"metadata[n]": "1"}).json()
    assert [j["id"] for j in odd["data"]] == [ids[3], ids[1]]
    bare = [api.create_job(file_id).json()["id"] for _ in range(3)]  # no metadata
    without = api.call("GET", "/fine_tuning/jobs", params={"metadata": "null"}).json()
    assert [j["id"] for j in without["data"]] == bare[::-1] and all(j["metadata"] is None for j in without["data"])
    first = api.call("GET", "/fine_tuning/jobs", params={"metadata": "null", "limit": 2}).json()
    assert [j["id"] for j in first["data"]] == bare[:0:-1] and first["has_more"]
    last = api.call("GET", "/fine_tuning/jobs", params={"metadata": "null", "after": first["last_id"]}).json()
    assert [j["id"] for j in last["data"]] == [bare[0]] and not last["has_more"]
    assert len(api.call("GET", "/fine_tuning/jobs", params={"limit": 100}).json()["data"]) == 8


def test_authentication(api: Api) -> None:
    assert _error(api.call("GET", "/files", who=None), 401)["code"] == "missing_api_key"
    bad = api.client.get("/v1/files", headers={"Authorization": "Bearer tl-wrong"})
    assert _error(bad, 401)["code"] == "invalid_api_key"


# A job trained in-process, then every route is tried with the other project's key.


@dataclass
class Trained:
    api: Api
    file_id: str
    job: dict[str, Any]
    checkpoint_model: str


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Iterator[Trained]:
    tmp = tmp_path_factory.mktemp("trained")
    for api in _api(tmp, tiny_llama_dir, "sqlite"):
        file_id = api.upload(chat_file(tmp / "train.jsonl").read_bytes())["id"]
        spec = {**FAST, "eval": {"max_examples": 4, "samples": 1}}
        job_id = api.create_job(file_id, suffix="isol", tunelab={"spec": spec}).json()["id"]
        claimed = api.store.leases.claim("w-test", 60)
        assert claimed is not None and claimed.id == job_id
        Worker(api.settings, "w-test", api.store).run_one(claimed)
        job = api.call("GET", f"/fine_tuning/jobs/{job_id}").json()
        assert job["status"] == "succeeded", job
        checkpoints = api.call("GET", f"/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
        yield Trained(api, file_id, job, checkpoints[-1]["fine_tuned_model_checkpoint"])


def test_a_finished_job(trained: Trained) -> None:
    api, job = trained.api, trained.job
    assert job["fine_tuned_model"] == f"ft:tiny:isol:{job['id'].removeprefix('ftjob-')}"
    assert job["trained_tokens"] > 0 and job["finished_at"] >= job["created_at"]
    csv = api.call("GET", f"/files/{job['result_files'][0]}/content").text.splitlines()
    assert csv[0].startswith("step,train_loss,valid_loss") and len(csv) == 1 + 6
    assert csv[-1].split(",")[2] != ""  # the validation loss after training
    steps = [cp["step_number"] for cp in api.call("GET", f"/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]]
    assert steps == [6, 4, 2]
    events = api.call("GET", f"/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
    metrics = [e for e in events if e["type"] == "metrics" and "train_loss" in (e["data"] or {})]
    assert sorted(e["data"]["step"] for e in metrics) == [1, 2, 3, 4, 5, 6]
    assert metrics[0]["data"]["total_steps"] == 6
    models = [m["id"] for m in api.call("GET", "/models").json()["data"]]
    assert models == ["embedded", "tiny", job["fine_tuned_model"]]


@pytest.mark.parametrize("which", ["fine_tuned", "checkpoint", "base"])
def test_chat_with_each_kind_of_model(trained: Trained, which: str) -> None:
    model = {"fine_tuned": trained.job["fine_tuned_model"], "checkpoint": trained.checkpoint_model, "base": "tiny"}
    body = {"model": model[which], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
    reply = trained.api.call("POST", "/chat/completions", json=body).json()
    assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] <= 5
    again = trained.api.call("POST", "/chat/completions", json=body).json()
    assert again["choices"][0]["message"]["content"] == reply["choices"][0]["message"]["content"]  # greedy


# Chat requests: checked before generation (and before a stream starts), and stop strings.

STRICT_TEMPLATE = (  # the tiny model's template, refusing tool messages as some real templates do
    "{% for message in messages %}{% if message['role'] == 'tool' %}"
    "{{ raise_exception('tool messages must follow an assistant tool call') }}{% endif %}{% endfor %}" + CHAT_TEMPLATE
)


@pytest.fixture(scope="module")
def chat_api(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Iterator[Api]:
    """An API with the tiny model, and the same model with a stricter chat template as "strict"."""
    tmp = tmp_path_factory.mktemp("chat")
    strict = shutil.copytree(tiny_llama_dir, tmp / "strict")
    tokenizer = AutoTokenizer.from_pretrained(strict)
    tokenizer.chat_template = STRICT_TEMPLATE
    tokenizer.save_pretrained(strict)
    yield from _api(tmp, tiny_llama_dir, "sqlite", {"strict": strict})


def _chat(api: Api, content: str = "What is the capital of France?", model: str = "tiny", **body: Any) -> Response:
    messages = [{"role": "user", "content": content}]
    return api.call("POST", "/chat/completions", json={"model": model, "messages": messages, **body})


def _streamed(response: Response) -> tuple[str, list[dict[str, Any]]]:
    """The text of a streamed reply and its chunks."""
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]), chunks


def test_a_prompt_longer_than_the_context_is_refused(chat_api: Api) -> None:
    long = "word " * 600  # over 512 tokens, the tiny model's context
    for stream in (False, True):
        error = _error(_chat(chat_api, long, max_tokens=2, stream=stream), 400)
        assert (error["code"], error["param"]) == ("context_length_exceeded", "messages"), error
        assert error["message"].startswith("This model's maximum context length is 512 tokens.")
    # The prompt fits, but not with the completion asked for.
    error = _error(_chat(chat_api, "hi", max_tokens=600, stream=True), 400)
    assert error["code"] == "context_length_exceeded" and "600 in the completion" in error["message"]
    # Without max_tokens, the completion gets the room that is left.
    fits = _chat(chat_api, "word " * 240, temperature=0).json()
    assert fits["usage"]["total_tokens"] <= 512 and fits["usage"]["prompt_tokens"] > 256


def test_a_template_error_is_a_400_even_when_streaming(chat_api: Api) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]
    for stream in (False, True):
        body = {"model": "strict", "messages": messages, "max_tokens": 2, "stream": stream}
        error = _error(chat_api.call("POST", "/chat/completions", json=body), 400)
        assert (error["code"], error["param"]) == ("invalid_messages", "messages"), error
        assert "tool messages must follow an assistant tool call" in error["message"]
    assert _chat(chat_api, model="strict", max_tokens=2, stream=True).status_code == 200  # a user message is fine


def _stop_in(text: str) -> str:
    """Three letters from the middle of `text` (the reply of the tiny model is noise), found there first."""
    for i in range(len(text) // 3, len(text) - 3):
        stop = text[i : i + 3]
        if stop.isalpha() and stop.isascii() and text.index(stop) > 0:
            return stop
    raise AssertionError(f"no stop string found in {text!r}")


def test_stop_strings_end_the_reply_before_them(chat_api: Api) -> None:
    full = _chat(chat_api, max_tokens=24, temperature=0).json()["choices"][0]
    assert full["finish_reason"] == "length"
    stop = _stop_in(full["message"]["content"])
    expected = full["message"]["content"][: full["message"]["content"].index(stop)]
    cut = _chat(chat_api, max_tokens=24, temperature=0, stop=["never-generated", stop]).json()
    assert cut["choices"][0]["message"]["content"] == expected and cut["choices"][0]["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] < 24
    text, chunks = _streamed(_chat(chat_api, max_tokens=24, temperature=0, stop=stop, stream=True))
    assert text == expected  # no piece of the stop string was ever sent, not even one held back at a chunk's end
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    error = _error(_chat(chat_api, stop=["a", "b", "c", "d", "e"]), 400)
    assert (error["code"], error["param"]) == ("invalid_value", "stop")


def test_events_and_checkpoints_pages(trained: Trained) -> None:
    api, path = trained.api, f"/fine_tuning/jobs/{trained.job['id']}"
    everything = api.call("GET", f"{path}/events", params={"limit": 1000}).json()
    assert not everything["has_more"] and len(everything["data"]) > 10
    seen: list[str] = []
    page: dict[str, Any] = {"has_more": True, "last_id": None}
    while page["has_more"]:
        params = {"limit": 4, **({"after": page["last_id"]} if page["last_id"] else {})}
        page = api.call("GET", f"{path}/events", params=params).json()
        assert 0 < len(page["data"]) <= 4 and page["first_id"] == page["data"][0]["id"]
        seen += [e["id"] for e in page["data"]]
    assert seen == [e["id"] for e in everything["data"]]  # newest first, each event once

    first = api.call("GET", f"{path}/checkpoints", params={"limit": 2}).json()
    assert [c["step_number"] for c in first["data"]] == [6, 4] and first["has_more"]
    rest = api.call("GET", f"{path}/checkpoints", params={"limit": 2, "after": first["last_id"]}).json()
    assert [c["step_number"] for c in rest["data"]] == [2] and not rest["has_more"]
    assert _error(api.call("GET", f"{path}/checkpoints", params={"limit": 0}), 400)["param"] == "limit"
    # Another project's cursor is no position in this list.
    other = api.call("GET", f"{path}/events", params={"after": trained.job["id"]}).json()
    assert other["data"] == [] and not other["has_more"]


def test_a_results_file_cannot_train(trained: Trained) -> None:
    error = _error(trained.api.create_job(trained.job["result_files"][0]), 400)
    assert (error["code"], error["param"]) == ("invalid_file_purpose", "training_file")


def test_other_projects_checkpoint_model_is_not_found(trained: Trained) -> None:
    body = {"model": trained.checkpoint_model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert trained.api.call("POST", "/chat/completions", json=body).status_code == 200
    for stream in (False, True):
        error = _error(trained.api.call("POST", "/chat/completions", who="b", json={**body, "stream": stream}), 404)
        assert (error["code"], error["param"]) == ("model_not_found", "model")
        assert error["message"] == f"No model found with id {trained.checkpoint_model!r}."


def _isolation_cases(t: Trained) -> dict[tuple[str, str], tuple[dict[str, Any], int]]:
    """For every route: the request project B makes on project A's objects, and the status B must get."""
    job_id, model = t.job["id"], t.job["fine_tuned_model"]
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return {
        ("POST", "/v1/files"): ({}, 0),  # creates B's own object: nothing of A's can be named
        ("GET", "/v1/files"): ({}, 200),
        ("GET", "/v1/files/{file_id}"): ({"file_id": t.file_id}, 404),
        ("GET", "/v1/files/{file_id}/content"): ({"file_id": t.file_id}, 404),
        ("DELETE", "/v1/files/{file_id}"): ({"file_id": t.file_id}, 404),
        ("POST", "/v1/fine_tuning/jobs"): ({"json": {"model": "tiny", "training_file": t.file_id}}, 404),
        ("GET", "/v1/fine_tuning/jobs"): ({"params": {"after": job_id}}, 200),
        ("GET", "/v1/fine_tuning/jobs/{job_id}"): ({"job_id": job_id}, 404),
        ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel"): ({"job_id": job_id}, 404),
        ("POST", "/v1/fine_tuning/jobs/{job_id}/pause"): ({"job_id": job_id}, 404),
        ("POST", "/v1/fine_tuning/jobs/{job_id}/resume"): ({"job_id": job_id}, 404),
        ("GET", "/v1/fine_tuning/jobs/{job_id}/events"): ({"job_id": job_id}, 404),
        ("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints"): ({"job_id": job_id}, 404),
        ("GET", "/v1/models"): ({}, 200),
        ("GET", "/v1/models/{model_id}"): ({"model_id": model}, 404),
        ("DELETE", "/v1/models/{model_id}"): ({"model_id": model}, 404),
        ("POST", "/v1/chat/completions"): ({"json": chat}, 404),
    }


def test_tenant_isolation_on_every_route(trained: Trained) -> None:
    api = trained.api
    cases = _isolation_cases(trained)
    schema = api.client.app.openapi()  # type: ignore[attr-defined]
    routes = {(method.upper(), path) for path, item in schema["paths"].items() for method in item}
    assert routes == set(cases)  # a new route must be added here
    a_objects = {trained.file_id, trained.job["id"], trained.job["fine_tuned_model"]}
    for (method, path), (args, status) in cases.items():
        url = path.format(**{k: v for k, v in args.items() if k.endswith("_id")})
        kwargs = {k: v for k, v in args.items() if k in ("json", "params")}
        assert api.client.request(method, url, **kwargs).status_code == 401, url  # no key, no answer
        if status == 0:
            continue
        response = api.client.request(method, url, headers={"Authorization": f"Bearer {api.keys['b']}"}, **kwargs)
        assert response.status_code == status, (method, url, response.text)
        assert not a_objects & set(json.dumps(response.json()).replace('"', " ").split()), (method, url)
    # A still has everything.
    assert api.call("GET", f"/files/{trained.file_id}").status_code == 200
    assert api.call("GET", f"/models/{trained.job['fine_tuned_model']}").status_code == 200
    assert api.call("GET", f"/models/{trained.checkpoint_model}", who="b").status_code == 404


def test_delete_models(trained: Trained) -> None:
    """Runs last in the module: it deletes the module's fine-tuned model."""
    api = trained.api
    assert _error(api.call("DELETE", "/models/tiny"), 403)["code"] == "model_not_deletable"
    model = trained.job["fine_tuned_model"]
    job_dir = api.settings.jobs_dir / trained.job["id"]
    assert (job_dir / "merged" / "config.json").is_file() and (job_dir / "adapter" / "adapter_config.json").is_file()
    assert _error(api.call("DELETE", f"/models/{model}", who="b"), 404)["code"] == "model_not_found"
    assert (job_dir / "merged").is_dir()  # another project's delete touched nothing
    assert api.call("DELETE", f"/models/{model}").json() == {"id": model, "object": "model", "deleted": True}
    assert not (job_dir / "merged").exists() and not (job_dir / "adapter").exists()
    assert api.call("GET", f"/models/{model}").status_code == 404
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    assert _error(api.call("POST", "/chat/completions", json=chat), 404)["code"] == "model_not_found"
    assert _error(api.call("DELETE", f"/models/{model}"), 404)["code"] == "model_not_found"
    # Checkpoints are models of their own: they stay, and still answer.
    body = {"model": trained.checkpoint_model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert (job_dir / "checkpoints").is_dir() and api.call("POST", "/chat/completions", json=body).status_code == 200


def test_delete_a_pissa_model_removes_all_its_folders(api: Api, good_file: bytes) -> None:
    """PiSSA also keeps its initial adapter (pissa_init) beside the model: deleting the model removes it too."""
    spec = {"train": {"max_steps": 2, "max_seq_len": 64, "batch_size": 2}, **NO_EVAL}
    job_id = api.create_job(api.upload(good_file)["id"], tunelab={"method": "pissa", "spec": spec}).json()["id"]
    claimed = api.store.leases.claim("w-test", 60)
    assert claimed is not None and claimed.id == job_id
    Worker(api.settings, "w-test", api.store).run_one(claimed)
    job = api.call("GET", f"/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    job_dir = api.settings.jobs_dir / job_id
    folders = [job_dir / name for name in ("adapter", "pissa_init")]
    assert all(f.is_dir() for f in folders)
    assert api.call("DELETE", f"/models/{job['fine_tuned_model']}").json()["deleted"] is True
    assert [f.name for f in folders if f.exists()] == [] and not (job_dir / "merged").exists()


def test_integration_errors_name_the_field(api: Api, good_file: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    import tunelab.extras

    file_id = api.upload(good_file)["id"]
    wandb = {"type": "wandb", "wandb": {"project": "p"}}
    cases: list[tuple[list[Any], str, str, str]] = [
        ([wandb, {"type": "comet", "comet": {}}], "unsupported_integration", "integrations[1].type", "'comet'"),
        ([{"type": "wandb"}], "missing_required_parameter", "integrations[0].wandb", "integrations[0].wandb"),
        ([{"type": "wandb", "wandb": {}}], "missing_required_parameter", "integrations[0].wandb.project", "project"),
        ([{**wandb, "x": 1}], "unknown_parameter", "integrations[0].x", "integrations[0].x"),
        (
            [{"type": "wandb", "wandb": {"project": "p", "team": "t"}}],
            "unknown_parameter",
            "integrations[0].wandb.team",
            "team",
        ),
    ]
    for integrations, code, param, words in cases:
        error = _error(api.create_job(file_id, integrations=integrations), 400)
        assert (error["code"], error["param"]) == (code, param) and words in error["message"], (integrations, error)
    both = {"spec": {**NO_EVAL, "train": {"wandb": {"project": "q"}}}}
    assert _error(api.create_job(file_id, integrations=[wandb], tunelab=both), 400)["param"] == "integrations[0]"
    monkeypatch.setattr(tunelab.extras, "_findable", lambda module: module != "wandb")  # a service without W&B
    error = _error(api.create_job(file_id, integrations=[wandb]), 400)
    assert (error["code"], error["param"]) == ("integration_not_available", "integrations[0].type")
    assert "needs wandb" in error["message"] and "pip install 'tunelab[trackers]'" in error["message"]
    assert api.call("GET", "/fine_tuning/jobs").json()["data"] == []  # no job was created


def test_a_wandb_integration_logs_the_job_offline_into_its_folder(
    api: Api, good_file: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    settings = {"project": "tunelab-tests", "name": "my-run", "tags": ["a", "b"]}
    spec = {"train": {"max_steps": 2, "max_seq_len": 64, "batch_size": 2}, **NO_EVAL}
    response = api.create_job(
        api.upload(good_file)["id"], integrations=[{"type": "wandb", "wandb": settings}], tunelab={"spec": spec}
    )
    assert response.status_code == 200, response.text
    job = response.json()
    shown = {**settings, "entity": None}
    assert job["integrations"] == [{"type": "wandb", "wandb": shown}]  # as OpenAI returns it
    assert job["tunelab"]["spec"]["train"]["report_to"] == ["tensorboard", "wandb"]  # the default, and W&B
    claimed = api.store.leases.claim("w-test", 60)
    assert claimed is not None and claimed.id == job["id"]
    Worker(api.settings, "w-test", api.store).run_one(claimed)
    done = api.call("GET", f"/fine_tuning/jobs/{job['id']}").json()
    assert done["status"] == "succeeded" and done["integrations"] == job["integrations"], done
    job_dir = api.settings.jobs_dir / job["id"]
    run_id = json.loads((job_dir / "trackers.json").read_text(encoding="utf-8"))["wandb"]
    (record,) = (job_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")  # offline: no network
    content = record.read_bytes()
    assert all(word.encode() in content for word in ("tunelab-tests", "my-run", "train/loss"))
    assert list((job_dir / "tensorboard" / job["id"]).glob("events.out.tfevents.*"))  # the default tracker too
    listed = api.call("GET", "/fine_tuning/jobs").json()["data"]
    assert listed[0]["integrations"] == job["integrations"]
    parsed = FineTuningJob.model_validate(done)  # the openai client's own type reads it
    assert parsed.integrations and parsed.integrations[0].wandb.tags == ["a", "b"]
