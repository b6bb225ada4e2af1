"""Continuous batching for the PyTorch engine: concurrent requests share forward passes.

Each request keeps its own thread, its own KV cache and its own sampling (seed, penalties, stop strings:
`generation.TextGeneration`); only the forward pass is shared. A request's thread hands its step (the tokens to
feed) to the engine's `BatchScheduler` and waits for its logits. The scheduler thread gathers the steps waiting,
waiting briefly until every running request has sent its next one, then runs:

- a prompt (several tokens, no cache yet) alone: prompts differ in length, and a padded prompt would put
  fully masked rows into attention;
- the one-token decode steps together: the requests' caches left-padded to the longest, the padding masked out,
  each new token at its own position. Requests on different LoRA adapters (and the base) share one forward through
  PEFT's mixed batches (`adapter_names=`, one adapter a row); other adapter kinds get one forward per adapter.
  Afterwards each request keeps its slice of the batch's cache, so a request can join or leave between any two
  steps (continuous batching).

A padded row computes what the request alone would, up to float rounding in a matmul of another shape: greedy
answers stay the same (tests/test_serve.py checks it), sampled ones are drawn from the same distribution.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from tunelab.serving.adapters import AdapterRegistry


@dataclass(eq=False)
class Slot:
    """One request's state on the model: its adapter and its KV cache (None before its prompt)."""

    adapter: str | None
    cache: Cache | None = None


@dataclass(eq=False)
class Step:
    slot: Slot
    tokens: list[int]
    done: threading.Event = field(default_factory=threading.Event)
    logits: torch.Tensor | None = None
    error: BaseException | None = None

    @property
    def batchable(self) -> bool:
        return len(self.tokens) == 1 and self.slot.cache is not None and _plain(self.slot.cache)


class BatchScheduler:
    """The engine's one forward-pass thread. It ends once no request has run or waited for `idle_s`, so an engine
    that nobody uses (or that the job service dropped) holds no thread."""

    def __init__(
        self, registry: AdapterRegistry, lock: threading.Lock, max_batch: int = 16, gather_s: float = 0.005
    ) -> None:
        self.registry, self.lock = registry, lock  # the registry is used with the lock held
        self.max_batch = max_batch  # 1: every step alone, as before batching
        self.gather_s = gather_s  # how long a step waits for the other running requests' next steps
        # An idle thread lingers before it ends: torch's OpenMP pool belongs to the thread that calls the model, and a
        # new thread for every burst of requests would build a new pool each time.
        self.idle_s = 30.0
        self.cond = threading.Condition()
        self.pending: list[Step] = []
        self.running: set[Slot] = set()  # requests past their first step and not closed
        self.thread: threading.Thread | None = None
        self.batches = 0  # forward passes of more than one request (tests check batching happened)
        self.mixed_batches = 0  # of which over rows of different adapters

    def feed(self, slot: Slot, tokens: Sequence[int]) -> torch.Tensor:
        """Blocks until `tokens` went through the model after `slot`'s cache; the next-token logits (1-D)."""
        step = Step(slot, list(tokens))
        with self.cond:
            self.running.add(slot)
            self.pending.append(step)
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="tunelab-batch", daemon=True)
                self.thread.start()
            self.cond.notify_all()
        step.done.wait()
        if step.error is not None:
            raise step.error
        assert step.logits is not None
        return step.logits

    def leave(self, slot: Slot) -> None:
        """`slot`'s request is finished (or its client left): steps no longer wait for it."""
        with self.cond:
            self.running.discard(slot)
            self.cond.notify_all()

    def _loop(self) -> None:
        while (steps := self._gather()) is not None:
            with self.lock:
                mixable = self.registry.mixable()
            for group in _groups(steps, self.max_batch, mixable):
                self._run(group)

    def _gather(self) -> list[Step] | None:
        """The steps to run now, or None (the thread ends) when no request is running or waiting."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.pending, timeout=self.idle_s):
                if not self.running:
                    self.thread = None
                    return None
                return []
            # Give the other running requests a moment to send their next step, so that it joins this batch.
            deadline = time.monotonic() + self.gather_s
            while len(self.pending) < len(self.running) and (left := deadline - time.monotonic()) > 0:
                self.cond.wait(left)
            steps, self.pending = self.pending, []
            return steps

    def _run(self, steps: list[Step]) -> None:
        try:
            adapters = [step.slot.adapter for step in steps]
            with self.lock, torch.inference_mode():
                if len(set(adapters)) > 1:  # LoRA adapters mixed in one batch, each row its own
                    names = [name or "__base__" for name in adapters]
                    logits = _forward_batch(self.registry.mixed(), steps, names)
                else:
                    model = self.registry.activate(adapters[0])
                    logits = _forward_one(model, steps[0]) if len(steps) == 1 else _forward_batch(model, steps)
            if len(steps) > 1:
                self.batches += 1
                self.mixed_batches += len(set(adapters)) > 1
            for step, row in zip(steps, logits, strict=True):
                step.logits = row
        except Exception as exc:  # the requests in this pass fail; the scheduler goes on with the others
            for step in steps:
                step.error = exc
        for step in steps:
            step.done.set()


def _groups(steps: list[Step], max_batch: int, mixable: bool) -> list[list[Step]]:
    """Prompts one by one, first (a new request's first token soonest); then the decode steps in batches of at most
    `max_batch`: all together when the adapters can be mixed in one batch, else one adapter a batch."""
    alone = [[s] for s in steps if not s.batchable]
    by_adapter: dict[str | None, list[Step]] = defaultdict(list)
    for step in steps:
        if step.batchable:
            by_adapter[None if mixable else step.slot.adapter].append(step)
    batches = [group[i : i + max_batch] for group in by_adapter.values() for i in range(0, len(group), max_batch)]
    return alone + batches


def _forward_one(model: torch.nn.Module, step: Step) -> list[torch.Tensor]:
    # logits_to_keep=1: only the next token's logits; the whole prompt's would cost a vocab-sized matmul each.
    ids = torch.tensor([step.tokens])
    out = model(input_ids=ids, past_key_values=step.slot.cache, use_cache=True, logits_to_keep=1)
    step.slot.cache = out.past_key_values
    return [out.logits[0, -1].float()]


def _forward_batch(
    model: torch.nn.Module, steps: list[Step], adapter_names: list[str] | None = None
) -> list[torch.Tensor]:
    """One decode step for several requests: their caches left-padded to the longest, the padding masked.
    `adapter_names`: each row's adapter, for a PEFT model serving several in one batch."""
    caches = [_kv(step.slot.cache) for step in steps]  # per request, per layer: (keys, values), [1, heads, len, dim]
    lengths = [layers[0][0].shape[2] for layers in caches]
    longest = max(lengths)
    padded = [_pad([layers[i] for layers in caches], lengths, longest) for i in range(len(caches[0]))]
    mask = torch.zeros(len(steps), longest + 1, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, longest - length :] = 1
    out = model(
        input_ids=torch.tensor([step.tokens for step in steps]),
        attention_mask=mask,
        position_ids=torch.tensor([[length] for length in lengths]),  # each token where it is in its own sequence
        past_key_values=_cache_of(padded),
        use_cache=True,
        logits_to_keep=1,
        **({} if adapter_names is None else {"adapter_names": adapter_names}),
    )
    merged = _kv(out.past_key_values)
    for row, (step, length) in enumerate(zip(steps, lengths, strict=True)):
        start = longest - length  # this request's own columns: the padding stays behind
        step.slot.cache = _cache_of([(k[row : row + 1, :, start:], v[row : row + 1, :, start:]) for k, v in merged])
    return list(out.logits[:, -1].float())


def _pad(
    layers: list[tuple[torch.Tensor, torch.Tensor]], lengths: list[int], longest: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's keys and values of several requests, left-padded with zeros (masked, so never attended)."""
    keys, values = layers[0]
    padded_keys = keys.new_zeros((len(layers), keys.shape[1], longest, keys.shape[3]))
    padded_values = values.new_zeros((len(layers), values.shape[1], longest, values.shape[3]))
    for row, ((k, v), length) in enumerate(zip(layers, lengths, strict=True)):
        padded_keys[row, :, longest - length :] = k[0]
        padded_values[row, :, longest - length :] = v[0]
    return padded_keys, padded_values


def _kv(cache: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A plain cache's tensors, layer by layer."""
    assert isinstance(cache, DynamicCache)
    pairs = []
    for layer in cache.layers:
        assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
        pairs.append((layer.keys, layer.values))
    return pairs


def _cache_of(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache holding these tensors as they are (DynamicCache(ddp_cache_data=...) would copy each)."""
    layers = []
    for keys, values in kv:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        layers.append(layer)
    cache = DynamicCache()
    cache.layers = list(layers)
    return cache


def _plain(cache: Cache) -> bool:
    """Only full-attention layers can be padded and sliced: a sliding-window (or quantized, ...) cache decodes alone."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)
