"""The service fuzzed from its own OpenAPI schema (schemathesis, in-process ASGI, SQLite; PostgreSQL too when
TUNELAB_TEST_POSTGRES_URL is set): whatever a client sends, no 5xx, and every refusal is OpenAI's error shape
with a code. TUNELAB_FUZZ_EXAMPLES sets the examples per operation on each database (CI: the defaults, about
1,050 requests in all; bench/fuzz_service.py runs more)."""

from __future__ import annotations

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
