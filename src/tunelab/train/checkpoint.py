"""Checkpoints for exact resume, in safetensors and JSON only (no pickles: checkpoints may come from others).

A checkpoint holds what the loop needs to continue as if it never stopped: the trainable weights, the optimizer's
moments, the scheduler position, the RNG state (dropout) and the step (which also fixes the data position, since
the data order is a pure function of seed, epoch and step).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import TunelabError


@dataclass
class TrainerState:
    step: int = 0
    tokens: int = 0  # real (non-padding) tokens seen
    elapsed_s: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def save_checkpoint(
    root: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainerState,
    keep_last: int,
) -> Path:
    """Write `root/step-NNNNNN` atomically (a temporary folder renamed), then prune old checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{state.step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(tmp / "trainable.safetensors"))
        tensors, meta = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "optimizer.json", meta)
        _write_json(tmp / "scheduler.json", scheduler.state_dict())
        save_file({"torch_cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        _write_json(tmp / "trainer_state.json", asdict(state))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    _prune(root, keep_last)
    return target


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainerState:
    for name in ("trainable.safetensors", "optimizer.safetensors", "trainer_state.json"):
        if not (path / name).is_file():
            raise TunelabError(f"{path} is not a complete tunelab checkpoint ({name} is missing)")
    weights = load_file(str(path / "trainable.safetensors"))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise TunelabError(
            f"checkpoint {path} was made with another method or model: its trainable parameters "
            "differ from this run's; resume with the spec that made it"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(
        _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), _read_json(path / "optimizer.json"))
    )
    scheduler.load_state_dict(_read_json(path / "scheduler.json"))
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch_cpu"])
    return TrainerState(**_read_json(path / "trainer_state.json"))


def latest_checkpoint(root: Path) -> Path | None:
    found = sorted(root.glob("step-*")) if root.is_dir() else []
    return found[-1] if found else None


def _prune(root: Path, keep_last: int) -> None:
    for old in sorted(root.glob("step-*"))[:-keep_last]:
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
