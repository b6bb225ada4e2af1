"""Request and response bodies. Response shapes follow the `openai` package's types (FileObject, FineTuningJob,
FineTuningJobEvent, FineTuningJobCheckpoint, Model, ChatCompletion, cursor pages), so its client parses them."""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Requests.


class Hyperparameters(_Request):
    n_epochs: Literal["auto"] | PositiveInt = "auto"
    batch_size: Literal["auto"] | PositiveInt = "auto"
    learning_rate_multiplier: Literal["auto"] | PositiveFloat = "auto"


class Supervised(_Request):
    hyperparameters: Hyperparameters = Hyperparameters()


class DpoHyperparameters(Hyperparameters):
    beta: Literal["auto"] | Annotated[float, Field(gt=0, le=10)] = "auto"


class DpoIn(_Request):
    hyperparameters: DpoHyperparameters = DpoHyperparameters()


class MethodIn(_Request):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: Supervised | None = None
    dpo: DpoIn | None = None
    reinforcement: dict[str, Any] | None = None


class TunelabOptions(_Request):
    """tunelab's extension of the job request (`extra_body={"tunelab": {...}}` with the openai client)."""

    scenario: str = Field("chat", description="The JobSpec's task.scenario.")
    method: str = Field("lora", description="A tunelab method: lora, dora, rslora, ia3, ... (`tunelab methods`).")
    spec: dict[str, Any] = Field(
        default_factory=dict,
        description="Further JobSpec fields by section (method, task, train, checkpoints, eval), validated as in YAML.",
    )


class JobCreate(_Request):
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None  # checked by jobs.create_job: up to 64 of [A-Za-z0-9._-]
    seed: int | None = None
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16
    )
    method: MethodIn | None = None
    hyperparameters: Hyperparameters | None = None  # deprecated by OpenAI in favour of method; still accepted
    integrations: list[dict[str, Any]] | None = None
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
    integrations: list[dict[str, Any]] | None = None
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
