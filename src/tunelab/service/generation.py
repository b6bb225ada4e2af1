"""Loading a chat model (base, fine-tuned, or a checkpoint rebuilt on its base) and generating replies, greedy or
sampled, with tunelab's own prompt rules; streaming yields text pieces as they are generated."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase, TextIteratorStreamer

from tunelab.config import JobSpec
from tunelab.data.render import encode_prompt
from tunelab.errors import TunelabError
from tunelab.inference import chat_prompt, load_for_inference
from tunelab.methods import apply_method
from tunelab.models import load_model, load_tokenizer, resolve
from tunelab.service.chat import Completion, Target
from tunelab.service.errors import ApiError
from tunelab.service.schemas import ChatMessage, ChatRequest

DEFAULT_MAX_TOKENS = 256
MAX_TOKENS = 2048


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    lock: threading.Lock = field(default_factory=threading.Lock)


def load(target: Target, threads: int) -> Loaded:
    torch.set_num_threads(threads)  # for the whole API process: see ServiceSettings.threads_per_process
    try:
        if target.checkpoint is not None:
            return _load_checkpoint(target)
        if target.merged and target.folder is not None:
            model, tokenizer = load_for_inference(str(target.folder))
        else:
            model, tokenizer = load_for_inference(target.base, target.folder)
    except (TunelabError, OSError) as exc:
        raise ApiError(500, "model_load_failed", f"Model {target.name} could not be loaded: {exc}", "model") from exc
    return Loaded(model, tokenizer)


def _load_checkpoint(target: Target) -> Loaded:
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
    return Loaded(model.eval(), load_tokenizer(source))


def _text(message: ChatMessage) -> str:
    if isinstance(message.content, list):  # content parts: only text is understood here
        return "".join(str(part.get("text", "")) for part in message.content if part.get("type") == "text")
    return message.content or ""


def _prompt_ids(loaded: Loaded, req: ChatRequest) -> torch.Tensor:
    # "developer" is OpenAI's newer name for the system role; chat templates only know "system".
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m)} for m in req.messages]
    try:
        prompt = chat_prompt(loaded.tokenizer, messages)
    except Exception as exc:  # the model's template rejects this conversation (e.g. a role it does not know)
        message = f"The model's chat template refused the messages: {exc}"
        raise ApiError(400, "invalid_messages", message, "messages") from exc
    return torch.tensor([encode_prompt(prompt, loaded.tokenizer)])


def _generate_kwargs(loaded: Loaded, req: ChatRequest, ids: torch.Tensor) -> dict[str, Any]:
    max_new = min(req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS, MAX_TOKENS)
    temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default samples at 1.0
    sampled = temperature > 0
    kwargs: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": max_new,
        "do_sample": sampled,
        "pad_token_id": loaded.tokenizer.pad_token_id,
        "eos_token_id": loaded.tokenizer.eos_token_id,
    }
    if sampled:
        kwargs.update(temperature=temperature, top_p=req.top_p if req.top_p is not None else 1.0, top_k=0)
    return kwargs


def complete(loaded: Loaded, req: ChatRequest) -> Completion:
    ids = _prompt_ids(loaded, req)
    kwargs = _generate_kwargs(loaded, req, ids)
    with loaded.lock, torch.no_grad():
        if req.seed is not None:
            torch.manual_seed(req.seed)
        out = loaded.model.generate(**kwargs)  # type: ignore[operator]
    new = out[0, ids.shape[1] :].tolist()
    return _completion(loaded, ids, new, kwargs["max_new_tokens"])


def stream(loaded: Loaded, req: ChatRequest, executor: Executor) -> Iterator[str | Completion]:
    """Text pieces as they are generated (on `executor`), then the Completion (counts and finish reason)."""
    ids = _prompt_ids(loaded, req)
    kwargs = _generate_kwargs(loaded, req, ids)
    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict[str, Any] = {}

    def run() -> None:
        with loaded.lock, torch.no_grad():
            if req.seed is not None:
                torch.manual_seed(req.seed)
            try:
                result["out"] = loaded.model.generate(**kwargs, streamer=streamer)  # type: ignore[operator]
            except Exception as exc:  # surfaced to the client after the stream ends
                result["error"] = exc
                streamer.end()

    running = executor.submit(run)
    yield from (piece for piece in streamer if piece)
    running.result()
    if "error" in result:
        raise result["error"]
    yield _completion(loaded, ids, result["out"][0, ids.shape[1] :].tolist(), kwargs["max_new_tokens"])


def _completion(loaded: Loaded, ids: torch.Tensor, new: list[int], max_new: int) -> Completion:
    eos = loaded.tokenizer.eos_token_id
    stopped = bool(new) and new[-1] == eos
    text = str(loaded.tokenizer.decode(new, skip_special_tokens=True))
    finish = "length" if len(new) >= max_new and not stopped else "stop"
    return Completion(text, int(ids.shape[1]), len(new), finish)
