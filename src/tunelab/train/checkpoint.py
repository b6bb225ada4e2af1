"""Checkpoints for exact resume, in safetensors and JSON wherever the format is ours (no pickles).

A checkpoint holds what the loop needs to continue as if it never stopped: the trainable weights, the optimizer's
moments, the scheduler position, the RNG state (dropout) and the step (which also fixes the data position, since
the data order is a pure function of seed, epoch and step).

One process and DDP write safetensors and JSON only. DeepSpeed ZeRO writes its own sharded format (torch.save),
which is only ever read back from the run's own output folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from tunelab.atomic import publish_folder
from tunelab.errors import TunelabError
from tunelab.layout import CheckpointLayout, checkpoint_folders, checkpoint_name
from tunelab.train.distributed import World, barrier


@dataclass
class TrainerState:
    step: int = 0
    tokens: int = 0  # real (non-padding) tokens seen
    elapsed_s: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    # Validation loss during training ({"step", "loss", "rows", "seconds"}); older checkpoints have none.
    validation: list[dict[str, float]] = field(default_factory=list)
    # The run's step count, saved so that a resume keeps what train.time_budget chose (None: not chosen yet).
    total_steps: int | None = None


class CheckpointBackend(Protocol):
    """What a checkpoint needs from the training backend (see train/backends.py)."""

    world: World

    def save(self, folder: Path) -> None: ...
    def load(self, folder: Path) -> None: ...


def save_checkpoint(
    root: Path,
    backend: CheckpointBackend,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainerState,
    keep_last: int,
) -> Path:
    """Write `root/step-NNNNNN` atomically (a temporary folder renamed), then prune old checkpoints.

    Every process writes its own part (its RNG state; its optimizer shard under ZeRO); rank 0 writes the rest and
    renames the folder once all parts are in."""
    world = backend.world
    target = root / checkpoint_name(state.step)
    tmp = root / f".tmp-{target.name}"
    files = CheckpointLayout(tmp)
    if world.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier(world)
    backend.save(tmp)
    save_file({"torch_cpu": torch.get_rng_state()}, str(files.rng(world.rank)))
    barrier(world)
    if world.is_main:
        try:
            _write_json(files.scheduler, scheduler.state_dict())
            _write_json(files.trainer_state, asdict(state) | {"world_size": world.size})
            publish_folder(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        _prune(root, keep_last)
    barrier(world)
    return target


def load_checkpoint(
    path: Path, backend: CheckpointBackend, scheduler: torch.optim.lr_scheduler.LRScheduler
) -> TrainerState:
    files = CheckpointLayout(path)
    if not files.trainer_state.is_file():
        raise TunelabError(f"{path} is not a complete tunelab checkpoint ({files.trainer_state.name} is missing)")
    saved = _read_json(files.trainer_state)
    saved_world = saved.pop("world_size", 1)
    if saved_world != backend.world.size:
        raise TunelabError(
            f"checkpoint {path} was written by {saved_world} process(es), this run has {backend.world.size}: "
            f"resume with --nproc {saved_world} (the data order and optimizer shards depend on it)"
        )
    backend.load(path)
    scheduler.load_state_dict(_read_json(files.scheduler))
    rng = files.rng(backend.world.rank)
    if rng.is_file():
        torch.set_rng_state(load_file(str(rng))["torch_cpu"])
    return TrainerState(**saved)


def saved_world_size(folder: Path) -> int:
    """How many processes wrote checkpoint `folder` (1 for checkpoints older than the field)."""
    return int(_read_json(CheckpointLayout(folder).trainer_state).get("world_size", 1))


def saved_total_steps(folder: Path) -> int | None:
    """The step count checkpoint `folder`'s run settled on (None when older than the field or not yet chosen)."""
    path = CheckpointLayout(folder).trainer_state
    value = _read_json(path).get("total_steps") if path.is_file() else None
    return int(value) if value is not None else None


def save_trainable_and_optimizer(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The replicated (one-process or DDP) state: trainable weights and Adam moments, in safetensors."""
    files = CheckpointLayout(folder)
    trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(files.trainable))
    tensors, meta = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(files.optimizer))
    _write_json(files.optimizer_state, meta)


def load_trainable_and_optimizer(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    files = CheckpointLayout(folder)
    for path in (files.trainable, files.optimizer, files.optimizer_state):
        if not path.is_file():
            raise TunelabError(f"{folder} is not a complete tunelab checkpoint ({path.name} is missing)")
    weights = load_file(str(files.trainable))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise TunelabError(
            f"checkpoint {folder} was made with another method or model: its trainable parameters "
            "differ from this run's; resume with the spec that made it"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(files.optimizer)), _read_json(files.optimizer_state)))


def latest_checkpoint(root: Path) -> Path | None:
    found = checkpoint_folders(root)
    return found[-1] if found else None


def _prune(root: Path, keep_last: int) -> None:
    for old in checkpoint_folders(root)[:-keep_last]:
        shutil.rmtree(old)


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as flat tensors (safetensors) plus the JSON-able param groups."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, entries in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
