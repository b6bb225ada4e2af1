"""A finished job's outputs as service objects: the results CSV and report as files, the model as a model."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from tunelab.atomic import write_atomic
from tunelab.job_service.artefacts import Artefacts
from tunelab.job_service.db import FileRow, JobRow, ModelRow
from tunelab.job_service.ids import new_id, now
from tunelab.job_service.monitor import fine_tuned_name
from tunelab.job_service.settings import ServiceSettings
from tunelab.layout import RunLayout
from tunelab.recipe import RunSummary
from tunelab.train.progress import is_step_row

COLUMNS = [
    "step",
    "train_loss",
    "valid_loss",
    "valid_mean_token_accuracy",
    "learning_rate",
    "grad_norm",
    "tokens",
    "tokens_per_s",
]


def results_csv(metrics_path: Path, after: dict[str, float]) -> str:
    """One row per step (OpenAI's step_metrics.csv columns first); validation scores on the last step."""
    lines = metrics_path.read_text(encoding="utf-8").splitlines()
    rows = [row for line in lines if line.strip() and is_step_row(row := json.loads(line))]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for i, r in enumerate(rows):
        last = i == len(rows) - 1
        valid = [after.get("loss", ""), after.get("token_accuracy", "")] if last else ["", ""]
        writer.writerow([r["step"], r["loss"], *valid, r["lr"], r["grad_norm"], r["tokens"], r["tokens_per_s"]])
    return out.getvalue()


def result_files(settings: ServiceSettings, job: JobRow, summary: RunSummary) -> list[FileRow]:
    table = results_csv(RunLayout(summary.output_dir).metrics, summary.after)
    files = [_file(settings, job, "step_metrics.csv", table.encode())]
    if summary.report is not None and summary.report.is_file():
        files.append(_file(settings, job, summary.report.name, summary.report.read_bytes()))
    return files


def model_row(job: JobRow, summary: RunSummary) -> ModelRow:
    # The merged model loads fastest for chat; methods that cannot merge are served as base + adapter.
    path = summary.merged or summary.adapter
    return ModelRow(
        id=fine_tuned_name(job),
        project_id=job.project_id,
        job_id=job.id,
        created_at=now(),
        path=str(path),
        deleted=False,
    )


def _file(settings: ServiceSettings, job: JobRow, name: str, content: bytes) -> FileRow:
    file_id = new_id("file")
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    target = settings.files_dir / f"{file_id}{Path(name).suffix}"
    write_atomic(target, content)
    Artefacts.of(settings).push(target)
    return FileRow(
        id=file_id,
        project_id=job.project_id,
        filename=name,
        purpose="fine-tune-results",
        bytes=len(content),
        created_at=now(),
        status="processed",
        path=str(target),
        deleted=False,
    )
