"""What every scenario's task provides (`Task`) and returns (`TaskData`, `Evaluation`).

Kept apart from the package's `__init__`, which imports every scenario module to register it: the scenario
modules import these names from here, so no module imports a package that is still importing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from tunelab.config import JobSpec
    from tunelab.data.packing import Row
    from tunelab.evaluate import Generation
    from tunelab.models import ModelSource
    from tunelab.train.objectives import Objective


@dataclass
class TaskData:
    train_rows: list[Row]
    val_rows: list[Row]
    n_train_examples: int
    n_val_examples: int
    warnings: list[str] = field(default_factory=list)
    val_items: list[object] = field(default_factory=list)  # what generations are drawn from (task-specific)
    objective: Objective | None = None  # what training minimises; None: the model's own loss (CausalLM)
    sources: str = ""  # what was read: a saved DatasetDict's split, each training file's share of a mixture


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    samples: list[Generation]
    details: dict[str, Any] = field(default_factory=dict)  # task-specific, e.g. a confusion matrix


class Task(Protocol):
    name: str
    lower_is_better: frozenset[str]

    def check_data(self, spec: JobSpec) -> list[str]:
        """Read and check the spec's data files as `prepare` does, without a tokenizer (`tunelab data validate`):
        a DataError lists every bad row; the returned warnings are those training would print."""
        ...

    def prepare(self, spec: JobSpec, tokenizer: PreTrainedTokenizerBase) -> TaskData: ...

    def prepare_eval(self, spec: JobSpec, tokenizer: PreTrainedTokenizerBase) -> TaskData:
        """The validation rows alone, for scoring (`tunelab eval`): no training rows are tokenized, and the
        training file is read only when the validation split or the label set comes from it."""
        ...

    def load_model(self, source: ModelSource, quantization: Any = None) -> torch.nn.Module:
        """The model with this task's head (after `prepare`: a classification head's size comes from the data)."""
        ...

    def evaluate(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: TaskData, spec: JobSpec
    ) -> Evaluation: ...
