"""Scenarios. A task turns data files into training rows, loads the model with the head it trains, and scores a
model on held-out data.

Each scenario is one module with a class satisfying `Task`; `get_task(name, approach)` finds it. The generative
tasks train the language-model head; `classification_head` and `ner_head` train a classification head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from tunelab.errors import DataError, Problem

if TYPE_CHECKING:
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


@dataclass(frozen=True)
class DataCheck:
    errors: list[Problem]
    warnings: list[str]
    n_examples: int | None = None  # training examples kept (counted when a tokenizer is given)

    @property
    def ok(self) -> bool:
        return not self.errors


def check_data(spec: JobSpec, tokenizer: PreTrainedTokenizerBase | None = None) -> DataCheck:
    """The spec's data checked by its scenario's own task, as training reads it: every bad row as an error;
    with a tokenizer, the data is also tokenized as training does, so length warnings are those `train` prints."""
    task = get_task(spec.task.scenario, spec.task.approach)
    try:
        if tokenizer is None:
            return DataCheck([], task.check_data(spec))
        data = task.prepare(spec, tokenizer)
    except DataError as exc:
        return DataCheck(exc.problems, [])
    return DataCheck([], data.warnings, data.n_train_examples)


def get_task(name: str, approach: str = "generative") -> Task:
    """The scenario's task (names and approaches are checked by the JobSpec first)."""
    if approach == "head":
        from tunelab.tasks.classification_head import ClassificationHeadTask
        from tunelab.tasks.ner_head import NerHeadTask

        heads: dict[str, Task] = {"classification": ClassificationHeadTask(), "ner": NerHeadTask()}
        return heads[name]
    from tunelab.tasks.chat import ChatTask
    from tunelab.tasks.classification import ClassificationTask
    from tunelab.tasks.creative import CreativeTask
    from tunelab.tasks.domain import DomainTask
    from tunelab.tasks.ner import NerTask
    from tunelab.tasks.preference import PreferenceTask
    from tunelab.tasks.qa import QaTask
    from tunelab.tasks.translation import TranslationTask

    tasks: dict[str, Task] = {
        t.name: t
        for t in (
            ChatTask(),
            ClassificationTask(),
            NerTask(),
            TranslationTask(),
            QaTask(),
            DomainTask(),
            CreativeTask(),
            PreferenceTask(),
        )
    }
    return tasks[name]
