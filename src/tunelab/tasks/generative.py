"""The shared shape of every generative scenario.

A scenario turns each data row into an `Item`: a ChatExample (what is trained: a conversation, or a prompt and its
completion) and the reference its metric needs. Training minimises the loss on the answer tokens; evaluation
measures loss/perplexity on the validation rows, then generates answers greedily for the first
`eval.generations` validation items and scores them with the scenario's metric. A subclass says how rows become
items (`parse`) and how answers are scored (`score`); everything else is here.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from transformers import PreTrainedTokenizerBase

from tunelab.data.formats import ChatExample, Message
from tunelab.data.mixing import mix
from tunelab.data.packing import pack, unpacked
from tunelab.data.readers import mapped, read_records, saved_split
from tunelab.data.render import Tokenized, generation_prompt, tokenize, windows
from tunelab.errors import DataError, Problem, summarize
from tunelab.evaluate import Generation, generate_batch, language_metrics
from tunelab.metrics import LOWER_IS_BETTER
from tunelab.models import ModelSource, load_model
from tunelab.tasks.base import Evaluation, TaskData

if TYPE_CHECKING:
    from tunelab.config import DataSource, JobSpec


@dataclass(frozen=True)
class Item:
    example: ChatExample
    reference: Any  # what `score` compares a generated answer with


def instructed(line: int, system: str, user: str, answer: str) -> ChatExample:
    """A one-turn conversation: the scenario's instruction, the input, the answer to learn."""
    return ChatExample(line, messages=[Message("system", system), Message("user", user), Message("assistant", answer)])


class GenerativeTask(ABC):
    name: str = ""
    lower_is_better: frozenset[str] = LOWER_IS_BETTER
    max_new_tokens: int = 48  # long enough for this scenario's answers
    required: tuple[str, ...] = ()  # fields every row must have
    sampling: ClassVar[dict[str, float]] = {}  # empty: greedy decoding (deterministic answers to score)
    windowed: bool = False  # raw text: an example longer than train.max_seq_len becomes several rows, not cut
    sources: str = ""  # after `split`: the DatasetDict splits read, each file's share of a mixture (`data:` line)

    @abstractmethod
    def parse(self, row: dict[str, Any], line: int, spec: JobSpec) -> Item:
        """One row as an Item. Raise ValueError with a message that says how to fix the row."""

    @abstractmethod
    def score(self, outputs: list[str], items: list[Item], spec: JobSpec) -> tuple[dict[str, float], dict[str, Any]]:
        """Metrics of the generated answers, and details for the report (e.g. a confusion matrix)."""

    def check(self, items: list[Item], split: str) -> list[str]:
        """Warnings about a whole split (e.g. class imbalance)."""
        return []

    def check_split(self, train: list[Item], val: list[Item], spec: JobSpec) -> list[str]:
        """Warnings (or a DataError) about validation against training (e.g. labels never trained)."""
        return []

    # -- loading ---------------------------------------------------------------------------------------------
    def load(self, path: Path, spec: JobSpec, split: str = "train") -> list[Item]:
        """Every row parsed; every bad row reported at once, with its line (a problem repeated on many rows once,
        with its count and the columns the file has). `split` picks a saved DatasetDict's split."""
        records = read_records(path, split)
        items: list[Item] = []
        problems: list[Problem] = []
        for row in records:
            where = row.where(path)
            data = mapped(row.data, spec.data.columns)
            missing = [f for f in self.required if f not in data]
            if missing:
                problems.append(Problem(where, f"missing field(s) {missing}", code="missing_field"))
                continue
            try:
                items.append(self.parse(data, row.line, spec))
            except (ValueError, TypeError) as exc:
                problems.append(Problem(where, str(exc), code="invalid_row"))
        if problems:
            columns = sorted(records[0].data) if records else []
            raise DataError(summarize(problems, path.name, self._columns_hint(columns, spec)))
        if not items:
            raise DataError([Problem(str(path), "no rows", "the file is empty")])
        return items

    def _columns_hint(self, columns: list[str], spec: JobSpec) -> dict[str, str]:
        """The hint for missing fields: what the rows need, what the file has, how to map one to the other."""
        fields = [f for f in self.required if f not in columns and f not in spec.data.columns]
        if not fields:
            return {}
        spare = [c for c in columns if c not in self.required and c not in spec.data.columns.values()]
        # The mapping is guessed only when it is unambiguous: one field missing, one column unused. Two and two
        # could be paired either way (an NER file checked as classification got {text: tags, label: tokens}).
        pairs = list(zip(fields, spare if len(spare) == len(fields) == 1 else ["<column>"] * len(fields), strict=True))
        mapping = ", ".join(f"{f}: {c}" for f, c in pairs)
        return {
            "missing_field": f"{self.name} rows need {list(self.required)}; the file has columns {columns}; "
            f"map them with data.columns: {{{mapping}}} in the spec, or --set data.columns.{pairs[0][0]}={pairs[0][1]}"
        }

    def split(self, spec: JobSpec) -> tuple[list[Item], list[Item]]:
        """Training items (several files mixed by weight) and validation items. Without a validation file, each
        training file gives its own held-out rows before mixing, so a repeated row never lands in both splits."""
        loaded = self._load_sources(spec)
        if spec.data.validation is not None:
            parts: list[tuple[list[Item], list[Item]]] = [(items, []) for _, items in loaded]
            val = self.load(spec.data.validation, spec, "validation")
        else:
            parts = [_hold_out(items, spec) for _, items in loaded]
            val = [item for _, held in parts for item in held]
        self.sources = _splits_read(spec)
        if len(loaded) == 1:
            return parts[0][0], val
        named = [(s.path.name, train, s.weight) for (s, _), (train, _) in zip(loaded, parts, strict=True)]
        train, drawn = mix(named, spec.train.seed)
        self.sources = "; ".join(filter(None, [f"train mixture: {', '.join(map(str, drawn))}", self.sources]))
        return train, val

    def _load_sources(self, spec: JobSpec) -> list[tuple[DataSource, list[Item]]]:
        """Each training source read and checked on its own; the problems of every file are reported together."""
        loaded, problems = [], []
        for source in spec.data.sources:
            try:
                loaded.append((source, self.load(source.path, spec)))
            except DataError as exc:
                problems += exc.problems
        if problems:
            raise DataError(problems)
        return loaded

    def loss_metrics(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: TaskData, spec: JobSpec
    ) -> dict[str, float]:
        """Loss, perplexity and token accuracy on (at most `eval.max_examples` of) the validation rows."""
        rows = data.val_rows[: spec.eval.max_examples] if spec.eval.max_examples else data.val_rows
        return language_metrics(model, rows, tokenizer.pad_token_id, spec.packing, spec.train.batch_size)

    # -- the Task protocol -----------------------------------------------------------------------------------
    def check_data(self, spec: JobSpec) -> list[str]:
        train, val = self.split(spec)
        return self.check(train, "train") + self.check_split(train, val, spec)

    def prepare(self, spec: JobSpec, tokenizer: PreTrainedTokenizerBase) -> TaskData:
        train, val = self.split(spec)
        warnings = self.check(train, "train") + self.check_split(train, val, spec)
        train_tok = _tokenize_all(train, tokenizer, spec, warnings, "train", self.windowed)
        return self._with_validation(train_tok, val, spec, tokenizer, warnings)

    def prepare_eval(self, spec: JobSpec, tokenizer: PreTrainedTokenizerBase) -> TaskData:
        train, val = self.held_out(spec)
        warnings = self.check_split(train, val, spec)
        return self._with_validation([], val, spec, tokenizer, warnings)

    def held_out(self, spec: JobSpec) -> tuple[list[Item], list[Item]]:
        """What scoring needs: the validation items (and the training items only where the split needs them).
        A validation file is read alone; a held-out split needs the training file it is cut from."""
        if spec.data.validation is None:
            return self.split(spec)
        return [], self.load(spec.data.validation, spec, "validation")

    def _with_validation(
        self,
        train_tok: list[Tokenized],
        val: list[Item],
        spec: JobSpec,
        tokenizer: PreTrainedTokenizerBase,
        warnings: list[str],
    ) -> TaskData:
        val_tok = _tokenize_all(val, tokenizer, spec, warnings, "validation", self.windowed)
        to_rows = (lambda t: pack(t, spec.train.max_seq_len)) if spec.packing else unpacked
        train_rows, val_rows = to_rows(train_tok), to_rows(val_tok)
        return TaskData(train_rows, val_rows, len(train_tok), len(val_tok), warnings, list(val), sources=self.sources)

    def load_model(self, source: ModelSource, quantization: Any = None) -> torch.nn.Module:
        return load_model(source, quantization)

    def evaluate(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: TaskData, spec: JobSpec
    ) -> Evaluation:
        return self.with_answers(model, tokenizer, data, spec, self.loss_metrics(model, tokenizer, data, spec))

    def with_answers(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        data: TaskData,
        spec: JobSpec,
        metrics: dict[str, float],
    ) -> Evaluation:
        """`metrics` (the loss pass's) with the generated answers' scores and samples."""
        items = [i for i in data.val_items if isinstance(i, Item)][: max(spec.eval.generations, spec.eval.samples)]
        prompts = [generation_prompt(i.example, tokenizer) for i in items]
        sampling = {**self.sampling, "seed": spec.train.seed} if self.sampling else None
        outputs = generate_batch(
            model,
            tokenizer,
            [p for p, _ in prompts],
            spec.eval.max_new_tokens or self.max_new_tokens,
            sampling=sampling,
        )
        details: dict[str, Any] = {}
        if spec.eval.generations:
            scored, details = self.score(outputs[: spec.eval.generations], items[: spec.eval.generations], spec)
            metrics |= scored
        samples = [Generation(p, ref, out) for (p, ref), out in zip(prompts, outputs, strict=True)]
        return Evaluation(metrics, samples[: spec.eval.samples], details)


def _splits_read(spec: JobSpec) -> str:
    """Which split of each saved DatasetDict was read, said once so that nobody trains on `test` unknowingly."""
    paths = [(s.path, "train") for s in spec.data.sources]
    paths += [(spec.data.validation, "validation")] if spec.data.validation is not None else []
    chosen = [(path, saved_split(path, split)) for path, split in paths if path.is_dir()]
    return ", ".join(f"{path.name}: DatasetDict split '{name}'" for path, name in chosen if name)


def _hold_out(items: list[Item], spec: JobSpec) -> tuple[list[Item], list[Item]]:
    """(train, validation): a seeded `data.validation_split` of one file's items held out."""
    shuffled = items[:]
    random.Random(spec.train.seed).shuffle(shuffled)
    n_val = max(1, round(len(shuffled) * spec.data.validation_split))
    if n_val >= len(shuffled):
        raise DataError(
            [Problem("data.validation_split", f"{len(items)} rows cannot be split", "give data.validation")]
        )
    return shuffled[n_val:], shuffled[:n_val]


def _tokenize_all(
    items: list[Item],
    tokenizer: PreTrainedTokenizerBase,
    spec: JobSpec,
    warnings: list[str],
    split: str,
    windowed: bool = False,
) -> list[Tokenized]:
    if windowed:
        whole = [tokenize(i.example, tokenizer, None, spec.task.train_on_prompt) for i in items]
        return [piece for t in whole for piece in windows(t, spec.train.max_seq_len)]
    done = [tokenize(i.example, tokenizer, spec.train.max_seq_len, spec.task.train_on_prompt) for i in items]
    truncated = [i.example.line for i, t in zip(items, done, strict=True) if t.truncated]
    if truncated:
        warnings.append(
            f"{split}: {len(truncated)} example(s) longer than train.max_seq_len={spec.train.max_seq_len} were "
            f"truncated ({_lines(truncated)})"
        )
    kept = [t for t in done if t.n_trained > 0]
    dropped = [i.example.line for i, t in zip(items, done, strict=True) if t.n_trained == 0]
    if dropped:
        warnings.append(
            f"{split}: {len(dropped)} example(s) had no trained token left after truncation "
            f"and were dropped ({_lines(dropped)}); raise train.max_seq_len"
        )
    if not kept:
        raise DataError(
            [
                Problem(
                    f"data.{split}",
                    f"no example has a trained token ({len(dropped)} of {len(done)} lost their answer to "
                    f"truncation at train.max_seq_len={spec.train.max_seq_len})",
                    "raise train.max_seq_len, or check the answers",
                )
            ]
        )
    return kept


def _lines(lines: list[int], shown: int = 5) -> str:
    return (
        "line"
        + ("s " if len(lines) > 1 else " ")
        + ", ".join(map(str, lines[:shown]))
        + (", ..." if len(lines) > shown else "")
    )
