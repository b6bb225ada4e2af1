"""/v1/chat/completions for base, fine-tuned and checkpoint models, with streaming (server-sent events)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Any

import anyio
from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from tunelab.service.api.deps import ContextDep, ProjectDep
from tunelab.service.chat import Completion, find_target
from tunelab.service.ids import new_id
from tunelab.service.schemas import ChatRequest

router = APIRouter(prefix="/v1/chat", tags=["chat"])
_END = object()


@router.post("/completions", response_model=None)
async def chat_completions(
    ctx: ContextDep, project: ProjectDep, body: ChatRequest
) -> dict[str, Any] | StreamingResponse:
    from tunelab.service.generation import complete, stream  # torch: loaded on first use, not at startup

    target = await anyio.to_thread.run_sync(find_target, ctx.settings, ctx.store, project.id, body.model)
    executor = ctx.chat.executor
    loaded = await asyncio.wrap_future(executor.submit(ctx.chat.get, target))
    head = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": body.model}
    if not body.stream:
        done = await asyncio.wrap_future(executor.submit(complete, loaded, body))
        message = {"role": "assistant", "content": done.text, "refusal": None}
        choice = {"index": 0, "message": message, "finish_reason": done.finish_reason, "logprobs": None}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(done)}
    usage = body.stream_options is not None and body.stream_options.include_usage
    pieces = _pieces(stream(loaded, body, executor), ctx.stream_waiters)
    return StreamingResponse(_events(head, pieces, usage), media_type="text/event-stream")


async def _pieces(pieces: Iterator[str | Completion], limiter: anyio.CapacityLimiter | None) -> AsyncIterator[Any]:
    """The generator's pieces, each awaited on a waiting thread (waiting for a token must not hold an API thread)."""
    while (piece := await anyio.to_thread.run_sync(partial(next, pieces, _END), limiter=limiter)) is not _END:
        yield piece


async def _events(head: dict[str, Any], pieces: AsyncIterator[Any], include_usage: bool) -> AsyncIterator[str]:
    chunk = {**head, "object": "chat.completion.chunk"}

    def sse(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if delta or finish else []
        return f"data: {json.dumps({**chunk, 'choices': choices, **extra})}\n\n"

    yield sse({"role": "assistant", "content": ""})
    async for piece in pieces:
        if isinstance(piece, Completion):
            yield sse({}, piece.finish_reason)
            if include_usage:
                yield sse({}, usage=_usage(piece))
        else:
            yield sse({"content": piece})
    yield "data: [DONE]\n\n"


def _usage(done: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }
