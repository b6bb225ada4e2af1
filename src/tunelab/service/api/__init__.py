"""The HTTP API. Routes only translate HTTP; the rules live in `jobs.py`, `files.py` and `models.py`, the queries in
`store/`."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from tunelab.service.api import chat, files, jobs, models
from tunelab.service.api.deps import ServiceContext
from tunelab.service.errors import ApiError
from tunelab.service.files import validate_uploaded
from tunelab.service.settings import ServiceSettings
from tunelab.service.store import Store

log = logging.getLogger("tunelab.service.api")
STREAM_WAITERS = 32  # chat streams served at once (generation itself is one at a time)
UPLOAD_OVERHEAD = 64 * 2**10  # multipart headers and the purpose field, on top of the file itself


def create_app(settings: ServiceSettings, store: Store | None = None) -> FastAPI:
    ctx = ServiceContext.build(settings, store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        ctx.stream_waiters = anyio.CapacityLimiter(STREAM_WAITERS)
        ctx.store.upgrade()  # `tunelab service` upgraded already; an app made alone (tests, ASGI servers) has not
        # Files uploaded just before a restart may not have been validated: finish them, off the startup path.
        threading.Thread(target=_catch_up, args=(ctx,), daemon=True, name="catch-up").start()
        yield

    app = FastAPI(title="tunelab service", version="1", lifespan=lifespan)
    app.state.ctx = ctx
    for module in (files, jobs, models, chat):
        app.include_router(module.router)
    _add_error_handlers(app)
    app.add_middleware(UploadLimit, limit=settings.max_file_bytes + UPLOAD_OVERHEAD)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _catch_up(ctx: ServiceContext) -> None:
    # torch and the method registry are imported here, in the background, rather than by the first job request
    # (JobSpec validation needs the registry) or the first chat: the API answers from the first second.
    import tunelab.methods
    import tunelab.service.generation  # noqa: F401

    # torch and transformers bring millions of long-lived objects; each full collection would walk them all and
    # pause requests for tens of milliseconds. Frozen, they are left out of later collections.
    gc.collect()
    gc.freeze()

    validate_uploaded(ctx.settings, ctx.store, ctx.store.files.to_validate())


def _error(status: int, code: str, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(ApiError(status, code, message, param).body(), status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors: list[Any] = list(exc.errors())
        first = errors[0]
        param = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path", "header"))
        code = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
        text = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in errors)
        return _error(400, code, text, param or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "internal_error", "The server had an error while processing your request.")


class UploadLimit:
    """Refuses a request body over the limit before it is read: without this, the multipart parser would spool a
    huge upload to disk first. (Chunked uploads have no length; files.save_upload enforces the limit for them.)
    Plain ASGI rather than @app.middleware("http"), which costs every request an extra task."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.limit:
                message = f"The request is larger than the limit of {self.limit:,} bytes."
                await _error(413, "file_too_large", message, "file")(scope, receive, send)
                return
        await self.app(scope, receive, send)
