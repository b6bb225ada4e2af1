"""Loading a chat model (base, fine-tuned, or a checkpoint rebuilt on its base) into the serving engine, and a
stream of server-sent events produced on the chat thread and read from the API's event loop.

Everything else a chat does (schema, template, budget, sampling, stop strings, chunks, errors) is the serving
engine's (`tunelab.serving`), the same as `tunelab serve`'s.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Executor

import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from tunelab.config import JobSpec
from tunelab.errors import TunelabError
from tunelab.inference import load_for_inference
from tunelab.job_service.chat import Target
from tunelab.job_service.errors import ApiError
from tunelab.layout import CheckpointLayout
from tunelab.methods import apply_method
from tunelab.models import load_model, load_tokenizer, resolve
from tunelab.serving.engines import TorchEngine


def load(target: Target, threads: int) -> TorchEngine:
    """The target's model alone on an engine (no adapters to switch: each fine-tuned model is its own)."""
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
    return TorchEngine(target.name, model, tokenizer)


def _load_checkpoint(target: Target) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A training checkpoint holds only the trainable weights: rebuild the job's method on its base, then load them."""
    assert target.checkpoint is not None and target.spec is not None  # find_target sets both for a checkpoint
    spec = JobSpec.model_validate(target.spec)
    source = resolve(spec.model.name, spec.model.gguf_file)
    model = apply_method(load_model(source), spec.method)
    weights = load_file(str(CheckpointLayout(target.checkpoint).trainable))
    params = dict(model.named_parameters())
    missing = set(weights) - set(params)
    if missing:
        unknown = f"{len(missing)} unknown weights"
        raise TunelabError(f"checkpoint {target.checkpoint} does not fit its job's method ({unknown})")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    return model.eval(), load_tokenizer(source)


_END = object()


class Stream:
    """Events made on `executor` (the chat thread), read one by one from other threads, then None. `cancel` (the
    client went away) stops the generation after the next token, freeing the chat thread."""

    def __init__(self, events: Iterator[str], executor: Executor) -> None:
        self._pieces: queue.Queue[object] = queue.Queue()
        self._cancelled = threading.Event()
        self._done = False
        executor.submit(self._produce, events)

    def _produce(self, events: Iterator[str]) -> None:
        try:
            for event in events:
                if self._cancelled.is_set():
                    break
                self._pieces.put(event)
        finally:
            getattr(events, "close", lambda: None)()  # a generator: closing it frees the request's KV cache now
            self._pieces.put(_END)

    def next_event(self) -> str | None:
        if self._done:
            return None
        piece = self._pieces.get()
        if isinstance(piece, str):
            return piece
        self._done = True
        return None

    def cancel(self) -> None:
        self._cancelled.set()
