"""The HTTP app: routes translate HTTP to the completions service and back; nothing else happens here.

Routes are plain `def`s: FastAPI runs them in its thread pool, where blocking on the model is fine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tunelab.serve.engines import Engine
from tunelab.serve.errors import install_error_handlers
from tunelab.serve.metrics import ServeMetrics
from tunelab.serve.metrics import install as install_metrics
from tunelab.serve.schemas import ChatCompletionRequest, CompletionRequest, Model, ModelList
from tunelab.serve.service import (
    CompletionService,
    chat_chunks,
    chat_response,
    completion_chunks,
    completion_response,
    sse,
)


def get_service(request: Request) -> CompletionService:
    service: CompletionService = request.app.state.service
    return service


Service = Annotated[CompletionService, Depends(get_service)]
router = APIRouter(prefix="/v1")


@router.get("/models")
def list_models(service: Service) -> ModelList:
    return service.models()


@router.get("/models/{model_id:path}")
def retrieve_model(model_id: str, service: Service) -> Model:
    return service.model(model_id)


@router.post("/chat/completions", response_model=None)
def chat_completions(body: ChatCompletionRequest, service: Service) -> Response:
    run = service.chat(body)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(sse(chat_chunks(run, body.model, include_usage)))
    return JSONResponse(chat_response(run, body.model).model_dump())


@router.post("/completions", response_model=None)
def completions(body: CompletionRequest, service: Service) -> Response:
    run = service.completion(body)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(sse(completion_chunks(run, body.model, include_usage)))
    return JSONResponse(completion_response(run, body.model).model_dump())


def _stream(events: Iterator[str]) -> StreamingResponse:
    # No proxy buffering: each token should reach the client when it is made.
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


def create_app(engine: Engine, api_keys: frozenset[str] = frozenset()) -> FastAPI:
    """The OpenAI-compatible app around `engine` (built by `tunelab.serve.engines.build_engine`). With `api_keys`,
    every route but /health needs one of them as a bearer token."""
    app = FastAPI(title="tunelab serve", summary="OpenAI-compatible completions for a base model and its adapters")
    metrics = ServeMetrics()
    app.state.service = CompletionService(engine, metrics)
    install_error_handlers(app)
    install_metrics(app, metrics, api_keys)
    app.include_router(router)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
