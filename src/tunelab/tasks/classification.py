"""Text classification, generatively: the model answers with the label's name.

Labels come from the spec (`task.labels`) or from the training data. Two ways to score (`eval.classification`):
- constrained (`accuracy`, `macro_f1`): each label's log-likelihood as the assistant's answer, in the format the
  model is trained on; the likeliest label is the prediction. Every prediction is a label, so a base model that
  would answer in a sentence is still measured on the task, and it costs one short forward pass per label.
- generated (`generated_accuracy`, `generated_macro_f1`): the greedy free answer, parsed; an answer that is no
  label is scored as wrong and counted (`unknown_rate`), never a crash. What a user of the model would see.
The report gets the confusion matrix of the constrained predictions (of the generated ones with `generate`).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from tunelab.data.formats import ChatExample, Message
from tunelab.data.render import generation_prompt, tokenize
from tunelab.errors import DataError, Problem
from tunelab.evaluate import Generation, choice_logps, choice_scores, loss_metrics_of, prompt_learning
from tunelab.metrics import classification_metrics, confusion
from tunelab.tasks.base import Evaluation, TaskData
from tunelab.tasks.generative import GenerativeTask, Item, instructed
from tunelab.tasks.registry import ScenarioInfo, register_scenario

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
        """The generated answers' metrics (`generated_*`, `unknown_rate`)."""
        predicted = [_to_label(o, self.labels) for o in outputs]
        gold = [str(i.reference) for i in items]
        details = {"labels": self.labels, "confusion": confusion(predicted, gold, self.labels)}
        scores = classification_metrics(predicted, gold, self.labels)
        named = {f"generated_{k}" if k != "unknown_rate" else k: v for k, v in scores.items()}
        return named, details

    def evaluate(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: TaskData, spec: JobSpec
    ) -> Evaluation:
        mode = spec.eval.classification
        if mode == "generate":  # the loss pass, and free answers for `eval.generations` rows
            return super().evaluate(model, tokenizer, data, spec)
        items = [i for i in data.val_items if isinstance(i, Item)][: spec.eval.max_examples]
        predicted, loss = self._scored(model, tokenizer, items)
        # The reference answers' loss came with the label scores when it could; a loss pass otherwise.
        loss = loss or self.loss_metrics(model, tokenizer, data, spec)
        generated = self.with_answers(model, tokenizer, data, spec, loss) if mode == "both" else Evaluation(loss, [])
        gold = [str(i.reference) for i in items]
        scores = classification_metrics(predicted, gold, self.labels)
        del scores["unknown_rate"]  # an argmax over the labels always names one
        details = {"labels": self.labels, "confusion": confusion(predicted, gold, self.labels)}
        # Without free answers, the report's samples show the constrained predictions.
        samples = generated.samples or _samples(items, predicted, tokenizer)[: spec.eval.samples]
        return Evaluation(generated.metrics | scores, samples, details)

    def constrained(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, items: list[Item]) -> list[str]:
        """Each item's likeliest label as the answer (ties go to the first label)."""
        scores = label_logps(model, tokenizer, items, self.labels)
        return [self.labels[max(range(len(row)), key=row.__getitem__)] for row in scores]

    def _scored(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, items: list[Item]
    ) -> tuple[list[str], dict[str, float] | None]:
        """(predicted labels, the reference answers' loss metrics): the reference is one of the scored labels, so
        its loss comes free with them. None where it does not (a label unseen in training, prompt learning)."""
        gold = [str(i.reference) for i in items]
        if prompt_learning(model) or not set(gold) <= set(self.labels):
            return self.constrained(model, tokenizer, items), None
        choices = [[tokenize(_answered(i.example, label), tokenizer) for label in self.labels] for i in items]
        scores = choice_scores(model, choices, int(tokenizer.pad_token_id))
        predicted = [self.labels[max(range(len(row)), key=lambda k: row[k].logp)] for row in scores]
        references = [row[self.labels.index(g)] for row, g in zip(scores, gold, strict=True)]
        return predicted, loss_metrics_of(references)


def label_logps(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, items: list[Item], labels: list[str]
) -> list[list[float]]:
    """For each item, each label's log-likelihood as the assistant's answer: the same rendering and loss mask as
    training (the label's tokens and the end-of-turn token), so a label that is a prefix of another is not
    favoured for being short: the longer one pays for its extra tokens, the shorter one for ending the turn.
    Not truncated at train.max_seq_len: a cut prompt would lose the answer being scored."""
    choices = [[tokenize(_answered(i.example, label), tokenizer) for label in labels] for i in items]
    return choice_logps(model, choices, int(tokenizer.pad_token_id))


def _answered(example: ChatExample, answer: str) -> ChatExample:
    return ChatExample(example.line, messages=[*example.messages[:-1], Message("assistant", answer)])


def _samples(items: list[Item], predicted: list[str], tokenizer: PreTrainedTokenizerBase) -> list[Generation]:
    prompts = [generation_prompt(i.example, tokenizer) for i in items]
    return [Generation(p, ref, out) for (p, ref), out in zip(prompts, predicted, strict=True)]


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


register_scenario(ScenarioInfo(ClassificationTask.name, ClassificationTask))
