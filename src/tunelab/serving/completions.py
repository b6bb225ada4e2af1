"""A request on a model -> checked generations -> OpenAI's response, or its chunks as server-sent events.

Everything that can fail because of the request (a template that refuses the messages, a prompt too long, a bad
logit_bias) fails in `start_chat` / `start_completion`, before a stream starts, so it is still an HTTP error and not
a broken stream. The servers only find the model a request names and decide which thread generates.

The token budget, one rule for both servers: `max_completion_tokens` or `max_tokens` when given; otherwise, on
/v1/chat/completions, all the room the prompt leaves in the model's context (as OpenAI's API does; 256 tokens when a
model's config does not say how long its context is), and 16 on /v1/completions (OpenAI's default there).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from tunelab.data.render import encode_prompt
from tunelab.inference import chat_prompt
from tunelab.serving.engines import ServedModel
from tunelab.serving.errors import ApiError, context_too_long, server_error
from tunelab.serving.generation import Sampling, TextGeneration
from tunelab.serving.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    Usage,
)

log = logging.getLogger("tunelab.serving")
UNKNOWN_CONTEXT_MAX_TOKENS = 256
OnDone = Callable[[TextGeneration], None]


def start_chat(
    model: ServedModel, request: ChatCompletionRequest, on_done: OnDone | None = None
) -> list[TextGeneration]:
    """The request's `n` generations, checked, not yet run."""
    # "developer" is OpenAI's newer name for the system message; chat templates know only "system".
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in request.messages]
    try:
        prompt = chat_prompt(model.tokenizer, messages)
    except Exception as exc:  # the model's own template refuses this conversation (e.g. a role or an order)
        message = f"The model's chat template refused the messages: {exc}"
        raise ApiError(400, "invalid_messages", message, "messages") from exc
    return _start(model, request, prompt, "messages", on_done)


def start_completion(
    model: ServedModel, request: CompletionRequest, on_done: OnDone | None = None
) -> list[TextGeneration]:
    return _start(model, request, request.prompt_text(), "prompt", on_done)


def _start(
    model: ServedModel,
    request: ChatCompletionRequest | CompletionRequest,
    prompt: str,
    param: str,
    on_done: OnDone | None,
) -> list[TextGeneration]:
    ids = encode_prompt(prompt, model.tokenizer)
    budget = _budget(model.context_length, len(ids), request.completion_budget(), param)
    sampling = _sampling(request, budget, len(model.tokenizer))
    runs = []
    for choice in range(request.n or 1):
        # Each choice its own seed, so n choices differ and the same request still gives the same n again.
        seed = None if request.seed is None else request.seed + choice
        decoder = model.open(len(ids) + budget)
        runs.append(TextGeneration(decoder, ids, replace(sampling, seed=seed), model.tokenizer, model.eos_ids, on_done))
    return runs


def _budget(limit: int | None, prompt_tokens: int, asked: int | None, param: str) -> int:
    if limit is None:
        return asked or UNKNOWN_CONTEXT_MAX_TOKENS
    budget = asked if asked is not None else max(limit - prompt_tokens, 1)
    if prompt_tokens + budget > limit:
        raise context_too_long(limit, prompt_tokens, budget, param)
    return budget


def _sampling(request: ChatCompletionRequest | CompletionRequest, budget: int, vocab: int) -> Sampling:
    return Sampling(
        max_tokens=budget,
        temperature=1.0 if request.temperature is None else request.temperature,  # OpenAI's defaults
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=max(request.top_k or 0, 0),
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias=_logit_bias(request.logit_bias or {}, vocab),
        seed=request.seed,
        stop=tuple(request.stop or ()),
    )


def _logit_bias(bias: dict[str, float], vocab: int) -> tuple[tuple[int, float], ...]:
    pairs = []
    for token, value in bias.items():
        if not token.isdigit() or int(token) >= vocab or not -100 <= value <= 100:
            message = f"Invalid logit_bias {token!r}: {value}: keys are token ids below {vocab}, values -100 to 100."
            raise ApiError(400, "invalid_value", message, "logit_bias")
        pairs.append((int(token), value))
    return tuple(pairs)


def _usage(runs: list[TextGeneration]) -> Usage:
    prompt = len(runs[0].prompt_ids)  # one prompt, counted once however many choices, as OpenAI does
    completion = sum(run.completion_tokens for run in runs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def chat_response(runs: list[TextGeneration], model: str) -> ChatCompletion:
    choices = [
        ChatChoice(index=i, message=AssistantMessage(content=run.text()), finish_reason=run.finish_reason)
        for i, run in enumerate(runs)
    ]
    return ChatCompletion(
        id=_id("chatcmpl"), created=int(time.time()), model=model, choices=choices, usage=_usage(runs)
    )


def completion_response(runs: list[TextGeneration], model: str) -> Completion:
    choices = [
        CompletionChoice(index=i, text=run.text(), finish_reason=run.finish_reason) for i, run in enumerate(runs)
    ]
    return Completion(id=_id("cmpl"), created=int(time.time()), model=model, choices=choices, usage=_usage(runs))


def chat_chunks(runs: list[TextGeneration], model: str, include_usage: bool) -> Iterator[BaseModel]:
    """OpenAI's chunk sequence for each choice in turn: the role first, then content deltas, then the finish
    reason; then usage, when asked for."""
    head = {"id": _id("chatcmpl"), "created": int(time.time()), "model": model}
    for i, run in enumerate(runs):
        yield ChatCompletionChunk(**head, choices=[ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
        for delta in run.deltas():
            yield ChatCompletionChunk(**head, choices=[ChunkChoice(index=i, delta=Delta(content=delta))])
        finish = ChunkChoice(index=i, delta=Delta(), finish_reason=run.finish_reason)
        yield ChatCompletionChunk(**head, choices=[finish])
    if include_usage:
        yield ChatCompletionChunk(**head, choices=[], usage=_usage(runs))


def completion_chunks(runs: list[TextGeneration], model: str, include_usage: bool) -> Iterator[BaseModel]:
    head = {"id": _id("cmpl"), "created": int(time.time()), "model": model}
    for i, run in enumerate(runs):
        for delta in run.deltas():
            yield Completion(**head, choices=[CompletionChoice(index=i, text=delta)])
        yield Completion(**head, choices=[CompletionChoice(index=i, text="", finish_reason=run.finish_reason)])
    if include_usage:
        yield Completion(**head, choices=[], usage=_usage(runs))


def sse(chunks: Iterator[BaseModel]) -> Iterator[str]:
    """Server-sent events as OpenAI sends them. The status (200) is sent before the first chunk: a failure after it
    becomes an error event in the stream, as OpenAI reports it, not a cut connection."""
    try:
        for chunk in chunks:
            yield f"data: {chunk.model_dump_json()}\n\n"
    except Exception:
        log.exception("generation failed while streaming")
        yield f"data: {json.dumps(server_error().body())}\n\n"
        return
    yield "data: [DONE]\n\n"


def event_stream(events: Iterator[str] | AsyncIterator[str]) -> StreamingResponse:
    # No proxy buffering: each token should reach the client when it is made.
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
