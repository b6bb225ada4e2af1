"""Which model a chat names, and a small cache of loaded models: the tenancy on top of the serving engine
(`tunelab.serving`), which does the rest. Base models are shared; fine-tuned and checkpoint models belong to their
project. Loading lives in `generation.py` (torch), imported on first use so the API starts in a second."""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.job_service.artefacts import Artefacts
from tunelab.job_service.errors import not_found
from tunelab.job_service.settings import ServiceSettings
from tunelab.job_service.store import Store
from tunelab.layout import RunLayout

if TYPE_CHECKING:
    from tunelab.serving.engines import ServedModel, TorchEngine


@dataclass(frozen=True)
class Target:
    """What a model name loads: a base model, a fine-tuned folder (merged or adapter), or a checkpoint."""

    name: str
    base: str
    folder: Path | None = None
    merged: bool = False
    checkpoint: Path | None = None
    spec: dict[str, Any] | None = None


def find_target(settings: ServiceSettings, store: Store, project_id: str, name: str) -> Target:
    """Base models are shared; fine-tuned and checkpoint models belong to their project (others get a 404)."""
    bases = settings.base_models()
    if name in bases:
        return Target(name, bases[name])
    model = store.models.get(project_id, name)
    if model is not None:
        job = store.jobs.by_id(model.job_id)
        assert job is not None  # a model row is written in the same transaction as its job's success
        folder = Artefacts.of(settings).local(Path(model.path))  # from the bucket when this node has no copy
        merged = folder == RunLayout(folder.parent).merged
        return Target(name, job.spec["model"]["name"], folder, merged=merged)
    checkpoint = store.models.checkpoint(project_id, name)
    if checkpoint is not None:
        job = store.jobs.by_id(checkpoint.job_id)
        assert job is not None
        path = Artefacts.of(settings).local(Path(checkpoint.path))
        return Target(name, job.spec["model"]["name"], checkpoint=path, spec=job.spec)
    raise not_found("model", name, "model")


class ChatModels:
    """Loaded models, least recently used first out: loading takes seconds, generating a reply less.

    Loading and generating all run on one thread (`executor`). torch's OpenMP pool belongs to the thread that
    calls it: calls from many request threads create one spinning pool each, and on a busy 2-core machine replies
    were measured 10x slower that way. One generation at a time also matches the CPU: more would only share it.
    """

    def __init__(self, capacity: int, threads: int) -> None:
        self.capacity, self.threads = capacity, threads
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat-generate")
        self._cache: OrderedDict[str, TorchEngine] = OrderedDict()  # by model name: names are never reused
        self._lock = threading.Lock()

    def get(self, target: Target) -> ServedModel:
        with self._lock:
            if target.name not in self._cache:
                from tunelab.job_service.generation import load

                self._cache[target.name] = load(target, self.threads)
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(target.name)
            return self._cache[target.name].served(target.name)

    def forget(self, name: str) -> None:
        with self._lock:
            self._cache.pop(name, None)
