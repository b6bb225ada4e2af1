"""Full fine-tuning: every weight trains; the 'adapter' is the whole model."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tunelab.methods.registry import MethodInfo, register_method

if TYPE_CHECKING:
    from tunelab.config import MethodSpec


def _full(model: torch.nn.Module, spec: MethodSpec) -> torch.nn.Module:
    model.requires_grad_(True)
    return model


register_method(
    MethodInfo("full", _full, "every weight of the model trains", settings=frozenset(), mergeable=True, peft=False)
)
