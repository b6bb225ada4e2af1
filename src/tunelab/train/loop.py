"""The training loop: plain PyTorch composed with accelerate (device, autocast, backward), no trainer subclass.

Exact resume rests on one idea: everything that varies between steps is a pure function of (seed, step) or is
saved in the checkpoint. The data order of epoch e is a permutation seeded by seed + e, and optimizer step t
consumes micro-batches t*accum ... t*accum + accum - 1 of that stream, so the step number is the data position.
"""

from __future__ import annotations

import math
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from transformers import get_scheduler

from tunelab.config import CheckpointSpec, DistributedSpec, TrainSpec
from tunelab.data.packing import Row, collate
from tunelab.layout import RunLayout
from tunelab.models import cache_dir
from tunelab.train.backends import Backend, make_backend
from tunelab.train.budget import CALIBRATION_STEPS, Forecast, measured_rate, steps_that_fit
from tunelab.train.checkpoint import TrainerState, load_checkpoint, save_checkpoint, saved_total_steps
from tunelab.train.distributed import SINGLE, World, current_world
from tunelab.train.objectives import CausalLM, Objective
from tunelab.train.precision import CACHE_FILE as PRECISION_CACHE
from tunelab.train.precision import choose_precision
from tunelab.train.progress import ProgressReporter, rewrite_metrics
from tunelab.train.trackers import Trackers


@dataclass(frozen=True)
class TrainResult:
    state: TrainerState
    interrupted: bool
    checkpoint: Path | None
    backend: Backend  # holds the trained (possibly sharded) model; `backend.gathered()` before reading weights


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

    def micro_batch(self, index: int, world: World = SINGLE) -> list[int]:
        """Rows of global micro-batch `index` for process `world.rank`: the global batch is cut in `world.size`
        slices. A short last batch wraps round to the epoch's first rows so that every process has work."""
        epoch, i = divmod(index, self.micro_per_epoch)
        order = torch.randperm(self.rows, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        picks = order[i * self.batch_size : (i + 1) * self.batch_size]
        if world.size == 1:
            return picks
        per_rank = math.ceil(self.batch_size / world.size)
        picks += order[: per_rank * world.size - len(picks)]
        return picks[world.rank * per_rank : (world.rank + 1) * per_rank]


def make_plan(n_rows: int, train: TrainSpec, world_size: int = 1) -> Plan:
    """The plan works in global micro-batches (batch_size rows on each of world_size processes)."""
    global_micro = train.batch_size * world_size
    steps_per_epoch = math.ceil(n_rows / (global_micro * train.grad_accum))
    total = train.max_steps or max(1, math.ceil(train.epochs * steps_per_epoch))
    return Plan(n_rows, global_micro, train.grad_accum, total, train.seed)


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
    dist_spec: DistributedSpec | None = None,
    objective: Objective | None = None,
    val_rows: Sequence[Row] = (),
    trackers: Trackers | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    estimated_step_s: float | None = None,
) -> TrainResult:
    """Train `model` in place on `rows`. `stop_after` ends early at that step (as an interruption would).
    `val_rows`: the validation loss is measured on the first `train.eval_rows` of them every `train.eval_every`
    steps, by every process on the same rows (a sharded model's forward pass needs all ranks; the few rows cost
    less than splitting them would save), so every process holds the same points. `trackers`: the
    experiment trackers that get each step and validation point too (the main process's; None elsewhere).
    `on_checkpoint`: called with each saved checkpoint's folder (the main process's: object storage's mirror).
    `estimated_step_s`: `tunelab plan`'s seconds per step, which sizes a `train.time_budget` run until its first
    steps are timed (train/budget.py).

    With several processes every one calls this with the same rows; each takes its slice of every micro-batch."""
    if not rows:
        raise ValueError("no training rows")  # callers check the data first; this guards the loop's arithmetic
    world = current_world()
    if train_spec.precision == "auto":  # `run_job` resolves it first, to report it; other callers get it here
        choice = choose_precision("auto", model, world, cache_dir() / PRECISION_CACHE)
        train_spec = train_spec.model_copy(update={"precision": choice.precision})
    if objective is None:
        objective = CausalLM(train_spec.chunked_loss)
        objective.setup(model, rows, pad_id, train_spec.batch_size)
    backend = make_backend(model, train_spec, dist_spec or DistributedSpec(), world)
    plan = make_plan(len(rows), train_spec, world.size)
    saved_total = saved_total_steps(resume_from) if resume_from is not None else None
    if train_spec.time_budget is not None:
        plan = replace(plan, total_steps=saved_total or _provisional_steps(train_spec, plan, estimated_step_s))
    scheduler = _scheduler(train_spec, backend, plan.total_steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = RunLayout(out_dir)
    ckpt_root = layout.checkpoints
    metrics_path = layout.metrics
    state = TrainerState(total_steps=plan.total_steps if train_spec.time_budget is None else None)
    if resume_from is not None:
        state = load_checkpoint(resume_from, backend, scheduler)
        if world.is_main:
            rewrite_metrics(metrics_path, state.history, state.validation)
    elif metrics_path.exists() and world.is_main:
        metrics_path.unlink()
    if reporter is None:
        reporter = ProgressReporter(plan.total_steps, state.step, metrics_path if world.is_main else None)

    def checkpoint() -> Path:
        saved = save_checkpoint(ckpt_root, backend, scheduler, state, ckpt_spec.keep_last)
        if on_checkpoint is not None:
            on_checkpoint(saved)
        return saved

    val = list(val_rows[: train_spec.eval_rows])
    val_every = validation_every(train_spec, plan.total_steps) if val else 0
    last_ckpt: Path | None = None
    interrupted = False
    model.train()
    with reporter, _stop_on_sigint() as stop_requested:
        while state.step < plan.total_steps:
            started = time.perf_counter()
            loss, tokens, grad_norm, stats = _step(
                backend, objective, plan, rows, state.step, pad_id, packed, train_spec.max_grad_norm
            )
            scheduler.step()
            state.step += 1
            state.tokens += tokens
            state.elapsed_s += time.perf_counter() - started
            row: dict[str, Any] = {
                "step": state.step,
                "loss": loss,
                "lr": float(scheduler.get_last_lr()[0]),
                "grad_norm": grad_norm,
                "tokens": state.tokens,
                "tokens_per_s": state.tokens / max(state.elapsed_s, 1e-9),
                "elapsed_s": state.elapsed_s,
                "precision": train_spec.precision,  # what `auto` chose, for readers of the log
                **stats,
            }
            state.history.append(row)
            reporter.update(row, eta_s=state.elapsed_s / state.step * (plan.total_steps - state.step))
            if trackers is not None:
                trackers.log_step(row)
            if state.step == CALIBRATION_STEPS:  # the first steps are timed: say how long, fit a budget
                plan, scheduler = _calibrate(train_spec, backend, plan, scheduler, state, reporter)
                reporter.total = plan.total_steps
                val_every = validation_every(train_spec, plan.total_steps) if val else 0
            if val_every and (state.step % val_every == 0 or state.step == plan.total_steps):
                point = _validate(backend, objective, val, pad_id, packed, train_spec.batch_size, state.step)
                state.validation.append(point)
                reporter.validation(point)
                if trackers is not None:
                    trackers.log_validation(point)
            every = ckpt_spec.every_steps
            if every and state.step % every == 0 and state.step < plan.total_steps:
                last_ckpt = checkpoint()
            if _agree(world, stop_requested() or (stop_after is not None and state.step >= stop_after)):
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
    return TrainResult(state, interrupted, last_ckpt, backend)


def _scheduler(train_spec: TrainSpec, backend: Backend, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    scheduler: torch.optim.lr_scheduler.LRScheduler = get_scheduler(
        train_spec.schedule,
        backend.optimizer,
        num_warmup_steps=round(train_spec.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    return scheduler


def _budget_cap(train_spec: TrainSpec, plan: Plan) -> int | None:
    """A time budget's upper bound: max_steps, or epochs when the spec sets them (else the budget alone)."""
    if train_spec.max_steps is not None or "epochs" in train_spec.model_fields_set:
        return make_plan(plan.rows, train_spec, plan.batch_size // train_spec.batch_size).total_steps
    return None


def _provisional_steps(train_spec: TrainSpec, plan: Plan, estimated_step_s: float | None) -> int:
    """A budget's steps before any is timed: by the plan's estimate (or the cap), never fewer than the steps that
    calibrate. The schedule of those first steps is this count's; the count is then measured and set."""
    cap = _budget_cap(train_spec, plan)
    budget = float(train_spec.time_budget or 0)
    guess = steps_that_fit(budget, estimated_step_s, 0, 0.0, cap) if estimated_step_s else cap or 100
    return max(guess, min(CALIBRATION_STEPS, cap or CALIBRATION_STEPS))


def _calibrate(
    train_spec: TrainSpec,
    backend: Backend,
    plan: Plan,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainerState,
    reporter: ProgressReporter,
) -> tuple[Plan, torch.optim.lr_scheduler.LRScheduler]:
    """After the first steps: their measured rate (the slowest process's) says how long the run takes; with a
    time budget it sets the step count that fits and the schedule for it (the steps done keep their rates)."""
    rate = measured_rate(state.history)
    if backend.world.size > 1:
        tensor = torch.tensor([rate], dtype=torch.float64)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)  # every process, one answer
        rate = float(tensor.item())
    budget = train_spec.time_budget
    if budget is not None and state.total_steps is None:
        total = steps_that_fit(budget, rate, state.step, state.elapsed_s, _budget_cap(train_spec, plan))
        plan = replace(plan, total_steps=total)
        scheduler = _scheduler(train_spec, backend, total)
        with warnings.catch_warnings():  # replaying the done steps' schedule, not skipping an optimizer step
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(state.step):
                scheduler.step()
    state.total_steps = plan.total_steps
    reporter.note(Forecast(plan.total_steps, rate).line(state.step, budget))
    return plan, scheduler


def validation_every(train_spec: TrainSpec, total_steps: int) -> int:
    """Steps between validation-loss points: `train.eval_every`, by default about five points over the run."""
    if train_spec.eval_every is not None:
        return train_spec.eval_every
    return max(1, math.ceil(total_steps / 5))


@torch.no_grad()
def _validate(
    backend: Backend, objective: Objective, rows: list[Row], pad_id: int, packed: bool, batch_size: int, step: int
) -> dict[str, float]:
    """The objective's loss on `rows`, normalised over all of them as a training step is over its batch (the
    mean per token for a language model, as the evaluation's loss). Eval mode: no dropout, no random draw, so
    an exactly resumed run measures the same points."""
    started = time.perf_counter()
    batches = [collate(rows[i : i + batch_size], pad_id, packed) for i in range(0, len(rows), batch_size)]
    n_items = max(sum(objective.count(b) for b in batches), 1)
    backend.unwrapped().eval()
    try:
        loss = sum(float(objective.loss(backend.forward, b, n_items)[0]) for b in batches)
    finally:
        backend.unwrapped().train()
    return {"step": step, "loss": loss, "rows": len(rows), "seconds": time.perf_counter() - started}


def _step(
    backend: Backend,
    objective: Objective,
    plan: Plan,
    rows: list[Row],
    step: int,
    pad_id: int,
    packed: bool,
    max_grad_norm: float,
) -> tuple[float, int, float, dict[str, float]]:
    """One optimizer step over `grad_accum` micro-batches; returns (mean loss, real tokens, grad norm, the
    objective's statistics averaged per item) over all processes."""
    world = backend.world
    first = step * plan.grad_accum
    picks = [[rows[i] for i in plan.micro_batch(first + j, world)] for j in range(plan.grad_accum)]
    batches = [collate(group, pad_id, packed) for group in picks]
    # The loss is summed over tokens and divided by the tokens of the whole step (on all processes), so
    # accumulation and data parallelism give the gradient of one big batch. Gradients are averaged over
    # processes, hence the division of the token count by the world size.
    local = [
        sum(objective.count(b) for b in batches),
        sum(len(r.input_ids) for g in picks for r in g),
    ]
    n_items, tokens = _sum_over_world(world, local)
    total = 0.0
    sums: dict[str, float] = {}
    for batch in batches:
        micro_loss, stats = objective.loss(backend.forward, batch, max(n_items, 1) / world.size)
        backend.backward(micro_loss)
        total += float(micro_loss.detach())
        sums = {k: sums.get(k, 0.0) + v for k, v in stats.items()}
    grad_norm = backend.step(max_grad_norm)
    loss, *summed = _sum_over_world(world, [total / world.size, *sums.values()], torch.float64)
    return loss, int(tokens), grad_norm, {k: v / max(n_items, 1) for k, v in zip(sums, summed, strict=True)}


def _sum_over_world(world: World, values: Sequence[float], dtype: torch.dtype = torch.int64) -> list[float]:
    if world.size == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=dtype)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _agree(world: World, stop: bool) -> bool:
    """Ctrl-C reaches every process of a launch, but not always in the same step: stop when any of them asks."""
    if world.size == 1:
        return stop
    return bool(_sum_over_world(world, [int(stop)])[0])


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
