"""The HTTP app of `tunelab serve`: routes find the engine's model a request names and hand the request to the
serving engine (`tunelab.serving.completions`); nothing else happens here.

Routes are plain `def`s: FastAPI runs them in its thread pool, where blocking on the model is fine.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tunelab.inference_server.metrics import ServeMetrics
from tunelab.inference_server.metrics import install as install_metrics
from tunelab.serving import completions
from tunelab.serving.engines import Engine, ServedModel, UnknownModel
from tunelab.serving.errors import install_error_handlers, model_not_found
from tunelab.serving.schemas import ChatCompletionRequest, CompletionRequest, Model, ModelList


class Server:
    def __init__(self, engine: Engine, metrics: ServeMetrics) -> None:
        self.engine, self.metrics, self.started = engine, metrics, int(time.time())

    def model(self, model_id: str) -> ServedModel:
        try:
            return self.engine.served(model_id)
        except UnknownModel:
            raise model_not_found(model_id) from None

    def counter(self, model_id: str) -> completions.OnDone:
        return lambda run: self.metrics.generation_done(model_id, run)


def get_server(request: Request) -> Server:
    server: Server = request.app.state.server
    return server


ServerDep = Annotated[Server, Depends(get_server)]
router = APIRouter(prefix="/v1")


@router.get("/models")
def list_models(server: ServerDep) -> ModelList:
    return ModelList(data=[Model(id=m, created=server.started) for m in server.engine.model_ids])


@router.get("/models/{model_id:path}")
def retrieve_model(model_id: str, server: ServerDep) -> Model:
    if model_id not in server.engine.model_ids:
        raise model_not_found(model_id)
    return Model(id=model_id, created=server.started)


@router.post("/chat/completions", response_model=None)
def chat_completions(body: ChatCompletionRequest, server: ServerDep) -> Response:
    runs = completions.start_chat(server.model(body.model), body, server.counter(body.model))
    if body.stream:
        return completions.event_stream(
            completions.sse(completions.chat_chunks(runs, body.model, body.include_usage()))
        )
    return JSONResponse(completions.chat_response(runs, body.model).model_dump())


@router.post("/completions", response_model=None)
def text_completions(body: CompletionRequest, server: ServerDep) -> Response:
    runs = completions.start_completion(server.model(body.model), body, server.counter(body.model))
    if body.stream:
        return completions.event_stream(
            completions.sse(completions.completion_chunks(runs, body.model, body.include_usage()))
        )
    return JSONResponse(completions.completion_response(runs, body.model).model_dump())


def create_app(engine: Engine, api_keys: frozenset[str] = frozenset()) -> FastAPI:
    """The OpenAI-compatible app around `engine` (built by `tunelab.serving.engines.build_engine`). With
    `api_keys`, every route but /health needs one of them as a bearer token."""
    app = FastAPI(title="tunelab serve", summary="OpenAI-compatible completions for a base model and its adapters")
    metrics = ServeMetrics()
    app.state.server = Server(engine, metrics)
    install_error_handlers(app)
    install_metrics(app, metrics, api_keys)
    app.include_router(router)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
