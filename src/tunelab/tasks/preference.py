"""Preference scenario: Direct Preference Optimisation on pairs of a preferred and a rejected answer.

Rows are OpenAI's DPO format or TRL's (see `tunelab.data.preference`). Training minimises the sigmoid DPO loss
(`tunelab.train.objectives.Dpo`, `task.beta`) against the model as it was before training. Evaluation scores
held-out pairs with the model itself: how often it gives the preferred answer the higher log-probability
(`pair_accuracy`), and by how much on average (`pair_margin`, in nats); add `eval.benchmarks` for standard ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from tunelab.data.preference import Pair, pair_rows, parse_pair
from tunelab.data.render import Tokenized, generation_prompt, tokenize
from tunelab.evaluate import Generation, generate_batch
from tunelab.tasks.base import Evaluation, TaskData
from tunelab.tasks.generative import GenerativeTask, Item
from tunelab.tasks.registry import ScenarioInfo, register_scenario
from tunelab.train.objectives import Dpo, score_sequences

if TYPE_CHECKING:
    from tunelab.config import JobSpec


class PreferenceTask(GenerativeTask):
    name = "preference"
    lower_is_better = frozenset()
    max_new_tokens = 48

    def parse(self, row: dict[str, Any], line: int, spec: JobSpec) -> Item:
        pair = parse_pair(row, line)
        return Item(pair.chosen, pair)

    def score(self, outputs: list[str], items: list[Item], spec: JobSpec) -> tuple[dict[str, float], dict[str, Any]]:
        return {}, {}  # pairs are scored by likelihood (evaluate), not by generated text

    def prepare(self, spec: JobSpec, tokenizer: PreTrainedTokenizerBase) -> TaskData:
        train, val = self.split(spec)
        return self._rows(train, val, spec, tokenizer)

    def prepare_eval(self, spec: JobSpec, tokenizer: PreTrainedTokenizerBase) -> TaskData:
        return self._rows([], self.held_out(spec)[1], spec, tokenizer)

    def _rows(
        self, train: list[Item], val: list[Item], spec: JobSpec, tokenizer: PreTrainedTokenizerBase
    ) -> TaskData:
        warnings = self.check_split(train, val, spec)
        train_pairs = _tokenize_pairs(train, tokenizer, spec, warnings, "train") if train else []
        val_pairs = _tokenize_pairs(val, tokenizer, spec, warnings, "validation")
        packed, max_len = spec.packing, spec.train.max_seq_len
        return TaskData(
            pair_rows(train_pairs, max_len, packed),
            pair_rows(val_pairs, max_len, packed),
            len(train_pairs),
            len(val_pairs),
            warnings,
            list(val),
            objective=Dpo(spec.task.beta),
            sources=self.sources,
        )

    def evaluate(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: TaskData, spec: JobSpec
    ) -> Evaluation:
        rows = data.val_rows[: spec.eval.max_examples] if spec.eval.max_examples else data.val_rows
        ids, logps = score_sequences(model, rows, tokenizer.pad_token_id, spec.train.batch_size)
        chosen, rejected = logps[ids % 2 == 0], logps[ids % 2 == 1]  # whole pairs, in pair order
        metrics = {
            "pair_accuracy": float((chosen > rejected).double().mean()),
            "pair_margin": float((chosen - rejected).mean()),
        }
        items = [i for i in data.val_items if isinstance(i, Item)][: spec.eval.samples]
        prompts = [generation_prompt(i.example, tokenizer) for i in items]
        outputs = generate_batch(model, tokenizer, [p for p, _ in prompts], spec.eval.max_new_tokens or 48)
        samples = [Generation(p, ref, out) for (p, ref), out in zip(prompts, outputs, strict=True)]
        return Evaluation(metrics, samples)


def _tokenize_pairs(
    items: list[Item], tokenizer: PreTrainedTokenizerBase, spec: JobSpec, warnings: list[str], split: str
) -> list[tuple[Tokenized, Tokenized]]:
    def encode(example: Any) -> Tokenized:
        return tokenize(example, tokenizer, spec.train.max_seq_len, spec.task.train_on_prompt)

    pairs = [(encode(p.chosen), encode(p.rejected)) for p in (i.reference for i in items) if isinstance(p, Pair)]
    truncated = sum(a.truncated or b.truncated for a, b in pairs)
    if truncated:
        warnings.append(f"{split}: {truncated} pair(s) longer than train.max_seq_len were truncated")
    kept = [(a, b) for a, b in pairs if a.n_trained and b.n_trained]
    if len(kept) < len(pairs):
        warnings.append(
            f"{split}: {len(pairs) - len(kept)} pair(s) had an answer with no token left after truncation and were "
            "dropped; raise train.max_seq_len"
        )
    if not kept:
        from tunelab.errors import DataError, Problem

        raise DataError([Problem(f"data.{split}", "no usable preference pair", "check the answers and max_seq_len")])
    return kept


register_scenario(ScenarioInfo(PreferenceTask.name, PreferenceTask))
