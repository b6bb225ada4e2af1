"""What the servers generate with: a PyTorch base model with many adapters (or none: one loaded model, as the job
service keeps each fine-tuned model), or one ONNX export. A request's model comes out as a `ServedModel`.

PyTorch requests run concurrently and share forward passes: the engine's `BatchScheduler` (serving/batching.py)
runs the decode steps of all running requests as one batch (one per adapter, unless PEFT can mix them: LoRA), and
lets requests join and leave between steps. Each forward pass holds the engine's lock: PEFT's adapter switch and
the model are shared state. ONNX requests are not batched: they take turns one token at a time, each step holding
the engine's lock; each has its own generator, so each can have its own adapter active.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from tunelab.errors import TunelabError
from tunelab.export.onnx import OnnxDecoder, OnnxModel
from tunelab.export.onnx_adapters import convert_for_serving, serving_cache
from tunelab.models import load_model, load_tokenizer, resolve
from tunelab.serving.adapters import AdapterRegistry, check_adapters
from tunelab.serving.batching import BatchScheduler, Slot
from tunelab.serving.generation import Decoder


class UnknownModel(LookupError):
    """A request named a model this server does not have."""


@dataclass(frozen=True)
class ServedModel:
    """One model as a request uses it: its tokenizer (template and counting), its context length (None: its config
    does not say), the tokens that end its turn, and `open(max_length)`, a decoder for one request."""

    tokenizer: PreTrainedTokenizerBase
    context_length: int | None
    eos_ids: set[int]
    open: Callable[[int], Decoder]


class Engine(Protocol):
    @property
    def model_ids(self) -> list[str]: ...

    def served(self, model_id: str) -> ServedModel:
        """`model_id` ready for requests; raises UnknownModel."""
        ...


class TorchEngine:
    """One base model in memory, adapters loaded on demand (PEFT multi-adapter), a bounded number kept."""

    def __init__(
        self,
        base_id: str,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        adapters: Mapping[str, Path] | None = None,
        max_adapters: int = 4,
        max_batch: int = 16,
    ) -> None:
        adapters = adapters or {}
        if base_id in adapters:
            raise TunelabError(f"adapter name {base_id!r} is the base model's name: choose another")
        check_adapters(adapters)
        self.base_id, self.tokenizer = base_id, tokenizer
        self.registry = AdapterRegistry(model.eval(), adapters, max_adapters)
        self.lock = threading.Lock()
        self.scheduler = BatchScheduler(self.registry, self.lock, max_batch)
        self.context_length, self.eos_ids = _context_length(model), _eos_ids(model, tokenizer)

    @property
    def model_ids(self) -> list[str]:
        return [self.base_id, *self.registry.paths]

    def served(self, model_id: str) -> ServedModel:
        if model_id != self.base_id and model_id not in self.registry.paths:
            raise UnknownModel(model_id)
        adapter = None if model_id == self.base_id else model_id
        return ServedModel(self.tokenizer, self.context_length, self.eos_ids, lambda _: TorchDecoder(self, adapter))


class TorchDecoder:
    """One request on the shared model. Its adapter is taken on the first step, not when the request opens:
    a stream that a client drops before it starts then never holds an adapter in memory."""

    def __init__(self, engine: TorchEngine, adapter: str | None) -> None:
        self.engine, self.slot = engine, Slot(adapter)  # the slot holds this request's own KV cache
        self.holds_adapter = False

    def feed(self, tokens: Sequence[int]) -> torch.Tensor:
        adapter = self.slot.adapter
        if adapter is not None and not self.holds_adapter:
            with self.engine.lock:
                self.engine.registry.acquire(adapter)
            self.holds_adapter = True
        return self.engine.scheduler.feed(self.slot, tokens)

    def close(self) -> None:
        self.slot.cache = None
        self.engine.scheduler.leave(self.slot)
        if self.holds_adapter:
            with self.engine.lock:
                self.engine.registry.release(str(self.slot.adapter))
            self.holds_adapter = False


class OnnxEngine:
    """One ONNX export: a merged model, or a base with LoRA slots and the adapters it was exported with or was
    given (`tunelab export onnx --runtime-adapter`), each request running with its own adapter active."""

    def __init__(self, base_id: str, model: OnnxModel, adapters: Mapping[str, Path] | None = None) -> None:
        self.base_id, self.model, self.tokenizer = base_id, model, model.tokenizer
        self.lock = threading.Lock()
        if adapters:
            _add_onnx_adapters(model, base_id, adapters)

    @property
    def model_ids(self) -> list[str]:
        return [self.base_id, *self.model.adapters]

    def served(self, model_id: str) -> ServedModel:
        if model_id != self.base_id and model_id not in self.model.adapters:
            raise UnknownModel(model_id)
        adapter = None if model_id == self.base_id else model_id
        open_ = partial(self._open, adapter=adapter)
        return ServedModel(self.tokenizer, self.model.context_length, self.model.eos_ids, open_)

    def _open(self, max_length: int, adapter: str | None) -> Decoder:
        with self.lock:
            return LockedDecoder(self.model.decoder(max_length, adapter), self.lock)


def _add_onnx_adapters(model: OnnxModel, base_id: str, adapters: Mapping[str, Path]) -> None:
    """`--adapter NAME=PATH` on an ONNX base: an .onnx_adapter file, or a PEFT LoRA folder converted on the spot."""
    slots = model.slots
    if not slots:
        raise TunelabError(
            f"{model.folder} is a merged export without LoRA slots: export the base with "
            "`tunelab export onnx --runtime-adapter NAME=PATH` to switch adapters at run time"
        )
    cache = serving_cache()
    for name, path in adapters.items():
        if name == base_id or name in model.adapters:
            raise TunelabError(f"adapter name {name!r} is taken (by the base or the export's own adapters)")
        model.add_adapter(name, convert_for_serving(name, path, slots, cache))


class LockedDecoder:
    def __init__(self, decoder: OnnxDecoder, lock: threading.Lock) -> None:
        self.decoder, self.lock = decoder, lock

    def feed(self, tokens: Sequence[int]) -> torch.Tensor:
        with self.lock:
            return self.decoder.feed(tokens)

    def close(self) -> None:
        with self.lock:
            self.decoder.close()


def build_engine(
    model: str = "embedded",
    adapters: Mapping[str, Path] | None = None,
    onnx: Path | None = None,
    max_adapters: int = 4,
    name: str | None = None,
    threads: int | None = None,
    max_batch: int = 16,
) -> Engine:
    """The engine `tunelab serve` runs: `name` is the model id the base answers to (default: as given)."""
    if onnx is not None:
        return OnnxEngine(name or str(onnx), OnnxModel(onnx, threads), adapters)
    source = resolve(model)
    loaded, tokenizer = load_model(source), load_tokenizer(source)
    return TorchEngine(name or model, loaded, tokenizer, adapters or {}, max_adapters, max_batch)


def _eos_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    # Chat models often end a turn with a token the tokenizer does not call EOS: generation_config lists them.
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return {int(i) for i in [*ids, tokenizer.eos_token_id] if i is not None}


def _context_length(model: torch.nn.Module) -> int | None:
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None
