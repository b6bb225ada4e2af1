"""Fine-tuning jobs: the request becomes a validated JobSpec (the same one `tunelab train` runs), and a state
machine moves the job: validating_files -> queued -> running -> succeeded | failed | cancelled, with paused
(pause/resume) beside queued and running. Workers apply pause and cancel to running jobs after the current step."""

from __future__ import annotations

import functools
import json
import secrets
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError
from safetensors import safe_open

from tunelab.config import CheckpointSpec, EvalSpec, JobSpec, MethodSpec, TaskSpec, TrainSpec, load_spec
from tunelab.errors import ConfigError, Problem
from tunelab.job_service.db import CheckpointRow, EventRow, FileRow, JobRow
from tunelab.job_service.errors import ApiError, bad_request, not_found
from tunelab.job_service.ids import new_id, now
from tunelab.job_service.schemas import Hyperparameters, IntegrationIn, JobCreate
from tunelab.job_service.settings import MODEL_NAME, ServiceSettings
from tunelab.job_service.store import Event, Page, Store

DEFAULT_LR: float = TrainSpec.model_fields["lr"].default
MAX_KEEP = 1000  # checkpoints kept as models per job: each is a folder on disk and a row the API lists
# The training loop keeps every checkpoint; the service prunes them itself, after recording each one as a model.
LOOP_KEEP_ALL = 1_000_000
SECTION_MODELS: dict[str, type[BaseModel]] = {
    "method": MethodSpec,
    "task": TaskSpec,
    "train": TrainSpec,
    "checkpoints": CheckpointSpec,
    "eval": EvalSpec,
}
SPEC_SECTIONS = tuple(SECTION_MODELS)
HYPER_FIELDS = {"n_epochs": "epochs", "batch_size": "batch_size"}


def create_job(settings: ServiceSettings, store: Store, project_id: str, req: JobCreate) -> JobRow:
    _check_suffix(req.suffix)
    base_path = _base_model(settings, req.model)
    train_file = _usable_file(store, project_id, req.training_file, "training_file")
    val_file = _usable_file(store, project_id, req.validation_file, "validation_file") if req.validation_file else None
    job_id = new_id("ftjob")
    spec, seed, keep = build_spec(settings, job_id, base_path, train_file, val_file, req)
    row = JobRow(
        id=job_id,
        project_id=project_id,
        model=req.model,
        training_file=train_file.id,
        validation_file=val_file.id if val_file else None,
        suffix=req.suffix or None,
        seed=seed,
        meta=req.metadata,
        hyperparameters=resolved_hyperparameters(spec),
        spec=spec.model_dump(mode="json"),
        status="validating_files",
        created_at=now(),
        result_files=[],
        attempts=0,
        last_step=0,
        keep_checkpoints=keep,
        resources=req.tunelab.resources.model_dump(exclude_none=True) if req.tunelab.resources else None,
    )
    files = train_file.id + (f" and validation file: {val_file.id}" if val_file else "")
    store.jobs.add(row, [Event(f"Validating training file: {files}")])
    advance_validating(settings, store)
    return get_job(store, project_id, job_id)


def build_spec(
    settings: ServiceSettings,
    job_id: str,
    base_path: str,
    train_file: FileRow,
    val_file: FileRow | None,
    req: JobCreate,
) -> tuple[JobSpec, int, int]:
    """The JobSpec of a request, its seed, and how many checkpoints the service keeps; every problem is a 400."""
    sections = _spec_sections(req.tunelab.spec)
    _check_spec_types(sections)
    train = sections["train"]
    hyper = _hyperparameters(req)
    _apply_hyperparameters(train, hyper, req.method.type if req.method else "supervised")
    seed = _seed(train, req.seed)
    _apply_integrations(train, req.integrations or [])
    checkpoints = sections["checkpoints"]
    keep = checkpoints.pop("keep_last", settings.keep_checkpoints)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= MAX_KEEP:
        message = f"checkpoints.keep_last must be an integer from 1 to {MAX_KEEP}"
        raise bad_request("invalid_spec", message, "tunelab.spec.checkpoints.keep_last")
    checkpoints.setdefault("every_steps", settings.checkpoint_every)
    checkpoints["keep_last"] = LOOP_KEEP_ALL
    raw: dict[str, Any] = {
        "model": {"name": base_path},
        "method": {**sections["method"], "name": req.tunelab.method},
        "task": _task(req, sections["task"], hyper),
        "data": {"train": train_file.path, "validation": val_file.path if val_file else None},
        "train": {**train, "seed": seed},
        "checkpoints": checkpoints,
        "eval": sections["eval"],
        "output_dir": str((settings.jobs_dir / job_id).resolve()),
    }
    try:
        spec = load_spec(None, base=raw)
    except ConfigError as exc:
        raise _spec_error(exc.problems) from None
    _check_target_modules(base_path, spec.method.target_modules)
    return spec, seed, keep


def _check_spec_types(sections: dict[str, dict[str, Any]]) -> None:
    """Each field the request sets, checked strictly against its JobSpec type: YAML's loader coerces ("8" is 8,
    true is 1), and a request deserves OpenAI's strictness. Bounds and the rest are load_spec's."""
    for section, values in sections.items():
        fields = SECTION_MODELS[section].model_fields
        for key, value in values.items():
            if key not in fields:
                continue  # load_spec names unknown fields, with a suggestion
            try:
                _strict_adapter(section, key).validate_json(json.dumps(value), strict=True)
            except ValidationError as exc:
                param = f"tunelab.spec.{section}.{key}"
                message = f"Invalid value for '{param}': {exc.errors()[0]['msg']}."
                raise bad_request("invalid_spec", message, param) from None
            except (ValueError, RecursionError):
                raise bad_request("invalid_spec", f"Invalid value for 'tunelab.spec.{section}.{key}'.") from None


@functools.cache
def _strict_adapter(section: str, key: str) -> TypeAdapter[Any]:
    return TypeAdapter(SECTION_MODELS[section].model_fields[key].annotation or Any)


def _check_target_modules(base_path: str, targets: list[str] | None) -> None:
    """Unknown target modules failed only at training; the weights' names say which modules the model has."""
    if not targets:
        return
    names = module_names(Path(base_path))
    if names is None:  # not a safetensors folder: training will tell
        return
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise bad_request(
            "invalid_spec",
            f"target_modules {unknown} are not modules of this model; it has: {', '.join(leaves)}.",
            "tunelab.spec.method.target_modules",
        )


@functools.cache
def module_names(folder: Path) -> frozenset[str] | None:
    """Names of the modules that hold weights, read from the safetensors headers (no weights are loaded)."""
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    names: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="np") as handle:
            names.update(key.rsplit(".", 1)[0] for key in handle.keys())  # noqa: SIM118 (not iterable)
    return frozenset(names)


def resolved_hyperparameters(spec: JobSpec) -> dict[str, Any]:
    epochs = spec.train.epochs
    resolved = {
        "n_epochs": int(epochs) if float(epochs).is_integer() else epochs,
        "batch_size": spec.train.batch_size,
        "learning_rate_multiplier": spec.train.lr / DEFAULT_LR,
    }
    return resolved | ({"beta": spec.task.beta} if spec.task.scenario == "preference" else {})


def advance_validating(settings: ServiceSettings, store: Store) -> None:
    """Queue (or fail) every job whose files have finished validating. Idempotent: any process may call it."""
    for job in store.jobs.validating():
        outcome = _files_outcome(settings, store, job)
        if isinstance(outcome, str):  # "pending": a file is still validating
            continue
        if outcome is None:
            queued = Event("Files validated, moving job to queued state")
            store.jobs.transition(job.id, ["validating_files"], "queued", [queued])
        else:
            event = Event(f"Job failed: {outcome['message']}", level="error")
            store.jobs.transition(job.id, ["validating_files"], "failed", [event], error=outcome, finished_at=now())


def get_job(store: Store, project_id: str, job_id: str) -> JobRow:
    job = store.jobs.get(project_id, job_id)
    if job is None:
        raise not_found("fine_tuning_job", job_id)
    return job


def list_jobs(
    store: Store, project_id: str, after: str | None, limit: int, metadata: dict[str, str], null_metadata: bool
) -> Page[JobRow]:
    return store.jobs.page(project_id, after, limit, metadata, null_metadata)


def list_events(store: Store, project_id: str, job_id: str, after: str | None, limit: int) -> Page[EventRow]:
    page = store.jobs.events(project_id, job_id, after, limit)
    if page is None:
        raise not_found("fine_tuning_job", job_id)
    return page


def list_checkpoints(store: Store, project_id: str, job_id: str, after: str | None, limit: int) -> Page[CheckpointRow]:
    page = store.models.checkpoints(project_id, job_id, after, limit)
    if page is None:
        raise not_found("fine_tuning_job", job_id)
    return page


def cancel_job(store: Store, project_id: str, job_id: str) -> JobRow:
    job = get_job(store, project_id, job_id)
    idle = ["validating_files", "queued", "paused"]
    if not store.jobs.transition(job.id, idle, "cancelled", [Event("Job cancelled")], finished_at=now()):
        asked = Event("Cancellation requested; the job stops after the current step")
        if not store.jobs.request_control(job.id, "cancel", asked):
            raise _state_error(store, project_id, job_id, "cancelled")
    return get_job(store, project_id, job_id)


def pause_job(store: Store, project_id: str, job_id: str) -> JobRow:
    job = get_job(store, project_id, job_id)
    if not store.jobs.transition(job.id, ["queued"], "paused", [Event("Job paused")]):
        asked = Event("Pause requested; the job saves a checkpoint after the current step and pauses")
        if not store.jobs.request_control(job.id, "pause", asked):
            raise _state_error(store, project_id, job_id, "paused")
    return get_job(store, project_id, job_id)


def resume_job(store: Store, project_id: str, job_id: str) -> JobRow:
    job = get_job(store, project_id, job_id)
    event = Event("Job resumed; it is queued and continues from its last checkpoint")
    if not store.jobs.transition(job.id, ["paused"], "queued", [event]):
        raise _state_error(store, project_id, job_id, "resumed")
    return get_job(store, project_id, job_id)


def _state_error(store: Store, project_id: str, job_id: str, verb: str) -> ApiError:
    status = get_job(store, project_id, job_id).status
    return bad_request("invalid_job_state", f"Job {job_id} is {status}: it cannot be {verb}.")


def _base_model(settings: ServiceSettings, name: str) -> str:
    models = settings.base_models()
    if name not in models:
        raise bad_request(
            "model_not_available",
            f"Model {name!r} cannot be fine-tuned here; available base models: {', '.join(sorted(models))}.",
            "model",
        )
    path = models[name]
    if path != "embedded" and not Path(path).exists():  # configured, but its folder is gone: training would fail
        raise bad_request("model_not_available", f"Model {name!r} is configured but its files are missing.", "model")
    return models[name]


def _check_suffix(suffix: str | None) -> None:
    """The suffix goes into `ft:<base>:<suffix>:<id>`: a ':' (or a '/', a space) would make that name ambiguous."""
    if suffix and not MODEL_NAME.fullmatch(suffix):
        raise bad_request(
            "invalid_value",
            f"Invalid suffix {suffix!r}: use up to 64 letters, digits, '-', '_' or '.' "
            "(it becomes part of the model name ft:<base>:<suffix>:<id>).",
            "suffix",
        )


def _usable_file(store: Store, project_id: str, file_id: str, param: str) -> FileRow:
    row = store.files.get(project_id, file_id)
    if row is None:  # missing, deleted, or another project's: the same 404, so ids do not leak across tenants
        raise not_found("file", file_id, param)
    if row.purpose != "fine-tune":
        message = f"File {file_id} has purpose {row.purpose!r}, not 'fine-tune'."
        raise bad_request("invalid_file_purpose", message, param)
    return row


def _hyperparameters(req: JobCreate) -> Hyperparameters:
    """The request's hyperparameters: from `method.supervised` or `method.dpo`, or the deprecated top level."""
    method = req.method
    if method is not None and method.type not in ("supervised", "dpo"):
        raise bad_request(
            "unsupported_method",
            f"method.type {method.type!r} is not supported: use 'supervised' or 'dpo'.",
            "method.type",
        )
    nested: Hyperparameters | None = None
    if method is not None and method.type == "dpo":
        nested = method.dpo.hyperparameters if method.dpo else None
    elif method is not None and method.supervised:
        nested = method.supervised.hyperparameters
    if nested is not None and req.hyperparameters is not None and nested != req.hyperparameters:
        raise bad_request(
            "invalid_request",
            f"hyperparameters and method.{method.type if method else 'supervised'}.hyperparameters differ: "
            "give them in method only.",
            "hyperparameters",
        )
    return nested or req.hyperparameters or Hyperparameters()


def _task(req: JobCreate, task: dict[str, Any], hyper: Hyperparameters) -> dict[str, Any]:
    """A DPO job trains the preference scenario, with the request's beta."""
    if req.method is None or req.method.type != "dpo":
        return {**task, "scenario": req.tunelab.scenario}
    if "scenario" in req.tunelab.model_fields_set and req.tunelab.scenario != "preference":
        raise bad_request(
            "invalid_request",
            f"method.type 'dpo' trains the preference scenario, not {req.tunelab.scenario!r}: drop tunelab.scenario.",
            "tunelab.scenario",
        )
    beta = getattr(hyper, "beta", "auto")
    if beta != "auto" and "beta" in task and task["beta"] != beta:
        raise bad_request(
            "invalid_request",
            f"method.dpo.hyperparameters.beta is {beta} but tunelab.spec.task.beta is {task['beta']}: give one.",
            "method.dpo.hyperparameters.beta",
        )
    return {**task, "scenario": "preference", **({"beta": beta} if beta != "auto" else {})}


def _spec_sections(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    for key, value in spec.items():
        if key not in SPEC_SECTIONS:
            raise bad_request(
                "invalid_spec",
                f"tunelab.spec.{key} cannot be set: give {', '.join(SPEC_SECTIONS)} (the service sets the rest).",
                f"tunelab.spec.{key}",
            )
        if not isinstance(value, dict):
            raise bad_request("invalid_spec", f"tunelab.spec.{key} must be an object.", f"tunelab.spec.{key}")
    for section, key, instead in (("method", "name", "tunelab.method"), ("task", "scenario", "tunelab.scenario")):
        if key in spec.get(section, {}):
            raise bad_request("invalid_spec", f"set {instead}, not tunelab.spec.{section}.{key}.", instead)
    return {name: dict(spec.get(name, {})) for name in SPEC_SECTIONS}


def _apply_hyperparameters(train: dict[str, Any], hyper: Hyperparameters, method: str) -> None:
    for name, field in HYPER_FIELDS.items():
        value = getattr(hyper, name)
        if value == "auto":
            continue  # tunelab's default, or the extension's value
        if field in train and train[field] != value:
            raise bad_request(
                "invalid_request",
                f"method.{method}.hyperparameters.{name} is {value} but tunelab.spec.train.{field} is "
                f"{train[field]}: give only one of them.",
                f"method.{method}.hyperparameters.{name}",
            )
        train[field] = value
    multiplier = hyper.learning_rate_multiplier
    base = train.get("lr", DEFAULT_LR)
    if multiplier != "auto" and isinstance(base, int | float):
        train["lr"] = base * multiplier  # relative to tunelab's default lr, or to the extension's train.lr


def _apply_integrations(train: dict[str, Any], integrations: list[IntegrationIn]) -> None:
    """OpenAI's `integrations`: W&B becomes the spec's `report_to` wandb and `train.wandb` (offline, in the job's
    folder, unless the service's WANDB_MODE says otherwise), as `tunelab train --report-to wandb` does."""
    from tunelab.extras import install_hint, missing

    for i, integration in enumerate(integrations):
        where = f"integrations[{i}]"
        if integration.type != "wandb":
            message = f"Unsupported integration type {integration.type!r}: tunelab supports 'wandb' (Weights & Biases)."
            raise bad_request("unsupported_integration", message, f"{where}.type")
        if other := sorted(integration.model_extra or {}):
            param = f"{where}.{other[0]}"
            raise bad_request("unknown_parameter", f"Unrecognized request argument supplied: {param}", param)
        if integration.wandb is None:
            param = f"{where}.wandb"
            raise bad_request("missing_required_parameter", f"Missing required parameter: '{param}'.", param)
        if packages := missing("trackers", ["wandb"]):
            message = (
                f"The W&B integration needs {', '.join(packages)}, which this service does not have installed: "
                f"drop {where} or ask its operator to install it ({install_hint('trackers')})."
            )
            raise bad_request("integration_not_available", message, f"{where}.type")
        if "wandb" in train:
            message = f"{where} and tunelab.spec.train.wandb both set the W&B run: give only one of them."
            raise bad_request("invalid_request", message, where)
        default = TrainSpec.model_fields["report_to"].default
        train["report_to"] = list(dict.fromkeys([*train.get("report_to", default), "wandb"]))
        train["wandb"] = integration.wandb.model_dump(exclude_none=True)


def integrations_of(spec: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A job's `integrations`, as OpenAI returns them: the W&B run its spec logs to, if any."""
    train = spec["train"]
    settings = train.get("wandb")
    if "wandb" not in train.get("report_to", []) or not settings:
        return None
    wandb = {"project": settings["project"], "entity": settings.get("entity"), "name": settings.get("name")}
    return [{"type": "wandb", "wandb": {**wandb, "tags": settings.get("tags") or []}}]


def _seed(train: dict[str, Any], seed: int | None) -> int:
    # train.seed's type was checked strictly (_check_spec_types) and its range is checked by load_spec.
    if seed is not None and "seed" in train and train["seed"] != seed:
        raise bad_request("invalid_request", "seed and tunelab.spec.train.seed differ: give only one.", "seed")
    chosen = seed if seed is not None else train.get("seed")
    return int(chosen) if isinstance(chosen, int) else secrets.randbelow(2**31)


def _spec_error(problems: list[Problem]) -> ApiError:
    first = problems[0].where
    param = {"method.name": "tunelab.method", "task.scenario": "tunelab.scenario"}.get(first, f"tunelab.spec.{first}")
    text = "; ".join(f"{p.where}: {p.message}" + (f" ({p.hint})" if p.hint else "") for p in problems)
    return bad_request("invalid_spec", f"Invalid job spec: {text}", param)


def _files_outcome(settings: ServiceSettings, store: Store, job: JobRow) -> str | dict[str, Any] | None:
    """'pending' while a file is validating, an error object when a file is unusable, None when all are fine."""
    wanted = [("training_file", job.training_file, settings.min_examples)]
    if job.validation_file:
        wanted.append(("validation_file", job.validation_file, 1))
    for param, file_id, minimum in wanted:
        row = store.files.get(job.project_id, file_id)
        if row is None:
            return {"code": "invalid_file", "message": f"File {file_id} was deleted.", "param": param}
        if row.status == "uploaded":
            return "pending"
        if row.status == "error":
            message = f"The {param.replace('_', ' ')} {file_id} is not valid: {row.status_details}"
            return {"code": "invalid_file_format", "message": message, "param": param}
        if (row.n_examples or 0) < minimum:
            name = param.split("_")[0].capitalize()
            message = f"{name} file has {row.n_examples or 0} example(s), but must have at least {minimum} examples"
            return {"code": "invalid_n_examples", "message": message, "param": param}
    return None


def job_dir(settings: ServiceSettings, job_id: str) -> Path:
    return settings.jobs_dir / job_id
