"""Chat scenario: OpenAI chat JSONL or prompt/completion JSONL; loss on the assistant replies."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from tunelab.data.formats import ChatExample
from tunelab.data.packing import pack, unpacked
from tunelab.data.render import Tokenized, tokenize
from tunelab.data.validate import load_chat_examples
from tunelab.errors import DataError, Problem
from tunelab.evaluate import language_metrics, sample_generations
from tunelab.tasks import Evaluation, TaskData

if TYPE_CHECKING:
    from tunelab.config import JobSpec


class ChatTask:
    name = "chat"
    lower_is_better = frozenset({"loss", "perplexity"})

    def prepare(self, spec: JobSpec, tokenizer: PreTrainedTokenizerBase) -> TaskData:
        train, val = _split(spec)
        warnings: list[str] = []
        train_tok = _tokenize_all(train, tokenizer, spec, warnings, "train")
        val_tok = _tokenize_all(val, tokenizer, spec, warnings, "validation")
        to_rows = (lambda t: pack(t, spec.train.max_seq_len)) if spec.packing else unpacked
        return TaskData(to_rows(train_tok), to_rows(val_tok), len(train_tok), len(val_tok), warnings, list(val))

    def evaluate(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: TaskData, spec: JobSpec
    ) -> Evaluation:
        rows = data.val_rows[: spec.eval.max_examples] if spec.eval.max_examples else data.val_rows
        metrics = language_metrics(model, rows, tokenizer.pad_token_id, spec.packing, spec.train.batch_size)
        examples = [e for e in data.val_items if isinstance(e, ChatExample)][: spec.eval.samples]
        return Evaluation(metrics, sample_generations(model, tokenizer, examples, spec.eval.max_new_tokens))


def _split(spec: JobSpec) -> tuple[list[ChatExample], list[ChatExample]]:
    train = load_chat_examples(spec.data.train, spec.data.format)
    if spec.data.validation is not None:
        return train, load_chat_examples(spec.data.validation, spec.data.format, min_examples=1)
    shuffled = train[:]
    random.Random(spec.train.seed).shuffle(shuffled)
    n_val = max(1, round(len(shuffled) * spec.data.validation_split))
    if n_val >= len(shuffled):
        raise DataError(
            [
                Problem(
                    "data.validation_split",
                    f"{len(train)} examples cannot be split",
                    "give data.validation or more training examples",
                )
            ]
        )
    return shuffled[n_val:], shuffled[:n_val]


def _tokenize_all(
    examples: list[ChatExample],
    tokenizer: PreTrainedTokenizerBase,
    spec: JobSpec,
    warnings: list[str],
    split: str,
) -> list[Tokenized]:
    done = [tokenize(e, tokenizer, spec.train.max_seq_len, spec.task.train_on_prompt) for e in examples]
    truncated = sum(t.truncated for t in done)
    if truncated:
        warnings.append(
            f"{split}: {truncated} example(s) longer than train.max_seq_len={spec.train.max_seq_len} were truncated"
        )
    kept = [t for t in done if t.n_trained > 0]
    if len(kept) < len(done):
        warnings.append(
            f"{split}: {len(done) - len(kept)} example(s) had no trained token left after truncation "
            "and were dropped; raise train.max_seq_len"
        )
    if not kept:
        raise DataError(
            [
                Problem(
                    f"data.{split}",
                    "no example has a trained token",
                    "check the assistant messages / completions and train.max_seq_len",
                )
            ]
        )
    return kept
