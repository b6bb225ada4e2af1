"""`/metrics` in Prometheus' text format, and the API key check: the two things every route shares.

Each app has its own registry (several apps live in one test process). Latency is measured to the response's
start: for a stream that is the time to its first byte, and generated tokens are counted when a generation ends.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tunelab.serving.errors import ApiError

if TYPE_CHECKING:
    from tunelab.serving.generation import TextGeneration

OPEN_PATHS = frozenset({"/health"})  # for load balancers' probes: says nothing about models or traffic


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tunelab_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "tunelab_request_seconds", "Time to the response's start, by route", ["route"], registry=self.registry
        )
        self.in_progress = Gauge("tunelab_requests_in_progress", "Requests being handled", registry=self.registry)
        self.prompt_tokens = Counter(
            "tunelab_prompt_tokens", "Prompt tokens of finished generations", ["model"], registry=self.registry
        )
        self.completion_tokens = Counter(
            "tunelab_completion_tokens", "Generated tokens of finished generations", ["model"], registry=self.registry
        )

    def generation_done(self, model: str, run: TextGeneration) -> None:
        self.prompt_tokens.labels(model).inc(len(run.prompt_ids))
        self.completion_tokens.labels(model).inc(run.completion_tokens)

    def text(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


Handler = Callable[[Request], Awaitable[Response]]


def install(app: FastAPI, metrics: ServeMetrics, api_keys: frozenset[str]) -> None:
    """Count every request and, when keys are given, refuse any route but /health without one of them."""

    @app.middleware("http")
    async def observe(request: Request, call_next: Handler) -> Response:
        if api_keys and request.url.path not in OPEN_PATHS and not _authorised(request, api_keys):
            return _unauthorised()
        route = _route(request)
        started = time.perf_counter()
        metrics.in_progress.inc()
        try:
            response = await call_next(request)
        finally:
            metrics.in_progress.dec()
        metrics.latency.labels(route).observe(time.perf_counter() - started)
        metrics.requests.labels(route, str(response.status_code)).inc()
        return response

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return metrics.text()


def _route(request: Request) -> str:
    # Paths with ids (/v1/models/{id}) are counted under their template, so labels stay few.
    return "/v1/models/{id}" if request.url.path.startswith("/v1/models/") else request.url.path


def _authorised(request: Request, keys: frozenset[str]) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and any(secrets.compare_digest(given.strip(), k) for k in keys)


def _unauthorised() -> Response:
    message = "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'."
    return ApiError(401, "invalid_api_key", message).response()
