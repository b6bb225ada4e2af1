"""Text classification with a sequence-classification head (`task.approach: head`): the base model reads the text
and a new linear layer on its last token scores each label; the prediction is the argmax, always a label.

Rows are read and checked by the generative ClassificationTask (same fields, label set, warnings), so both
approaches take the same files. Metrics: validation loss, accuracy, macro-F1 and the confusion matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from tunelab.data.packing import Row
from tunelab.evaluate import Generation
from tunelab.metrics import LOWER_IS_BETTER, classification_metrics, confusion
from tunelab.tasks.base import Evaluation, TaskData
from tunelab.tasks.classification import ClassificationTask
from tunelab.tasks.generative import Item
from tunelab.tasks.heads import load_head_model, predict, start_token, truncation_warning
from tunelab.tasks.registry import ScenarioInfo, register_scenario

if TYPE_CHECKING:
    from tunelab.config import JobSpec
    from tunelab.models import ModelSource


@dataclass(frozen=True)
class Text:
    text: str
    label: str


class ClassificationHeadTask:
    name = "classification"
    lower_is_better = LOWER_IS_BETTER

    def __init__(self) -> None:
        self.reader = ClassificationTask()
        self.reader.unseen_fate = "they are left out of the scores: the head has no output for them"
        self.labels: list[str] = []
        self.pad_id = 0

    def check_data(self, spec: JobSpec) -> list[str]:
        return self.reader.check_data(spec)

    def prepare(self, spec: JobSpec, tokenizer: PreTrainedTokenizerBase) -> TaskData:
        train_items, val_items = self.reader.split(spec)
        warnings = self.reader.check(train_items, "train")
        return self._encode(train_items, val_items, spec, tokenizer, warnings)

    def prepare_eval(self, spec: JobSpec, tokenizer: PreTrainedTokenizerBase) -> TaskData:
        _, val_items = self.reader.held_out(spec)  # the training labels (read here) size the head
        return self._encode([], val_items, spec, tokenizer, [])

    def _encode(
        self,
        train_items: list[Item],
        val_items: list[Item],
        spec: JobSpec,
        tokenizer: PreTrainedTokenizerBase,
        warnings: list[str],
    ) -> TaskData:
        self.labels, self.pad_id = self.reader.labels, int(tokenizer.pad_token_id)
        warnings += self.reader.check_split(train_items, val_items, spec)
        train = _texts(train_items)
        val = [t for t in _texts(val_items) if t.label in self.labels]  # the rest were warned about just above
        rows: dict[str, list[Row]] = {}
        for split, texts in (("train", train), ("validation", val)):
            encoded = [encode(t, self.labels.index(t.label), tokenizer, spec.train.max_seq_len) for t in texts]
            rows[split] = [row for row, _ in encoded]
            warnings += truncation_warning(split, sum(cut for _, cut in encoded), spec.train.max_seq_len)
        return TaskData(
            rows["train"], rows["validation"], len(train), len(val), warnings, list(val), sources=self.reader.sources
        )

    def load_model(self, source: ModelSource, quantization: Any = None) -> torch.nn.Module:
        return load_head_model(source, "sequence", self.labels, self.pad_id)

    def evaluate(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: TaskData, spec: JobSpec
    ) -> Evaluation:
        n = spec.eval.max_examples or len(data.val_rows)
        texts = [t for t in data.val_items if isinstance(t, Text)][:n]
        predictions = predict(model, data.val_rows[:n], self.pad_id, spec.train.batch_size)
        predicted = [self.labels[ids[0]] for ids in predictions.ids]
        gold = [t.label for t in texts]
        scores = classification_metrics(predicted, gold, self.labels)
        del scores["unknown_rate"]  # an argmax always names a label
        details = {"labels": self.labels, "confusion": confusion(predicted, gold, self.labels)}
        samples = [Generation(t.text, t.label, p) for t, p in zip(texts, predicted, strict=True)]
        return Evaluation({"loss": predictions.loss, **scores}, samples[: spec.eval.samples], details)


def encode(text: Text, label_id: int, tokenizer: PreTrainedTokenizerBase, max_len: int) -> tuple[Row, bool]:
    """The start token and the text, cut to `max_len` tokens in all (and whether it was cut); the label is the
    row's one class id."""
    ids = [start_token(tokenizer), *tokenizer(text.text, add_special_tokens=False)["input_ids"]]
    kept = ids[:max_len]
    return Row(kept, [label_id], list(range(len(kept))), sequence_label=True), len(ids) > max_len


def _texts(items: list[Item]) -> list[Text]:
    return [Text(next(m.content for m in i.example.messages if m.role == "user"), i.reference) for i in items]


register_scenario(ScenarioInfo(ClassificationHeadTask.name, ClassificationHeadTask, approach="head"))
