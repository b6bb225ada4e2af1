"""Dependencies shared by the routes: the service context and the caller's project (from the Bearer key)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

import anyio
from fastapi import Depends, Header, Request

from tunelab.job_service.chat import ChatModels
from tunelab.job_service.db import Project
from tunelab.job_service.errors import ApiError
from tunelab.job_service.settings import ServiceSettings
from tunelab.job_service.store import Store

KEY_CACHE_S = 5.0  # how long a key's project is remembered; a revoked key stops working within this time


@dataclass
class ServiceContext:
    settings: ServiceSettings
    store: Store
    chat: ChatModels
    started_at: float = field(default_factory=time.time)
    # Threads that wait for streamed tokens: kept apart from the request threads, which a slow stream must not hold.
    # Created at startup: a limiter belongs to the running event loop.
    stream_waiters: anyio.CapacityLimiter | None = None
    _keys: dict[str, tuple[Project | None, float]] = field(default_factory=dict)

    def project_for_key(self, key: str) -> Project | None:
        """The key's project, remembered briefly: pollers send the same key many times a second, and the lookup
        was as costly as the query they asked for."""
        now = time.monotonic()
        cached = self._keys.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        if len(self._keys) > 10_000:  # bounded: unknown keys are cached too (so guessing is not cheaper)
            self._keys.clear()
        project = self.store.keys.project_for(key)
        self._keys[key] = (project, now + KEY_CACHE_S)
        return project

    @classmethod
    def build(cls, settings: ServiceSettings, store: Store | None = None) -> ServiceContext:
        # The pool holds a connection for each request thread, so requests never queue on it.
        store = store or Store(settings.database_url, pool_size=settings.api_threads + 4)
        return cls(settings, store, ChatModels(settings.chat_cache, settings.threads_per_process()))


def get_context(request: Request) -> ServiceContext:
    ctx: ServiceContext = request.app.state.ctx
    return ctx


ContextDep = Annotated[ServiceContext, Depends(get_context)]


def current_project(ctx: ContextDep, authorization: Annotated[str | None, Header()] = None) -> Project:
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(
            401, "missing_api_key", "No API key: send 'Authorization: Bearer <key>'.", type_="authentication_error"
        )
    project = ctx.project_for_key(key.strip())
    if project is None:
        raise ApiError(401, "invalid_api_key", "Incorrect API key provided.", type_="authentication_error")
    return project


ProjectDep = Annotated[Project, Depends(current_project)]
