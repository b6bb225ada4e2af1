"""The method registry: what the rest of the system needs to know about each fine-tuning method, by name.

It imports no method family, so a family registers itself here without importing the package that imports it
(PEFT's `register_peft_method` has the same shape). `tunelab.methods` imports every family, which fills it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunelab.errors import ConfigError, Problem

if TYPE_CHECKING:
    import torch

    from tunelab.config import MethodSpec


Builder = Callable[["torch.nn.Module", "MethodSpec"], "torch.nn.Module"]

# The `method:` settings each family reads; a setting given to a method that does not read it is an error, so a
# value never looks applied when it is not (e.g. `bits` on lora trains no quantised base).
LORA_SETTINGS = frozenset({"r", "alpha", "dropout", "target_modules"})
VIRTUAL_TOKEN_SETTINGS = frozenset({"num_virtual_tokens"})


@dataclass(frozen=True)
class MethodInfo:
    name: str
    build: Builder
    description: str
    settings: frozenset[str] = LORA_SETTINGS  # the MethodSpec fields (besides `name`) the builder reads
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


def method_settings(name: str) -> frozenset[str] | None:
    """The settings method `name` reads (besides its name); None for an unknown name."""
    info = _REGISTRY.get(name)
    return info.settings if info else None


def methods_taking(setting: str) -> list[str]:
    """The methods that read `setting`, for the hint of an error that names a setting the chosen method ignores."""
    return [name for name in method_names() if setting in _REGISTRY[name].settings]


def foreign_settings(name: str, given: set[str]) -> list[Problem]:
    """A problem for each setting in `given` that method `name` does not read (none for an unknown method: its
    name is the problem, reported with the valid names)."""
    info = _REGISTRY.get(name)
    if info is None:
        return []
    return [
        Problem(f"method.{setting}", f"not a setting of {name}", _takers_hint(setting))
        for setting in sorted(given - info.settings - {"name"})
    ]


def _takers_hint(setting: str) -> str:
    takers = methods_taking(setting)
    if not takers:
        return "no method takes it; remove it"
    verb = "takes" if len(takers) == 1 else "take"
    return f"{', '.join(takers)} {verb} it; remove it or change method.name"
