"""Scenarios. A task turns data files into training rows, loads the model with the head it trains, and scores a
model on held-out data.

Each scenario is one module with a class satisfying `Task` (`tunelab.tasks.base`) that registers itself in
`tunelab.tasks.registry`; importing this package imports every scenario module, so the registry is complete.
The generative tasks train the language-model head; `classification_head` and `ner_head` train a classification
head (the `head` approach of their scenario).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunelab.errors import DataError, Problem
from tunelab.tasks import (
    chat,
    classification,
    classification_head,
    creative,
    domain,
    ner,
    ner_head,
    preference,
    qa,
    translation,
)
from tunelab.tasks.base import Evaluation, Task, TaskData
from tunelab.tasks.registry import ScenarioInfo, get_task, head_scenarios, register_scenario, scenario_names

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tunelab.config import JobSpec


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


__all__ = [
    "DataCheck",
    "Evaluation",
    "ScenarioInfo",
    "Task",
    "TaskData",
    "chat",
    "check_data",
    "classification",
    "classification_head",
    "creative",
    "domain",
    "get_task",
    "head_scenarios",
    "ner",
    "ner_head",
    "preference",
    "qa",
    "register_scenario",
    "scenario_names",
    "translation",
]
