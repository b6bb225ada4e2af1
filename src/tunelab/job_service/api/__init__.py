"""The HTTP API. Routes only translate HTTP; the rules live in `jobs.py`, `files.py` and `models.py`, the queries in
`store/`."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from tunelab.job_service.api import chat, dashboard, files, jobs, models
from tunelab.job_service.api.deps import ServiceContext
from tunelab.job_service.api.guard import check_request
from tunelab.job_service.errors import ApiError
from tunelab.job_service.files import validate_uploaded
from tunelab.job_service.settings import ServiceSettings
from tunelab.job_service.store import Store
from tunelab.serving.errors import CatchAll, install_error_handlers

log = logging.getLogger("tunelab.job_service.api")
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

    # The guard runs before every route's own parameters: hostile strings and numbers never reach a query.
    app = FastAPI(title="tunelab service", version="1", lifespan=lifespan, dependencies=[Depends(check_request)])
    app.state.ctx = ctx
    for module in (files, jobs, models, chat):
        app.include_router(module.router)
    dashboard.mount(app)  # the web page at / (its assets under /dashboard): same process and port as /v1
    install_error_handlers(app)  # the serving engine's: one error shape for every route of both servers
    app.add_middleware(CatchAll)  # first added, innermost: an unexpected error is a 500 that keeps the connection
    app.add_middleware(UploadLimit, limit=settings.max_file_bytes + UPLOAD_OVERHEAD)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _catch_up(ctx: ServiceContext) -> None:
    # torch and the method registry are imported here, in the background, rather than by the first job request
    # (JobSpec validation needs the registry) or the first chat: the API answers from the first second.
    import tunelab.job_service.generation
    import tunelab.methods  # noqa: F401

    # torch and transformers bring millions of long-lived objects; each full collection would walk them all and
    # pause requests for tens of milliseconds. Frozen, they are left out of later collections.
    gc.collect()
    gc.freeze()

    validate_uploaded(ctx.settings, ctx.store, ctx.store.files.to_validate())


def _error(status: int, code: str, message: str, param: str | None = None) -> JSONResponse:
    return ApiError(status, code, message, param).response()


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
