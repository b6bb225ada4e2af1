"""Fine-tuning methods, registered by name (as PEFT registers its own).

A method turns a loaded base model into the model the loop trains. Each is a small function in a family module
(`full`, `peft_methods`, `qlora`) that registers itself in `tunelab.methods.registry`; importing this package
imports every family, so the registry is complete once `tunelab.methods` is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tunelab.methods import full, peft_methods, qlora
from tunelab.methods.registry import (
    MethodInfo,
    foreign_settings,
    get_method,
    method_names,
    methods_taking,
    register_method,
)

if TYPE_CHECKING:
    from tunelab.config import MethodSpec


def apply_method(model: torch.nn.Module, spec: MethodSpec) -> torch.nn.Module:
    """Wrap (or unfreeze) `model` for training with the method `spec.name`."""
    return get_method(spec.name).build(model, spec)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; PEFT's virtual-token embeddings count as trainable."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


__all__ = [
    "MethodInfo",
    "apply_method",
    "count_parameters",
    "foreign_settings",
    "full",
    "get_method",
    "method_names",
    "methods_taking",
    "peft_methods",
    "qlora",
    "register_method",
]
