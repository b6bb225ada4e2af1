"""Fine-tuning methods, registered by name (as PEFT registers its own).

A method turns a loaded base model into the model the loop trains. Each is a small function; the registry holds
what the rest of the system needs to know about it (can it merge? does it prepend virtual tokens?).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tunelab.errors import ConfigError, Problem

if TYPE_CHECKING:
    from tunelab.config import MethodSpec


Builder = Callable[[torch.nn.Module, "MethodSpec"], torch.nn.Module]


@dataclass(frozen=True)
class MethodInfo:
    name: str
    build: Builder
    description: str
    mergeable: bool = True  # can the update be folded into the base weights?
    prompt_learning: bool = False  # prepends virtual tokens: packing does not apply
    peft: bool = True  # False: the model itself is trained and saved (full fine-tuning)
    quantized: bool = False  # the base is quantised while loading (QLoRA)


_REGISTRY: dict[str, MethodInfo] = {}


def register_method(info: MethodInfo) -> None:
    if info.name in _REGISTRY:
        raise ValueError(f"method {info.name!r} is registered twice")
    _REGISTRY[info.name] = info


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodInfo:
    if name not in _REGISTRY:
        raise ConfigError([Problem("method.name", f"unknown method {name!r}", f"valid: {', '.join(method_names())}")])
    return _REGISTRY[name]


def apply_method(model: torch.nn.Module, spec: MethodSpec) -> torch.nn.Module:
    """Wrap (or unfreeze) `model` for training with the method `spec.name`."""
    return get_method(spec.name).build(model, spec)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; PEFT's virtual-token embeddings count as trainable."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# Importing the families registers them.
from tunelab.methods import full, peft_methods, qlora  # noqa: E402

__all__ = [
    "MethodInfo",
    "apply_method",
    "count_parameters",
    "full",
    "get_method",
    "method_names",
    "peft_methods",
    "qlora",
    "register_method",
]
