"""Request and response bodies. Response shapes follow the `openai` package's types (FileObject, FineTuningJob,
FineTuningJobEvent, FineTuningJobCheckpoint, Model, ChatCompletion, cursor pages), so its client parses them."""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")
# Bounds are what a CPU can train on, not what a type can hold: an n_epochs of 2**63 overflowed the database's
# progress columns in the worker. The JobSpec bounds the same fields again (tunelab.config), for YAML specs too.
MAX_EPOCHS = 1000
MAX_BATCH = 4096
MAX_LR_MULTIPLIER = 1000.0
MAX_SEED = 2**32 - 1  # numpy's seeds end here; torch's and the database's later
Epochs = Annotated[int, Field(gt=0, le=MAX_EPOCHS)]
BatchSize = Annotated[int, Field(gt=0, le=MAX_BATCH)]
Multiplier = Annotated[float, Field(gt=0, le=MAX_LR_MULTIPLIER, allow_inf_nan=False)]
Name = Annotated[str, Field(min_length=1, max_length=256)]


class _Request(BaseModel):
    # Strict: "8" or true is no batch size. OpenAI refuses them; coercing them hid client bugs.
    model_config = ConfigDict(extra="forbid", strict=True)


# Requests.


class Hyperparameters(_Request):
    n_epochs: Literal["auto"] | Epochs = "auto"
    batch_size: Literal["auto"] | BatchSize = "auto"
    learning_rate_multiplier: Literal["auto"] | Multiplier = "auto"


class Supervised(_Request):
    hyperparameters: Hyperparameters = Hyperparameters()


class DpoHyperparameters(Hyperparameters):
    beta: Literal["auto"] | Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] = "auto"


class DpoIn(_Request):
    hyperparameters: DpoHyperparameters = DpoHyperparameters()


class MethodIn(_Request):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: Supervised | None = None
    dpo: DpoIn | None = None
    reinforcement: dict[str, Any] | None = None


class ResourcesIn(_Request):
    """What one job reserves on a Ray cluster (`tunelab service --executor ray`); unset fields: the service's
    defaults (--ray-cpus-per-job, --ray-gpus-per-job, --ray-memory-mb-per-job). Local workers ignore it."""

    cpus: float | None = Field(None, gt=0, le=1024, description="CPUs (Ray num_cpus).")
    gpus: float | None = Field(None, ge=0, le=64, description="GPUs (Ray num_gpus).")
    memory_mb: int | None = Field(None, gt=0, description="Memory in MiB (Ray memory).")


class TunelabOptions(_Request):
    """tunelab's extension of the job request (`extra_body={"tunelab": {...}}` with the openai client)."""

    scenario: Name = Field("chat", description="The JobSpec's task.scenario.")
    method: Name = Field("lora", description="A tunelab method: lora, dora, rslora, ia3, ... (`tunelab methods`).")
    spec: dict[str, Any] = Field(
        default_factory=dict,
        description="Further JobSpec fields by section (method, task, train, checkpoints, eval), validated as in YAML.",
    )
    resources: ResourcesIn | None = Field(None, description="What the job reserves on a Ray cluster.")


class WandbIn(_Request):
    """OpenAI's W&B integration settings (FineTuningJobWandbIntegration); tunelab's `train.wandb`."""

    project: Annotated[str, Field(min_length=1, max_length=128)]
    entity: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    name: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(None, max_length=50)


class IntegrationIn(BaseModel):
    # Other keys are allowed here so that an unsupported type (`{"type": "comet", "comet": {...}}`) is refused by its
    # type, naming `integrations[i].type` (jobs.create_job), rather than by its settings' key.
    model_config = ConfigDict(extra="allow", strict=True)

    type: Name
    wandb: WandbIn | None = None


class JobCreate(_Request):
    model: Name
    training_file: Name
    validation_file: Name | None = None
    suffix: Annotated[str, Field(max_length=64)] | None = None  # jobs.create_job: up to 64 of [A-Za-z0-9._-]
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16
    )
    method: MethodIn | None = None
    hyperparameters: Hyperparameters | None = None  # deprecated by OpenAI in favour of method; still accepted
    integrations: list[IntegrationIn] | None = Field(None, max_length=16)
    tunelab: TunelabOptions = TunelabOptions()


# Responses.


class ErrorInfo(BaseModel):
    code: str
    message: str
    param: str | None = None


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = None
    expires_at: int | None = None
    tunelab: dict[str, Any] | None = Field(
        None, description="tunelab's extension (retrieve only): n_examples and problems [{line, code, message, hint}]."
    )


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class JobHyperparameters(BaseModel):
    n_epochs: Literal["auto"] | int | float
    batch_size: Literal["auto"] | int
    learning_rate_multiplier: Literal["auto"] | float


class JobSupervised(BaseModel):
    hyperparameters: JobHyperparameters


class JobDpoHyperparameters(JobHyperparameters):
    beta: float


class JobDpo(BaseModel):
    hyperparameters: JobDpoHyperparameters


class JobMethod(BaseModel):
    type: Literal["supervised", "dpo"] = "supervised"
    supervised: JobSupervised | None = None
    dpo: JobDpo | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: ErrorInfo | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: JobHyperparameters
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: str  # OpenAI's statuses, plus "paused" (pause/resume)
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = Field(None, max_length=16)
    metadata: dict[str, str] | None = None
    method: JobMethod
    tunelab: dict[str, Any] = Field(description="tunelab's extension: scenario, method and the resolved JobSpec.")


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    data: dict[str, Any] | None = None
    type: str


class CheckpointMetrics(BaseModel):
    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class JobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


class ListPage(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None

    @classmethod
    def of(cls, items: list[T], has_more: bool = False) -> ListPage[T]:
        ids = [getattr(i, "id", None) for i in items]
        return cls(data=items, has_more=has_more, first_id=ids[0] if ids else None, last_id=ids[-1] if ids else None)
