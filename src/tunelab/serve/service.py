"""The completions service: request -> prompt tokens -> checked -> generation -> OpenAI response or SSE chunks.

Everything that can fail because of the request (unknown model, too long, bad template) fails here, before a
stream starts, so it still becomes an HTTP error and not a broken stream.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator

from pydantic import BaseModel

from tunelab.data.render import encode_prompt
from tunelab.inference import chat_prompt
from tunelab.serve.engines import Engine, UnknownModel
from tunelab.serve.errors import APIError, context_too_long, error_json, model_not_found, server_error_detail
from tunelab.serve.generation import Sampling, TextGeneration
from tunelab.serve.metrics import ServeMetrics
from tunelab.serve.schemas import (
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
    Model,
    ModelList,
    Usage,
)

log = logging.getLogger("tunelab.serve")


class CompletionService:
    def __init__(self, engine: Engine, metrics: ServeMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.started = int(time.time())

    def models(self) -> ModelList:
        return ModelList(data=[Model(id=m, created=self.started) for m in self.engine.model_ids])

    def model(self, model_id: str) -> Model:
        if model_id not in self.engine.model_ids:
            raise model_not_found(model_id)
        return Model(id=model_id, created=self.started)

    def chat(self, request: ChatCompletionRequest) -> TextGeneration:
        messages = [{"role": _template_role(m.role), "content": m.text()} for m in request.messages]
        try:
            prompt = chat_prompt(self.engine.tokenizer, messages)
        except Exception as exc:  # the model's own template rejects this conversation (e.g. role order)
            raise APIError(400, f"The messages do not fit this model's chat template: {exc}", param="messages") from exc
        max_tokens = request.max_completion_tokens or request.max_tokens
        return self._start(request, prompt, max_tokens, param="messages")

    def completion(self, request: CompletionRequest) -> TextGeneration:
        return self._start(request, request.prompt_text(), request.max_tokens, param="prompt")

    def _start(
        self, request: ChatCompletionRequest | CompletionRequest, prompt: str, max_tokens: int | None, param: str
    ) -> TextGeneration:
        if request.model not in self.engine.model_ids:
            raise model_not_found(request.model)
        ids = encode_prompt(prompt, self.engine.tokenizer)
        limit = self.engine.context_length
        budget = max_tokens if max_tokens is not None else max(limit - len(ids), 1)
        if len(ids) + budget > limit:
            raise context_too_long(limit, len(ids), budget, param)
        try:
            decoder = self.engine.open(request.model, len(ids) + budget)
        except UnknownModel:
            raise model_not_found(request.model) from None
        sampling = Sampling(budget, request.temperature, request.top_p, request.seed, request.stops())
        metrics, model = self.metrics, request.model
        on_done = (lambda run: metrics.generation_done(model, run)) if metrics else None
        return TextGeneration(decoder, ids, sampling, self.engine.tokenizer, self.engine.eos_ids, on_done)


def _template_role(role: str) -> str:
    # "developer" is OpenAI's newer name for the system message; chat templates know only "system".
    return "system" if role == "developer" else role


def _usage(run: TextGeneration) -> Usage:
    prompt = len(run.prompt_ids)
    return Usage(
        prompt_tokens=prompt, completion_tokens=run.completion_tokens, total_tokens=prompt + run.completion_tokens
    )


def chat_response(run: TextGeneration, model: str) -> ChatCompletion:
    text = run.text()
    choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=run.finish_reason)
    return ChatCompletion(
        id=_id("chatcmpl"), created=int(time.time()), model=model, choices=[choice], usage=_usage(run)
    )


def completion_response(run: TextGeneration, model: str) -> Completion:
    text = run.text()
    choice = CompletionChoice(text=text, finish_reason=run.finish_reason)
    return Completion(id=_id("cmpl"), created=int(time.time()), model=model, choices=[choice], usage=_usage(run))


def chat_chunks(run: TextGeneration, model: str, include_usage: bool) -> Iterator[BaseModel]:
    """OpenAI's chunk sequence: the role first, then content deltas, then the finish reason (then usage)."""
    base = {"id": _id("chatcmpl"), "created": int(time.time()), "model": model}
    yield ChatCompletionChunk(**base, choices=[ChunkChoice(delta=Delta(role="assistant", content=""))])
    for delta in run.deltas():
        yield ChatCompletionChunk(**base, choices=[ChunkChoice(delta=Delta(content=delta))])
    yield ChatCompletionChunk(**base, choices=[ChunkChoice(delta=Delta(), finish_reason=run.finish_reason)])
    if include_usage:
        yield ChatCompletionChunk(**base, choices=[], usage=_usage(run))


def completion_chunks(run: TextGeneration, model: str, include_usage: bool) -> Iterator[BaseModel]:
    base = {"id": _id("cmpl"), "created": int(time.time()), "model": model}
    for delta in run.deltas():
        yield Completion(**base, choices=[CompletionChoice(text=delta)])
    yield Completion(**base, choices=[CompletionChoice(text="", finish_reason=run.finish_reason)])
    if include_usage:
        yield Completion(**base, choices=[], usage=_usage(run))


def sse(chunks: Iterator[BaseModel]) -> Iterator[str]:
    """Server-sent events as OpenAI sends them; a failure mid-stream becomes an error event, not a cut."""
    try:
        for chunk in chunks:
            yield f"data: {chunk.model_dump_json()}\n\n"
    except Exception:
        log.exception("generation failed while streaming")
        yield f"data: {error_json(server_error_detail())}\n\n"
        return
    yield "data: [DONE]\n\n"


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
