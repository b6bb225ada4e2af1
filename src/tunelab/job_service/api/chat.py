"""/v1/chat/completions for base, fine-tuned and checkpoint models: the caller's project decides which models it may
name; the serving engine (`tunelab.serving.completions`, as in `tunelab serve`) does the rest."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from tunelab.job_service.api.deps import ContextDep, ProjectDep
from tunelab.job_service.chat import find_target
from tunelab.serving.schemas import ChatCompletionRequest

if TYPE_CHECKING:
    from tunelab.job_service.generation import Stream

router = APIRouter(prefix="/v1/chat", tags=["chat"])
T = TypeVar("T")


@router.post("/completions", response_model=None)
async def chat_completions(ctx: ContextDep, project: ProjectDep, body: ChatCompletionRequest) -> Response:
    from tunelab.job_service.generation import Stream  # torch: loaded on first use, not at startup
    from tunelab.serving import completions

    target = await anyio.to_thread.run_sync(find_target, ctx.settings, ctx.store, project.id, body.model)
    executor = ctx.chat.executor
    model = await _on(executor, ctx.chat.get, target)
    # Checked here, before a stream starts: a bad request is a plain 400.
    runs = await _on(executor, completions.start_chat, model, body)
    if not body.stream:
        return JSONResponse((await _on(executor, completions.chat_response, runs, body.model)).model_dump())
    events = completions.sse(completions.chat_chunks(runs, body.model, body.include_usage()))
    return completions.event_stream(_events(Stream(events, executor), ctx.stream_waiters))


async def _on(executor: Executor, call: Callable[..., T], *args: Any) -> T:
    """`call` on the chat thread: torch's thread pool belongs to the thread that uses it (see ChatModels)."""
    return await asyncio.wrap_future(executor.submit(call, *args))


async def _events(stream: Stream, limiter: anyio.CapacityLimiter | None) -> AsyncIterator[str]:
    """The stream's events, each awaited on a waiting thread (waiting for a token must not hold an API thread).
    A client that goes away cancels the generation, so the chat thread is not kept busy for nobody."""
    try:
        while (event := await anyio.to_thread.run_sync(stream.next_event, limiter=limiter)) is not None:
            yield event
    finally:
        stream.cancel()
