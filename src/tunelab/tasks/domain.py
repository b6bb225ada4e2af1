"""Domain adaptation: continued pre-training on raw text, packed; loss and perplexity on held-out text.

A text longer than train.max_seq_len is cut into consecutive rows, not truncated: every token of the corpus is
trained and every held-out token scored (truncating kept the first 256 tokens of 761 of the 1,031 bundled chunks).

Every token is trained (there is no prompt). Sample generations continue the opening words of held-out passages,
so the report shows the style the model picked up."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from tunelab.data.formats import ChatExample
from tunelab.evaluate import Generation, generate_batch
from tunelab.tasks.base import Evaluation, TaskData
from tunelab.tasks.generative import GenerativeTask, Item
from tunelab.tasks.registry import ScenarioInfo, register_scenario

if TYPE_CHECKING:
    from tunelab.config import JobSpec

OPENING_WORDS = 24


class DomainTask(GenerativeTask):
    name = "domain"
    max_new_tokens = 48
    required = ("text",)
    windowed = True

    def parse(self, row: dict[str, Any], line: int, spec: JobSpec) -> Item:
        text = row["text"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError("`text` must be a non-empty string")
        return Item(ChatExample(line, prompt="", completion=text), text)

    def score(self, outputs: list[str], items: list[Item], spec: JobSpec) -> tuple[dict[str, float], dict[str, Any]]:
        return {}, {}  # perplexity on held-out text is this scenario's metric

    def evaluate(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: TaskData, spec: JobSpec
    ) -> Evaluation:
        metrics = self.loss_metrics(model, tokenizer, data, spec)
        texts = [str(i.reference) for i in data.val_items if isinstance(i, Item)][: spec.eval.samples]
        openings = [" ".join(t.split()[:OPENING_WORDS]) for t in texts]
        outputs = generate_batch(model, tokenizer, openings, spec.eval.max_new_tokens or self.max_new_tokens)
        rests = [" ".join(t.split()[OPENING_WORDS : 2 * OPENING_WORDS]) for t in texts]
        return Evaluation(metrics, [Generation(*s) for s in zip(openings, rests, outputs, strict=True)])


register_scenario(ScenarioInfo(DomainTask.name, DomainTask))
