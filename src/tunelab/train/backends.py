"""What differs between one process, DDP and DeepSpeed ZeRO, behind one small interface the loop calls.

The loop owns the schedule, the data and the loss normalisation; a backend owns how gradients are reduced, how the
optimizer is sharded and how its state is saved:
- `LocalBackend`: accelerate — one process, or DDP (gradients all-reduced, everything else replicated).
- `DeepSpeedBackend`: ZeRO stage 1/2/3 with optional CPU offload, optimizer and (stage 3) parameters sharded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator

from tunelab.config import DistributedSpec, TrainSpec
from tunelab.extras import optional_import
from tunelab.train.checkpoint import load_trainable_and_optimizer, save_trainable_and_optimizer
from tunelab.train.distributed import ZERO_FEATURE, World, deepspeed_config


class Backend(Protocol):
    world: World
    optimizer: torch.optim.Optimizer  # the torch optimizer the LR scheduler drives

    def forward(self, batch: dict[str, Any], num_items: float) -> Any: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self, max_grad_norm: float) -> float: ...
    def unwrapped(self) -> torch.nn.Module: ...
    def save(self, folder: Path) -> None: ...
    def load(self, folder: Path) -> None: ...
    def gathered(self) -> contextlib.AbstractContextManager[None]: ...


def make_backend(model: torch.nn.Module, train: TrainSpec, dist: DistributedSpec, world: World) -> Backend:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    if dist.strategy.startswith("zero"):
        return DeepSpeedBackend(model, optimizer, deepspeed_config(train, dist, world.size), world)
    return LocalBackend(model, optimizer, train.precision, world)


class LocalBackend:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: str, world: World):
        self.world = world
        # bf16 is plain autocast (what accelerate's mixed_precision="bf16" does; bf16 needs no loss scaling). Not
        # through accelerate: its state is per process and refuses a second precision, and a service worker or a
        # test runs jobs of either precision in one process.
        self.precision = precision
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)

    def forward(self, batch: dict[str, Any], num_items: float) -> Any:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            # use_cache=False: with a cache, transformers ignores the restarting position_ids of packed rows,
            # and packed examples would attend to each other.
            return self.model(**batch, num_items_in_batch=num_items, use_cache=False)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def step(self, max_grad_norm: float) -> float:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = self.accelerator.clip_grad_norm_(trainable, max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def save(self, folder: Path) -> None:
        if self.world.is_main:  # replicated state: one copy is enough
            save_trainable_and_optimizer(folder, self.unwrapped(), self.optimizer)

    def load(self, folder: Path) -> None:
        load_trainable_and_optimizer(folder, self.unwrapped(), self.optimizer)

    def gathered(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class DeepSpeedBackend:
    TAG = "zero"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any], world: World):
        deepspeed = optional_import("deepspeed", "deepspeed", ZERO_FEATURE)

        self.world = world
        self.stage = config["zero_optimization"]["stage"]
        # The scheduler drives the torch optimizer; ZeRO keeps using its param_groups (and their lr) for its shards.
        self.optimizer = optimizer
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    def forward(self, batch: dict[str, Any], num_items: float) -> Any:
        return self.engine(**batch, num_items_in_batch=num_items, use_cache=False)

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already divides by the step's token count; DeepSpeed must not divide by accumulation again.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # DeepSpeed counts micro-steps and updates only at the accumulation boundary

    def step(self, max_grad_norm: float) -> float:
        """The update already happened in the last `backward` (clipping is in DeepSpeed's config)."""
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def unwrapped(self) -> torch.nn.Module:
        module: torch.nn.Module = self.engine.module
        return module

    def save(self, folder: Path) -> None:
        # DeepSpeed's own sharded format: each rank writes its optimizer partition. Frozen base weights are left
        # out (they come from the model source). Loaded only from this run's own output folder.
        self.engine.save_checkpoint(str(folder), tag=self.TAG, save_latest=False, exclude_frozen_parameters=True)

    def load(self, folder: Path) -> None:
        self.engine.load_checkpoint(str(folder), tag=self.TAG, load_module_strict=False, load_lr_scheduler_states=False)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Under ZeRO-3 each rank holds a slice of every parameter: gather the trainable ones before saving, or
        the adapter file would hold empty tensors."""
        if self.stage != 3:
            yield
            return
        deepspeed = optional_import("deepspeed", "deepspeed", ZERO_FEATURE)

        trainable = [p for p in self.engine.module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            yield
