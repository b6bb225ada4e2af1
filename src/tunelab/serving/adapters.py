"""The adapters a server knows, and the few it keeps loaded on its one shared copy of the base model.

PEFT keeps several adapters on one base and switches with `set_adapter`, which rewrites module state: the caller
holds the engine's lock around every method here and around the forward pass that follows `activate`.
"""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from tunelab.errors import TunelabError

# Prompt-learning adapters change the input sequence itself (virtual tokens), which a KV-cached, step-by-step
# decoder shared with other adapters cannot do: they are served merged or one per process instead.
UNSERVABLE = {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT"}
_UNKNOWN = object()  # "which adapter is active" after PEFT changed it on its own (load or delete)


def check_adapters(adapters: Mapping[str, Path]) -> None:
    """Refuse, before anything loads, adapters that cannot share one base model."""
    kinds: dict[str, str] = {}
    for name, path in adapters.items():
        config_file = path / "adapter_config.json"
        if not config_file.is_file():
            raise TunelabError(f"adapter {name!r}: {path} is not a PEFT adapter folder (no adapter_config.json)")
        kind = str(json.loads(config_file.read_text(encoding="utf-8")).get("peft_type", "?"))
        if kind in UNSERVABLE:
            raise TunelabError(f"adapter {name!r} is {kind}, which cannot share a base: serve its merged model")
        kinds[name] = kind
    if len(set(kinds.values())) > 1:
        found = ", ".join(f"{n}={k}" for n, k in kinds.items())
        raise TunelabError(f"adapters of different kinds cannot share one base model ({found}): serve them apart")


class AdapterRegistry:
    """Loads adapters on demand and evicts the least recently used idle one beyond `max_loaded`.

    An adapter in use by a running request is never evicted, so the bound can be exceeded while more
    different adapters than `max_loaded` are generating at the same moment.
    """

    def __init__(self, base: torch.nn.Module, paths: Mapping[str, Path], max_loaded: int) -> None:
        if max_loaded < 1:
            raise TunelabError("--max-adapters must be at least 1")
        self.base, self.paths, self.max_loaded = base, dict(paths), max_loaded
        self.peft: PeftModel | None = None
        self.loaded: OrderedDict[str, int] = OrderedDict()  # name -> running requests; least recently used first
        self._active: object = _UNKNOWN
        self.loads = 0  # how many times an adapter was read from disk (tests check the LRU with it)

    def acquire(self, name: str) -> None:
        if name not in self.loaded:
            self._load(name)
        self.loaded[name] += 1
        self.loaded.move_to_end(name)
        self._evict()

    def release(self, name: str) -> None:
        self.loaded[name] -= 1
        self._evict()

    def activate(self, name: str | None) -> torch.nn.Module:
        """The module to call for `name` (None: the bare base model), switched to it if needed."""
        if self.peft is None:
            return self.base
        if name != self._active:
            tuner: Any = self.peft.base_model  # PEFT types it loosely; it is the LoRA/IA3/... tuner model
            if name is None:
                tuner.disable_adapter_layers()
            else:
                tuner.enable_adapter_layers()
                self.peft.set_adapter(name, inference_mode=True)
            self._active = name
        return self.peft

    def mixable(self) -> bool:
        """Whether one forward can serve rows of different adapters (PEFT's `adapter_names=`): plain LoRA can, DoRA
        and the other kinds cannot."""
        return self.peft is not None and all(_mixable(config) for config in self.peft.peft_config.values())

    def mixed(self) -> torch.nn.Module:
        """The module for a forward with `adapter_names=` (one name a row, "__base__" for the bare base)."""
        assert self.peft is not None
        tuner: Any = self.peft.base_model
        tuner.enable_adapter_layers()  # disabled layers would ignore adapter_names and answer as the base
        self._active = _UNKNOWN  # activate() sets the adapter again for its next plain forward
        return self.peft

    def _load(self, name: str) -> None:
        path = str(self.paths[name])
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
        else:
            self.peft.load_adapter(path, adapter_name=name)
        self.loaded[name] = 0
        self.loads += 1
        self._active = _UNKNOWN

    def _evict(self) -> None:
        idle = [name for name, users in self.loaded.items() if users == 0]
        while len(self.loaded) > self.max_loaded and idle:
            victim = idle.pop(0)
            assert self.peft is not None
            with warnings.catch_warnings():  # "the active adapter was deleted": expected, activate() resets it
                warnings.simplefilter("ignore", UserWarning)
                self.peft.delete_adapter(victim)
            del self.loaded[victim]
            self._active = _UNKNOWN


def _mixable(config: Any) -> bool:
    return getattr(config, "peft_type", None) == "LORA" and not getattr(config, "use_dora", False)
