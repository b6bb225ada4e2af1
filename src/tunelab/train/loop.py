"""The training loop: plain PyTorch composed with accelerate (device, autocast, backward), no trainer subclass.

Exact resume rests on one idea: everything that varies between steps is a pure function of (seed, step) or is
saved in the checkpoint. The data order of epoch e is a permutation seeded by seed + e, and optimizer step t
consumes micro-batches t*accum ... t*accum + accum - 1 of that stream, so the step number is the data position.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from tunelab.config import CheckpointSpec, TrainSpec
from tunelab.data.packing import Row, collate
from tunelab.data.render import IGNORE
from tunelab.train.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from tunelab.train.progress import ProgressReporter, rewrite_metrics


@dataclass(frozen=True)
class TrainResult:
    state: TrainerState
    interrupted: bool
    checkpoint: Path | None


@dataclass(frozen=True)
class Plan:
    """How many steps, and which rows each micro-batch takes."""

    rows: int
    batch_size: int
    grad_accum: int
    total_steps: int
    seed: int

    @property
    def micro_per_epoch(self) -> int:
        return math.ceil(self.rows / self.batch_size)

    def micro_batch(self, index: int) -> list[int]:
        epoch, i = divmod(index, self.micro_per_epoch)
        order = torch.randperm(self.rows, generator=torch.Generator().manual_seed(self.seed + epoch))
        return order[i * self.batch_size : (i + 1) * self.batch_size].tolist()


def make_plan(n_rows: int, train: TrainSpec) -> Plan:
    steps_per_epoch = math.ceil(n_rows / (train.batch_size * train.grad_accum))
    total = train.max_steps or max(1, math.ceil(train.epochs * steps_per_epoch))
    return Plan(n_rows, train.batch_size, train.grad_accum, total, train.seed)


def train(
    model: torch.nn.Module,
    rows: list[Row],
    *,
    pad_id: int,
    packed: bool,
    train_spec: TrainSpec,
    ckpt_spec: CheckpointSpec,
    out_dir: Path,
    resume_from: Path | None = None,
    stop_after: int | None = None,
    reporter: ProgressReporter | None = None,
) -> TrainResult:
    """Train `model` in place on `rows`. `stop_after` ends early at that step (as an interruption would)."""
    if not rows:
        raise ValueError("no training rows")  # callers check the data first; this guards the loop's arithmetic
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision="bf16" if train_spec.precision == "bf16" else "no"
    )
    plan = make_plan(len(rows), train_spec)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train_spec.lr, weight_decay=train_spec.weight_decay)
    scheduler = get_scheduler(
        train_spec.schedule,
        optimizer,
        num_warmup_steps=round(train_spec.warmup_ratio * plan.total_steps),
        num_training_steps=plan.total_steps,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = out_dir / "checkpoints"
    metrics_path = out_dir / "metrics.jsonl"
    state = TrainerState()
    if resume_from is not None:
        state = load_checkpoint(resume_from, accelerator.unwrap_model(model), optimizer, scheduler)
        rewrite_metrics(metrics_path, state.history)
    elif metrics_path.exists():
        metrics_path.unlink()
    reporter = reporter or ProgressReporter(plan.total_steps, state.step, metrics_path)

    def checkpoint() -> Path:
        return save_checkpoint(
            ckpt_root, accelerator.unwrap_model(model), optimizer, scheduler, state, ckpt_spec.keep_last
        )

    last_ckpt: Path | None = None
    interrupted = False
    model.train()
    with reporter, _stop_on_sigint() as stop_requested:
        while state.step < plan.total_steps:
            started = time.perf_counter()
            loss, tokens, grad_norm = _step(
                model,
                optimizer,
                accelerator,
                plan,
                rows,
                state.step,
                pad_id,
                packed,
                train_spec.max_grad_norm,
            )
            scheduler.step()
            state.step += 1
            state.tokens += tokens
            state.elapsed_s += time.perf_counter() - started
            row = {
                "step": state.step,
                "loss": loss,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens": state.tokens,
                "tokens_per_s": state.tokens / max(state.elapsed_s, 1e-9),
                "elapsed_s": state.elapsed_s,
            }
            state.history.append(row)
            reporter.update(row, eta_s=state.elapsed_s / state.step * (plan.total_steps - state.step))
            every = ckpt_spec.every_steps
            if every and state.step % every == 0 and state.step < plan.total_steps:
                last_ckpt = checkpoint()
            if stop_requested() or (stop_after is not None and state.step >= stop_after):
                interrupted = state.step < plan.total_steps
                break
        if interrupted or last_ckpt is None or not last_ckpt.name.endswith(f"{state.step:06d}"):
            last_ckpt = checkpoint()
        if interrupted:
            reporter.note(
                f"stopped at step {state.step}: checkpoint saved to {last_ckpt}; "
                "run the same command with --resume to continue"
            )
    model.eval()
    return TrainResult(state, interrupted, last_ckpt)


def _step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    plan: Plan,
    rows: list[Row],
    step: int,
    pad_id: int,
    packed: bool,
    max_grad_norm: float,
) -> tuple[float, int, float]:
    """One optimizer step over `grad_accum` micro-batches; returns (mean token loss, real tokens, grad norm)."""
    picks = [[rows[i] for i in plan.micro_batch(step * plan.grad_accum + j)] for j in range(plan.grad_accum)]
    batches = [collate(group, pad_id, packed) for group in picks]
    # The loss is summed over tokens and divided by the tokens of the whole step, so accumulation gives the same
    # gradient as one big batch (the per-micro-batch mean would over-weight short micro-batches).
    n_items = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    total = 0.0
    for batch in batches:
        with accelerator.autocast():
            # use_cache=False: with a cache, transformers ignores the restarting position_ids of packed rows,
            # and packed examples would attend to each other.
            out = model(**batch, num_items_in_batch=max(n_items, 1), use_cache=False)
        accelerator.backward(out.loss)
        total += float(out.loss.detach())
    grad_norm = accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, sum(len(r.input_ids) for group in picks for r in group), float(grad_norm)


@contextmanager
def _stop_on_sigint() -> Iterator[Callable[[], bool]]:
    """First Ctrl-C: finish the current step, save a checkpoint, stop. A second one stops at once."""
    requested = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal requested
        if requested:
            raise KeyboardInterrupt
        requested = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread (e.g. a service worker thread): no signal handling there
        yield lambda: False
        return
    try:
        yield lambda: requested
    finally:
        signal.signal(signal.SIGINT, previous)
