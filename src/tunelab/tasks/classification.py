"""Text classification, generatively: the model answers with the label's name.

Labels come from the spec (`task.labels`) or from the training data. An answer that is no label is scored as
wrong and counted (`unknown_rate`), never a crash. The report gets a confusion matrix.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from tunelab.data.formats import ChatExample, Message
from tunelab.errors import DataError, Problem
from tunelab.metrics import classification_metrics, confusion
from tunelab.tasks.generative import GenerativeTask, Item, instructed

if TYPE_CHECKING:
    from tunelab.config import JobSpec

IMBALANCE = 3.0  # warn when the largest class has this many times the examples of the smallest


class ClassificationTask(GenerativeTask):
    name = "classification"
    max_new_tokens = 8
    required = ("text", "label")

    def __init__(self) -> None:
        self.labels: list[str] = []
        # What happens to a row whose label was never trained (the head approach says its own).
        self.unseen_fate = "they are scored as wrong: the model was never taught them"

    def split(self, spec: JobSpec) -> tuple[list[Item], list[Item]]:
        train, val = super().split(spec)
        self.labels = list(spec.task.labels or sorted({i.reference for i in train}))
        unknown = sorted({i.reference for i in train} - set(self.labels))
        if unknown:
            raise DataError([Problem("task.labels", f"training labels {unknown} are not in task.labels", "add them")])
        # Every prompt names the same choices (the training label set), so train and validation prompts match.
        system = spec.task.instruction or f"Classify the text. Answer with one word: {', '.join(self.labels)}."
        return [_with_system(i, system) for i in train], [_with_system(i, system) for i in val]

    def held_out(self, spec: JobSpec) -> tuple[list[Item], list[Item]]:
        # The training file is read even to score: its label set is what the prompts name and the model learned.
        return self.split(spec)

    def check_split(self, train: list[Item], val: list[Item], spec: JobSpec) -> list[str]:
        """One rule for both approaches: a validation label outside the label set is warned or refused."""
        unseen = [i for i in val if i.reference not in self.labels]
        if not unseen:
            return []
        names = sorted({str(i.reference) for i in unseen})
        lines = ", ".join(str(i.example.line) for i in unseen[:5]) + (", ..." if len(unseen) > 5 else "")
        message = (
            f"{len(unseen)} of {len(val)} row(s) have label(s) {names} that are not among the "
            f"training labels {self.labels} (lines {lines})"
        )
        if spec.data.unseen_labels == "error":
            hint = "add training rows with these labels, list them in task.labels, or set data.unseen_labels: warn"
            raise DataError([Problem("data.validation", message, hint, "unseen_label")])
        return [f"validation: {message}; {self.unseen_fate} (data.unseen_labels: error refuses such files)"]

    def parse(self, row: dict[str, Any], line: int, spec: JobSpec) -> Item:
        text, label = row["text"], row["label"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError("`text` must be a non-empty string")
        if not isinstance(label, str | int) or not str(label).strip():
            raise ValueError("`label` must be a non-empty string (or an integer)")
        label = str(label).strip()
        return Item(instructed(line, "", text, label), label)  # the instruction is set once labels are known

    def check(self, items: list[Item], split: str) -> list[str]:
        counts = Counter(i.reference for i in items)
        if len(counts) < 2:
            return [f"{split}: only one label ({next(iter(counts))}): nothing to tell apart"]
        (top, n_top), (low, n_low) = counts.most_common()[0], counts.most_common()[-1]
        if n_top >= IMBALANCE * n_low:
            return [
                f"{split}: classes are imbalanced ({top}: {n_top}, {low}: {n_low}); accuracy may mislead, read macro-F1"
            ]
        return []

    def score(self, outputs: list[str], items: list[Item], spec: JobSpec) -> tuple[dict[str, float], dict[str, Any]]:
        predicted = [_to_label(o, self.labels) for o in outputs]
        gold = [str(i.reference) for i in items]
        details = {"labels": self.labels, "confusion": confusion(predicted, gold, self.labels)}
        return classification_metrics(predicted, gold, self.labels), details


def _with_system(item: Item, system: str) -> Item:
    messages = [Message("system", system), *item.example.messages[1:]]
    return Item(ChatExample(item.example.line, messages=messages), item.reference)


def _to_label(output: str, labels: list[str]) -> str:
    """The label an answer names: exact match first, then the only label its first line mentions."""
    first = output.strip().splitlines()[0].strip().strip(".!").lower() if output.strip() else ""
    by_lower = {label.lower(): label for label in labels}
    if first in by_lower:
        return by_lower[first]
    mentioned = [label for label in labels if label.lower() in first]
    return mentioned[0] if len(mentioned) == 1 else output.strip()[:40]
