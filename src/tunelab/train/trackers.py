"""Training curves in the experiment trackers people use (`train.report_to`): TensorBoard, MLflow, W&B.

accelerate's trackers (accelerate.tracking) do the writing; this module picks where each writes, feeds them the
rows that metrics.jsonl gets, keyed by optimizer step, and makes a resumed run continue the same curves:

- `train/loss`, `train/lr`, `train/grad_norm`, `train/tokens_per_s` (and `train/tokens`, `train/elapsed_s`, and
  DPO's `train/reward_accuracy`, `train/reward_margin`, ...) at every step;
- `validation/loss` at each validation point;
- `eval/<metric>` of the scenario's evaluation: before training at step 0, after it at the last step;
- the job spec, flattened (`train.lr`, `method.r`, ...), as hyperparameters when the run starts.

TensorBoard by default. Offline by default, everything in the run folder: TensorBoard event files in `tensorboard/`,
an MLflow SQLite store `mlflow.db` (unless MLFLOW_TRACKING_URI names another), W&B in offline mode under `wandb/`
(unless WANDB_MODE says otherwise; project, entity, name and tags from `train.wandb`). Only the main process of a
launch opens them (the caller decides; see `open_trackers`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tunelab.config import TRACKERS, JobSpec, WandbSpec
from tunelab.extras import require
from tunelab.layout import RunLayout
from tunelab.logs import is_verbose

if TYPE_CHECKING:
    from accelerate.tracking import GeneralTracker

Scalar = bool | int | float | str


@dataclass(frozen=True)
class Trackers:
    """The started trackers of one run; every method writes to all of them."""

    trackers: list[GeneralTracker]

    def hyperparameters(self, values: Mapping[str, Scalar]) -> None:
        for tracker in self.trackers:
            tracker.store_init_configuration(dict(values))

    def log_step(self, row: Mapping[str, float]) -> None:
        """One metrics.jsonl step row: every number but the step itself, under `train/`."""
        values = {f"train/{k}": v for k, v in row.items() if k != "step" and _number(v)}
        self._log(values, int(row["step"]))

    def log_validation(self, point: Mapping[str, float]) -> None:
        self._log({"validation/loss": point["loss"]}, int(point["step"]))

    def log_evaluation(self, metrics: Mapping[str, float], step: int) -> None:
        """The scenario's scores (before training: step 0; after: the last step), so each is a line from before
        to after."""
        self._log({f"eval/{k}": v for k, v in metrics.items() if _number(v)}, step)

    def _log(self, values: dict[str, float], step: int) -> None:
        if values:
            for tracker in self.trackers:
                tracker.log(values, step=step)


@contextmanager
def open_trackers(spec: JobSpec, resume_step: int | None, main: bool) -> Iterator[Trackers | None]:
    """Start the trackers of `spec.train.report_to` (None when there are none, or on a process other than the
    main one: a launch logs once). `resume_step`: the checkpoint's step when the run resumes, so that the curves
    continue (TensorBoard hides what was logged after that step; MLflow and W&B reopen the same run)."""
    if not main or not spec.train.report_to:
        yield None
        return
    layout = RunLayout(spec.output_dir)
    saved = _saved_ids(layout) if resume_step is not None else {}
    with _mlflow_store(layout, "mlflow" in spec.train.report_to):
        started: list[GeneralTracker] = []
        try:
            for name in spec.train.report_to:
                tracker = _build(name, layout, saved.get(name), resume_step, spec.train.wandb)
                tracker.start()
                started.append(tracker)
            _save_ids(layout, started)
            trackers = Trackers(started)
            if resume_step is None:  # a resumed run keeps the hyperparameters it started with
                trackers.hyperparameters(flatten(spec.model_dump(mode="json")))
            yield trackers
        finally:
            for tracker in started:
                tracker.finish()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """{"train": {"lr": 2e-4}} -> {"train.lr": 2e-4}; a list or a null becomes its JSON text (trackers keep only
    scalars as hyperparameters)."""
    flat: dict[str, Scalar] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def _build(
    name: str, layout: RunLayout, run_id: str | None, resume_step: int | None, wandb: WandbSpec | None
) -> GeneralTracker:
    require("trackers", f"report_to {name}", TRACKERS[name])
    from accelerate import PartialState
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    # accelerate's trackers log through its logger, which needs its state to exist. The state is a process-wide
    # singleton that the first construction configures: built here with the LocalBackend's own `cpu` argument, or
    # rank 0 of a DDP launch would later get an Accelerator that does not wrap the model in DDP (and rank 1 would
    # wait for its gradients forever).
    PartialState(cpu=not torch.cuda.is_available())
    run_name = layout.root.resolve().name
    if name == "tensorboard":
        # purge_step: TensorBoard's readers drop the points of earlier files at and after it: on resume, those
        # logged after the checkpoint by a run that then crashed (the resumed run logs them anew); for a new run
        # in an old run's folder (whose metrics.jsonl it replaces), all of them.
        purge = 0 if resume_step is None else resume_step + 1
        return TensorBoardTracker(run_name, str(layout.tensorboard), purge_step=purge)
    if name == "mlflow":
        artifacts = None if _user_mlflow_store() else layout.root.resolve().joinpath("mlartifacts").as_uri()
        return MLflowTracker("tunelab", logging_dir=artifacts, run_id=run_id, run_name=run_name)
    settings: dict[str, Any] = {"name": run_name, "dir": str(layout.root), "id": run_id, "resume": "allow"}
    if "WANDB_MODE" not in os.environ:
        settings["mode"] = "offline"  # never the network unless the user configured W&B for it
    if wandb is None:
        return WandBTracker(os.environ.get("WANDB_PROJECT", "tunelab"), **settings)
    settings.update(name=wandb.name or run_name, entity=wandb.entity, tags=wandb.tags or None)
    return WandBTracker(wandb.project, **settings)


def _user_mlflow_store() -> bool:
    return bool(os.environ.get("MLFLOW_TRACKING_URI"))


@contextmanager
def _mlflow_store(layout: RunLayout, wanted: bool) -> Iterator[None]:
    """MLflow's store for this run: the user's MLFLOW_TRACKING_URI, else a SQLite file in the run folder. MLflow
    keeps the URI in the process and its environment; it is unset after the run, so the next run of the same
    process (the service's worker, a test) does not write into this one's store."""
    if not wanted or _user_mlflow_store():
        yield
        return
    import mlflow

    if not is_verbose():  # its store's "Creating initial MLflow database tables..." is not news to a user
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    layout.root.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(f"sqlite:///{layout.mlflow_db.resolve()}")
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None: forget it (and MLFLOW_TRACKING_URI)


def _run_id(tracker: GeneralTracker) -> str | None:
    if tracker.name == "mlflow":
        return str(tracker.tracker.info.run_id)
    if tracker.name == "wandb":
        return str(tracker.tracker.id)
    return None  # TensorBoard has no run to reopen: its folder is the run


def _save_ids(layout: RunLayout, trackers: list[GeneralTracker]) -> None:
    ids = {t.name: run_id for t in trackers if (run_id := _run_id(t)) is not None}
    if ids:
        layout.tracker_runs.write_text(json.dumps({**_saved_ids(layout), **ids}, indent=1), encoding="utf-8")


def _saved_ids(layout: RunLayout) -> dict[str, str]:
    if not layout.tracker_runs.is_file():
        return {}
    saved = json.loads(layout.tracker_runs.read_text(encoding="utf-8"))
    return {str(k): str(v) for k, v in saved.items()} if isinstance(saved, dict) else {}


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
