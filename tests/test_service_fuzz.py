"""The service fuzzed from its own OpenAPI schema (schemathesis, in-process ASGI, SQLite; PostgreSQL too when
TUNELAB_TEST_POSTGRES_URL is set): whatever a client sends, no 5xx, and every refusal is OpenAI's error shape
with a code. TUNELAB_FUZZ_EXAMPLES sets the examples per operation on each database (CI: the defaults, about
1,050 requests in all; bench/fuzz_service.py runs more)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode
from schemathesis.python import asgi

from service_support import POSTGRES_URL, chat_file, fresh_store
from tunelab.job_service.api import create_app
from tunelab.job_service.settings import ServiceSettings

EXAMPLES = int(os.environ.get("TUNELAB_FUZZ_EXAMPLES", "50"))
# PostgreSQL gets a quarter by default: CI's fuzzing stays near 90 s, with about 1,050 requests on the two.
PER_DATABASE = {"sqlite": EXAMPLES, "postgresql": int(os.environ.get("TUNELAB_FUZZ_EXAMPLES", EXAMPLES // 4))}
# Chat would load the model and generate for each example: its inputs are fuzzed (the model name is random, so
# they end at validation or 404), but the rare request naming a real model is left to test_service_api.
KINDS = ["sqlite"] + (["postgresql"] if POSTGRES_URL else [])
SENT: list[int] = []


@pytest.fixture(scope="module", params=KINDS)
def fuzzed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path
) -> Iterator[tuple[Any, Any, int]]:
    tmp = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    settings_ = ServiceSettings(data_dir=tmp / "svc", models={"tiny": str(tiny_llama_dir)}, max_file_bytes=100_000)
    store = fresh_store(request.param, tmp)
    key = store.keys.create("fuzz")[1]
    app = create_app(settings_, store)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    with asgi.get_client(app) as client:  # one client, one lifespan, for every example
        client.headers["Authorization"] = f"Bearer {key}"
        client.post("/v1/files", files={"file": ("t.jsonl", chat_file(tmp / "t.jsonl").read_bytes())},
                    data={"purpose": "fine-tune"})  # fmt: skip
        yield schema, client, PER_DATABASE[request.param]
    store.close()
    print(f"\nfuzz (to {request.param}): {len(SENT)} requests in all, no 5xx")  # with -s: the count the issue asks


def operations() -> list[str]:
    """The operations' labels, from a schema made without a database (only the routes matter here)."""
    app = create_app(ServiceSettings(data_dir=Path("/nonexistent")), store=_NoStore())  # type: ignore[arg-type]
    return sorted(op.ok().label for op in schemathesis.openapi.from_dict(app.openapi()).get_all_operations())


class _NoStore:
    """create_app needs a store object only to hold it; the schema is read without starting the app."""


@pytest.mark.parametrize("label", operations())
def test_no_request_makes_the_service_fail(fuzzed: tuple[Any, Any, int], label: str) -> None:
    schema, client, examples = fuzzed
    operation = next(op.ok() for op in schema.get_all_operations() if op.ok().label == label)
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def probe(case: Any) -> None:
        response = case.call(session=client)
        SENT.append(1)
        assert response.status_code < 500, (case.method, case.formatted_path, response.text[:500])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert isinstance(error["code"], str) and error["code"], error

    probe()


# Values a schema-driven fuzzer seldom sends, put anywhere in a valid job request: the probes, generalised.
HOSTILE_VALUES = st.sampled_from(
    [2**63, 2**80, -(2**63) - 1, 2**31, -1, 0, float("inf"), float("-inf"), float("nan"), 1e308, True, "8", "x",
     "\x00", "a\x00b", "\ud800", "\udfff", "x" * 70_000, [], {}, None, [0] * 1001, {"k\x00": "v"}]
)  # fmt: skip
JOB_PATHS = [
    ("seed",), ("training_file",), ("validation_file",), ("suffix",), ("model",), ("metadata", "k"),
    ("metadata", "k\x00"), ("integrations",), ("method", "type"),
    *[("method", "supervised", "hyperparameters", n) for n in ("n_epochs", "batch_size", "learning_rate_multiplier")],
    ("method", "dpo", "hyperparameters", "beta"), ("tunelab", "scenario"), ("tunelab", "method"),
    *[("tunelab", "spec", "train", name) for name in ("seed", "batch_size", "max_steps", "max_seq_len", "lr", "epochs",
                                                       "grad_accum", "warmup_ratio", "log_every")],
    *[("tunelab", "spec", "method", name) for name in ("r", "alpha", "dropout", "target_modules")],
    ("tunelab", "spec", "task", "instruction"), ("tunelab", "spec", "checkpoints", "keep_last"),
    ("tunelab", "spec", "checkpoints", "every_steps"), ("tunelab", "spec", "eval", "max_examples"),
]  # fmt: skip


def test_hostile_values_anywhere_in_a_job_request(fuzzed: tuple[Any, Any, int]) -> None:
    _, client, examples = fuzzed
    file_id = client.get("/v1/files").json()["data"][-1]["id"]

    @settings(max_examples=examples * 4, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(JOB_PATHS), value=HOSTILE_VALUES)
    def probe(path: tuple[str, ...], value: Any) -> None:
        body: dict[str, Any] = {
            "model": "tiny",
            "training_file": file_id,
            "tunelab": {"spec": {"eval": {"enabled": False}}},
        }
        node = body
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
        # json.dumps writes NaN, Infinity and \ud800 escapes, as a hostile client can.
        raw = json.dumps(body).encode()
        response = client.post("/v1/fine_tuning/jobs", data=raw, headers={"Content-Type": "application/json"})
        SENT.append(1)
        assert response.status_code < 500, (path, repr(value)[:80], response.text[:300])
        if response.status_code >= 400:
            assert response.json()["error"]["code"], response.text
        else:  # accepted: it must be a value a job can hold, and listing it must work
            client.post(f"/v1/fine_tuning/jobs/{response.json()['id']}/cancel")
            assert client.get("/v1/fine_tuning/jobs").status_code == 200

    probe()
