"""Request and response bodies in the shape of OpenAI's API, for both servers.

Clients send OpenAI's whole parameter list, mostly at values that change nothing (`presence_penalty: 0`,
`logprobs: false`, `n: 1`, `response_format: {"type": "text"}`). Every parameter OpenAI defines is accepted at such
a value; the ones this engine does not implement are refused, by name, only at a value that would change the answer
(`unsupported_value`). A field OpenAI does not define is refused too (`unknown_parameter`): `extra="forbid"`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

FinishReason = Literal["stop", "length"]
UNSUPPORTED = "unsupported_value"  # the pydantic error type (and OpenAI error code) of a refused non-default value


def _listed(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def unless(accepts: Callable[[Any], bool], shown: str) -> AfterValidator:
    """Accept a parameter this engine does not implement only at the values (`shown`) that change nothing."""

    def check(value: Any) -> Any:
        if accepts(value):
            return value
        message = "This server does not support this value; it accepts {shown}."
        raise PydanticCustomError(UNSUPPORTED, message, {"shown": shown})

    return AfterValidator(check)


def only(*accepted: Any) -> AfterValidator:
    return unless(lambda value: value in accepted, " or ".join(json.dumps(a) for a in accepted))  # as JSON shows them


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == {}


Empty = unless(_empty, "null or empty")
# One string or up to 4, as OpenAI takes it; held as a list, so an error names `stop` itself, not a union member.
Stop = Annotated[Annotated[list[str], Field(max_length=4)] | None, BeforeValidator(_listed)]
Penalty = Annotated[float, Field(ge=-2, le=2)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    include_obfuscation: bool = True  # padding against length side channels: nothing to pad on a local server


class _Request(BaseModel):
    """The sampling parameters both endpoints share."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: Annotated[int, Field(ge=1, le=2**20)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: (
        Annotated[int, Field(ge=-1, le=2**24, description="vLLM's extra-body top_k; 0 and -1 keep every token.")] | None
    ) = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    n: Annotated[int, Field(ge=1, le=8)] | None = None  # None: 1 (clients may send any of these as null)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Stop = Field(
        None, description="Up to 4 strings: the reply ends before the first one generated, which is not included."
    )
    # torch seeds its generator with a 64-bit integer: a larger seed was a 500 (OverflowError) deep in sampling.
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    logit_bias: dict[str, float] | None = None  # token id -> bias, checked against the vocabulary by the engine
    logprobs: Annotated[Any, only(None, False, 0)] = None  # chat: a bool; completions: an int (0 returns none)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Annotated[str, only("text")]  # images, audio and files are OpenAI's too, but not this engine's
    text: str


def _parts(value: Any) -> Any:
    return [{"type": "text", "text": value}] if isinstance(value, str) else value


# A string or a list of parts, held as parts: an error then names the part (`messages[0].content[1].type`).
Content = Annotated[list[TextPart] | None, BeforeValidator(_parts)]


class ChatMessage(BaseModel):
    """A message as clients send it back, with the fields of OpenAI's reply at their empty values."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = None
    name: str | None = None
    tool_call_id: str | None = None  # a tool message's: the template renders its content like any other
    tool_calls: Annotated[list[Any] | None, Empty] = None
    function_call: Annotated[Any, only(None)] = None
    refusal: Annotated[str | None, only(None)] = None
    audio: Annotated[Any, only(None)] = None
    annotations: Annotated[list[Any] | None, Empty] = None

    def text(self) -> str:
        return "".join(part.text for part in self.content or ())


class ChatCompletionRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    top_logprobs: Annotated[int | None, only(None, 0)] = None
    response_format: Annotated[dict[str, Any] | None, only(None, {"type": "text"})] = None
    tools: Annotated[list[Any] | None, Empty] = None
    tool_choice: Annotated[Any, only(None, "none", "auto")] = None  # without tools, "auto" calls none
    parallel_tool_calls: bool | None = None  # without tools there is nothing to call in parallel
    functions: Annotated[list[Any] | None, Empty] = None
    function_call: Annotated[Any, only(None, "none", "auto")] = None
    modalities: Annotated[list[str] | None, only(None, ["text"])] = None
    audio: Annotated[Any, only(None)] = None
    prediction: Annotated[Any, only(None)] = None
    reasoning_effort: Annotated[Any, only(None)] = None
    verbosity: Annotated[Any, only(None)] = None
    web_search_options: Annotated[Any, only(None)] = None
    store: Annotated[bool | None, only(None, False)] = None
    metadata: dict[str, str] | None = None  # kept by OpenAI only with store: true
    service_tier: Annotated[str | None, only(None, "auto", "default")] = None
    prompt_cache_key: str | None = None  # a caching hint: the answer is the same either way
    safety_identifier: str | None = None

    def completion_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    echo: Annotated[bool | None, only(None, False)] = None
    best_of: Annotated[int | None, only(None, 1)] = None
    suffix: Annotated[str | None, only(None)] = None

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def completion_budget(self) -> int | None:
        return self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class Completion(BaseModel):
    """Both the whole answer and a streamed chunk: OpenAI uses one shape, `text_completion`, for either."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tunelab"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
