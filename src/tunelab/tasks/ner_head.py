"""Named-entity recognition with a token-classification head (`task.approach: head`): the model tags every word
with a BIO label (O, B-type, I-type), scored at entity level with seqeval on the words' tags, as the generative
variant is.

Words become sub-tokens through the fast tokenizer's `word_ids()`: a word's first sub-token carries the word's
label, its other sub-tokens -100 (skipped by the loss), so each word counts once in the loss and is predicted once.
Each word after the first is given with its leading space, so the sub-tokens are those of the sentence as plain
text: a byte-level BPE (SmolLM2, Llama 3, Qwen) encodes " York" as "ĠYork", the way the model saw words in
pretraining, while a bare "York" would be split differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from tunelab.data.packing import Row
from tunelab.data.render import IGNORE
from tunelab.evaluate import Generation
from tunelab.metrics import LOWER_IS_BETTER, entity_metrics
from tunelab.tasks.base import Evaluation, TaskData
from tunelab.tasks.generative import Item
from tunelab.tasks.heads import load_head_model, predict, start_token, truncation_warning
from tunelab.tasks.ner import NerTask, entities_text
from tunelab.tasks.registry import ScenarioInfo, register_scenario

if TYPE_CHECKING:
    from tunelab.config import JobSpec
    from tunelab.models import ModelSource


@dataclass(frozen=True)
class Sentence:
    tokens: list[str]
    tags: list[str]
    words: list[int]  # the words whose first sub-token is in the row (all of them unless the row was cut)


class NerHeadTask:
    name = "ner"
    lower_is_better = LOWER_IS_BETTER

    def __init__(self) -> None:
        self.reader = NerTask()
        self.labels: list[str] = []
        self.pad_id = 0
        self.o_weight = 1.0  # task.o_weight, read by load_model for the training loss

    def check_data(self, spec: JobSpec) -> list[str]:
        return self.reader.check_data(spec)

    def prepare_eval(self, spec: JobSpec, tokenizer: PreTrainedTokenizerBase) -> TaskData:
        """Only the validation rows are encoded; the training file, if read to split it, sizes the head too."""
        train_items, val_items = self.reader.held_out(spec)
        self.labels = bio_labels([i.reference[1] for i in train_items + val_items])
        self.pad_id = int(tokenizer.pad_token_id)
        warnings: list[str] = []
        val_rows, sentences = self._encode_split(val_items, tokenizer, spec, "validation", warnings)
        return TaskData([], val_rows, 0, len(val_items), warnings, list(sentences))

    def prepare(self, spec: JobSpec, tokenizer: PreTrainedTokenizerBase) -> TaskData:
        train_items, val_items = self.reader.split(spec)
        # Types seen in either split: every tag the head is scored on needs an output (a type seen only in
        # validation gets one it never learns, and its entities count as missed).
        self.labels = bio_labels([i.reference[1] for i in train_items + val_items])
        self.pad_id = int(tokenizer.pad_token_id)
        self.o_weight = spec.task.o_weight
        warnings: list[str] = []
        train_rows, _ = self._encode_split(train_items, tokenizer, spec, "train", warnings)
        val_rows, sentences = self._encode_split(val_items, tokenizer, spec, "validation", warnings)
        return TaskData(
            train_rows,
            val_rows,
            len(train_items),
            len(val_items),
            warnings,
            list(sentences),
            sources=self.reader.sources,
        )

    def _encode_split(
        self, items: list[Item], tokenizer: PreTrainedTokenizerBase, spec: JobSpec, split: str, warnings: list[str]
    ) -> tuple[list[Row], list[Sentence]]:
        encoded = [self._encode(i, tokenizer, spec.train.max_seq_len, spec.task.context) for i in items]
        cut = sum(len(s.words) < len(s.tokens) for _, s in encoded)
        warnings += truncation_warning(split, cut, spec.train.max_seq_len)
        return [row for row, _ in encoded], [sentence for _, sentence in encoded]

    def _encode(
        self, item: Item, tokenizer: PreTrainedTokenizerBase, max_len: int, context: str
    ) -> tuple[Row, Sentence]:
        tokens, tags = item.reference
        ids, word_ids = encode_words(list(tokens), tokenizer, repeat=context == "repeat")
        labels = align_labels(word_ids, [self.labels.index(t) for t in tags])[:max_len]
        words = [w for w, label in zip(word_ids, labels, strict=False) if w is not None and label != IGNORE]
        return Row(ids[:max_len], labels, list(range(len(labels)))), Sentence(list(tokens), list(tags), words)

    def load_model(self, source: ModelSource, quantization: Any = None) -> torch.nn.Module:
        weights = [self.o_weight if label == "O" else 1.0 for label in self.labels]
        return load_head_model(source, "token", self.labels, self.pad_id, None if self.o_weight == 1 else weights)

    def evaluate(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: TaskData, spec: JobSpec
    ) -> Evaluation:
        n = spec.eval.max_examples or len(data.val_rows)
        sentences = [s for s in data.val_items if isinstance(s, Sentence)][:n]
        predictions = predict(model, data.val_rows[:n], self.pad_id, spec.train.batch_size)
        predicted = [self._tags(s, ids) for s, ids in zip(sentences, predictions.ids, strict=True)]
        metrics = {"loss": predictions.loss, **entity_metrics(predicted, [s.tags for s in sentences])}
        samples = [
            Generation(" ".join(s.tokens), entities_text(s.tokens, s.tags), entities_text(s.tokens, tags))
            for s, tags in zip(sentences[: spec.eval.samples], predicted, strict=False)
        ]
        return Evaluation(metrics, samples)

    def _tags(self, sentence: Sentence, ids: list[int]) -> list[str]:
        """Word-level tags: each word's prediction is its first sub-token's; a word cut off is tagged O."""
        tags = ["O"] * len(sentence.tokens)
        for word, label_id in zip(sentence.words, ids, strict=True):
            tags[word] = self.labels[label_id]
        return tags


def bio_labels(tag_lists: list[list[str]]) -> list[str]:
    """O, then B- and I- of every entity type (both, so the head can tag entities of any length)."""
    types = sorted({tag[2:] for tags in tag_lists for tag in tags if tag != "O"})
    return ["O", *(f"{prefix}-{kind}" for kind in types for prefix in ("B", "I"))]


def encode_words(
    words: list[str], tokenizer: PreTrainedTokenizerBase, repeat: bool = False
) -> tuple[list[int], list[int | None]]:
    """Token ids of a row (the start token, then the words' sub-tokens) and each token's word index (None for
    the start token). With `repeat` the sentence is given twice and only the second copy's tokens map to words:
    in a causal model a token sees only what precedes it, so the second copy's tokens have seen the whole
    sentence (the right context that tells "Paris Hilton" from "Paris") — the cost is twice the tokens."""
    copies = words + words if repeat else words
    spaced = [copies[0], *(" " + w for w in copies[1:])]
    encoding = tokenizer(spaced, is_split_into_words=True, add_special_tokens=False)
    first = len(copies) - len(words)  # the tagged copy's first word
    word_ids = [None if w is None or w < first else w - first for w in encoding.word_ids()]
    return [start_token(tokenizer), *encoding["input_ids"]], [None, *word_ids]


def align_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """Sub-token labels: the first sub-token of each word gets the word's label; the word's other sub-tokens and
    the tokens of no word get IGNORE (-100)."""
    labels: list[int] = []
    previous: int | None = None
    for word in word_ids:
        labels.append(IGNORE if word is None or word == previous else word_labels[word])
        previous = word
    return labels


register_scenario(ScenarioInfo(NerHeadTask.name, NerHeadTask, approach="head"))
