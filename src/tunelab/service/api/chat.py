"""/v1/chat/completions for base, fine-tuned and checkpoint models, with streaming (server-sent events)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from tunelab.service.api.deps import ContextDep, ProjectDep
from tunelab.service.chat import Completion, find_target
from tunelab.service.errors import ApiError
from tunelab.service.ids import new_id
from tunelab.service.schemas import ChatRequest

if TYPE_CHECKING:
    from tunelab.service.generation import Stream

router = APIRouter(prefix="/v1/chat", tags=["chat"])
log = logging.getLogger("tunelab.service.api")


@router.post("/completions", response_model=None)
async def chat_completions(
    ctx: ContextDep, project: ProjectDep, body: ChatRequest
) -> dict[str, Any] | StreamingResponse:
    from tunelab.service.generation import Stream, complete, prepare  # torch: loaded on first use, not at startup

    target = await anyio.to_thread.run_sync(find_target, ctx.settings, ctx.store, project.id, body.model)
    executor = ctx.chat.executor
    loaded = await asyncio.wrap_future(executor.submit(ctx.chat.get, target))
    # The template and the context length are checked here, before a stream starts: a bad request is a plain 400.
    run = await asyncio.wrap_future(executor.submit(prepare, loaded, body))
    head = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": body.model}
    if not body.stream:
        done = await asyncio.wrap_future(executor.submit(complete, run))
        message = {"role": "assistant", "content": done.text, "refusal": None}
        choice = {"index": 0, "message": message, "finish_reason": done.finish_reason, "logprobs": None}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(done)}
    usage = body.stream_options is not None and body.stream_options.include_usage
    pieces = _pieces(Stream(run, executor), ctx.stream_waiters)
    return StreamingResponse(_events(head, pieces, usage), media_type="text/event-stream")


async def _pieces(stream: Stream, limiter: anyio.CapacityLimiter | None) -> AsyncIterator[str | Completion]:
    """The stream's pieces, each awaited on a waiting thread (waiting for a token must not hold an API thread).
    A client that goes away cancels the generation, so the chat thread is not kept busy for nobody."""
    try:
        while (piece := await anyio.to_thread.run_sync(stream.next_piece, limiter=limiter)) is not None:
            yield piece
    finally:
        stream.cancel()


async def _events(
    head: dict[str, Any], pieces: AsyncIterator[str | Completion], include_usage: bool
) -> AsyncIterator[str]:
    chunk = {**head, "object": "chat.completion.chunk"}

    def sse(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if delta or finish else []
        return f"data: {json.dumps({**chunk, 'choices': choices, **extra})}\n\n"

    yield sse({"role": "assistant", "content": ""})
    try:
        async for piece in pieces:
            if isinstance(piece, Completion):
                yield sse({}, piece.finish_reason)
                if include_usage:
                    yield sse({}, usage=_usage(piece))
            else:
                yield sse({"content": piece})
    except Exception:  # the status (200) is already sent: report the failure in the stream, as OpenAI does
        log.exception("chat generation failed while streaming")
        message = "The server had an error while generating the reply."
        error = ApiError(500, "internal_error", message, type_="server_error")
        yield f"data: {json.dumps(error.body())}\n\n"
        return
    yield "data: [DONE]\n\n"


def _usage(done: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }
