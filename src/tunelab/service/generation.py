"""Loading a chat model (base, fine-tuned, or a checkpoint rebuilt on its base) and generating replies.

Generation is `tunelab serve`'s (`tunelab.serve.generation`): its sampling (greedy at temperature 0, seeded nucleus
sampling otherwise), its stop strings (up to 4; a streamed delta never ends inside a possible stop string, so no
part of one is ever sent) and its text deltas. This module adds a decoder over a loaded model, and `prepare`,
which does everything a request can fail on (the chat template, the context length) before the first token, so a
streamed request still gets a plain HTTP 400.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from tunelab.config import JobSpec
from tunelab.data.render import encode_prompt
from tunelab.errors import TunelabError
from tunelab.inference import chat_prompt, load_for_inference
from tunelab.methods import apply_method
from tunelab.models import load_model, load_tokenizer, resolve
from tunelab.serve.errors import context_too_long
from tunelab.serve.generation import Sampling, TextGeneration
from tunelab.service.chat import Completion, Target
from tunelab.service.errors import ApiError
from tunelab.service.schemas import ChatMessage, ChatRequest

DEFAULT_MAX_TOKENS = 256
MAX_TOKENS = 2048


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    eos_ids: set[int] = field(default_factory=set)
    context_length: int | None = None  # None: the model's config does not say
    lock: threading.Lock = field(default_factory=threading.Lock)


def load(target: Target, threads: int) -> Loaded:
    torch.set_num_threads(threads)  # for the whole API process: see ServiceSettings.threads_per_process
    try:
        if target.checkpoint is not None:
            model, tokenizer = _load_checkpoint(target)
        elif target.merged and target.folder is not None:
            model, tokenizer = load_for_inference(str(target.folder))
        else:
            model, tokenizer = load_for_inference(target.base, target.folder)
    except (TunelabError, OSError) as exc:
        raise ApiError(500, "model_load_failed", f"Model {target.name} could not be loaded: {exc}", "model") from exc
    return Loaded(model, tokenizer, _eos_ids(model, tokenizer), _context_length(model))


def _load_checkpoint(target: Target) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A training checkpoint holds only the trainable weights: rebuild the job's method on its base, then load them."""
    assert target.checkpoint is not None and target.spec is not None
    spec = JobSpec.model_validate(target.spec)
    source = resolve(spec.model.name, spec.model.gguf_file)
    model = apply_method(load_model(source), spec.method)
    weights = load_file(str(target.checkpoint / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = set(weights) - set(params)
    if missing:
        unknown = f"{len(missing)} unknown weights"
        raise TunelabError(f"checkpoint {target.checkpoint} does not fit its job's method ({unknown})")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    return model.eval(), load_tokenizer(source)


def _eos_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    # Chat models often end a turn with a token the tokenizer does not call EOS: generation_config lists them.
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return {int(i) for i in [*ids, tokenizer.eos_token_id] if i is not None}


def _context_length(model: torch.nn.Module) -> int | None:
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


class ModelDecoder:
    """`tunelab.serve.generation.Decoder` over a loaded model: one request's sequence, with its own KV cache."""

    def __init__(self, loaded: Loaded) -> None:
        self.loaded = loaded
        self.cache: Cache | None = None

    def feed(self, tokens: Sequence[int]) -> torch.Tensor:
        with self.loaded.lock, torch.inference_mode():
            ids = torch.tensor([list(tokens)])
            # logits_to_keep=1: only the next token's logits, not a vocab-sized row for every prompt token.
            out = self.loaded.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        return out.logits[0, -1].float()

    def close(self) -> None:
        self.cache = None


def _text(message: ChatMessage) -> str:
    if isinstance(message.content, list):  # content parts: only text is understood here
        return "".join(str(part.get("text", "")) for part in message.content if part.get("type") == "text")
    return message.content or ""


def _prompt_ids(loaded: Loaded, req: ChatRequest) -> list[int]:
    # "developer" is OpenAI's newer name for the system role; chat templates only know "system".
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m)} for m in req.messages]
    try:
        prompt = chat_prompt(loaded.tokenizer, messages)
    except Exception as exc:  # the model's template rejects this conversation (e.g. a role it does not know)
        message = f"The model's chat template refused the messages: {exc}"
        raise ApiError(400, "invalid_messages", message, "messages") from exc
    return list(encode_prompt(prompt, loaded.tokenizer))


def prepare(loaded: Loaded, req: ChatRequest) -> TextGeneration:
    """The request's generation, checked: a template that refuses the messages or a prompt and completion longer
    than the model's context is a 400 here, before any token (and before a stream starts)."""
    ids = _prompt_ids(loaded, req)
    asked = req.max_completion_tokens or req.max_tokens
    limit = loaded.context_length
    room = DEFAULT_MAX_TOKENS if limit is None else max(limit - len(ids), 1)
    budget = asked if asked is not None else min(DEFAULT_MAX_TOKENS, room)
    if limit is not None and len(ids) + budget > limit:
        error = context_too_long(limit, len(ids), budget, "messages").detail  # `tunelab serve`'s words
        raise ApiError(400, str(error.code), error.message, error.param)
    temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default samples at 1.0
    top_p = 1.0 if req.top_p is None else req.top_p
    sampling = Sampling(min(budget, MAX_TOKENS), temperature, top_p, req.seed, req.stops())
    return TextGeneration(ModelDecoder(loaded), ids, sampling, loaded.tokenizer, loaded.eos_ids)


def complete(run: TextGeneration) -> Completion:
    return _completion(run, run.text())


def _completion(run: TextGeneration, text: str) -> Completion:
    return Completion(text, len(run.prompt_ids), run.completion_tokens, run.finish_reason)


_END = object()


class Stream:
    """A generation running on `executor` (the chat thread), read piece by piece from other threads: text deltas,
    then the Completion (counts and finish reason), then None. `cancel` (the client went away) stops it after the
    next token, freeing the chat thread."""

    def __init__(self, run: TextGeneration, executor: Executor) -> None:
        self.run = run
        self._pieces: queue.Queue[Any] = queue.Queue()
        self._cancelled = threading.Event()
        self._done = False
        executor.submit(self._produce)

    def _produce(self) -> None:
        text: list[str] = []
        deltas = self.run.deltas()
        try:
            for delta in deltas:
                if self._cancelled.is_set():
                    break
                text.append(delta)
                self._pieces.put(delta)
            self._pieces.put(_completion(self.run, "".join(text)))
        except Exception as exc:  # raised to the reader, which reports it in the stream
            self._pieces.put(exc)
        finally:
            getattr(deltas, "close", lambda: None)()  # a generator: closing it frees the request's KV cache now
            self._pieces.put(_END)

    def next_piece(self) -> str | Completion | None:
        if self._done:
            return None
        piece = self._pieces.get()
        if piece is _END:
            self._done = True
            return None
        if isinstance(piece, Exception):
            self._done = True
            raise piece
        assert isinstance(piece, str | Completion)
        return piece

    def cancel(self) -> None:
        self._cancelled.set()
