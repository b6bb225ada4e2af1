"""The names of what a run writes, defined once: the run folder (`output_dir`) and each checkpoint folder in it.

```
output_dir/
  spec.yaml  summary.json  metrics.jsonl  eval_before.json  report.html  report.png
  adapter/  merged/  pissa_init/
  tensorboard/  mlflow.db  wandb/  trackers.json      (train.report_to)
  checkpoints/step-000010/  trainable.safetensors  optimizer.safetensors  optimizer.json  scheduler.json
                            trainer_state.json  rng-<rank>.safetensors
```
The service, the exporters and the benchmark read these folders back, so a name changed here changes for all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_PREFIX = "step-"
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


@dataclass(frozen=True)
class RunLayout:
    """Where each artefact of the run in `root` (a JobSpec's output_dir) lives."""

    root: Path

    @property
    def spec(self) -> Path:
        return self.root / "spec.yaml"  # the validated spec, as the run used it

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"  # a row per step, validation points ("eval" rows), before/after

    @property
    def eval_before(self) -> Path:
        return self.root / "eval_before.json"  # the base model's scores, kept for a resumed run

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def report_png(self) -> Path:
        return self.root / "report.png"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"  # the trained PEFT adapter (the whole model for full fine-tuning)

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def samples(self) -> Path:
        return self.root / "samples"  # generated ABC tunes as sheet music (SVG) and MIDI (creative runs)

    @property
    def pissa_init(self) -> Path:
        return self.root / "pissa_init"  # PiSSA's adapter at initialisation, to convert the final one to a LoRA

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"  # TensorBoard event files (train.report_to: [tensorboard])

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"  # MLflow's SQLite store (report_to mlflow, no MLFLOW_TRACKING_URI)

    @property
    def tracker_runs(self) -> Path:
        return self.root / "trackers.json"  # the MLflow/W&B run ids, so that a resumed run reopens them

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> CheckpointLayout:
        return CheckpointLayout(self.checkpoints / checkpoint_name(step))


@dataclass(frozen=True)
class CheckpointLayout:
    """The files of one checkpoint folder (`checkpoints/step-NNNNNN`, or its temporary sibling while written)."""

    folder: Path

    @property
    def trainable(self) -> Path:
        return self.folder / "trainable.safetensors"  # the trainable weights alone (adapter, or the whole model)

    @property
    def optimizer(self) -> Path:
        return self.folder / "optimizer.safetensors"

    @property
    def optimizer_state(self) -> Path:
        return self.folder / "optimizer.json"  # the optimizer's non-tensor state

    @property
    def scheduler(self) -> Path:
        return self.folder / "scheduler.json"

    @property
    def trainer_state(self) -> Path:
        return self.folder / "trainer_state.json"

    def rng(self, rank: int) -> Path:
        return self.folder / f"rng-{rank}.safetensors"  # one per process: each draws its own dropout masks


def checkpoint_name(step: int) -> str:
    # Zero-padded so that sorting the names sorts the steps.
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def checkpoint_step(folder: Path) -> int | None:
    """The step of a checkpoint folder, or None for any other folder (a temporary one being written)."""
    match = _CHECKPOINT_NAME.match(folder.name)
    return int(match.group(1)) if match else None


def checkpoint_folders(root: Path) -> list[Path]:
    """The checkpoint folders under `root` (a run's `checkpoints/`), oldest first."""
    found = [p for p in root.iterdir() if checkpoint_step(p) is not None] if root.is_dir() else []
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)
